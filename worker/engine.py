"""llama.cpp in one process: models shared by refcount, agents batched into shared contexts.

Agents on the same model with the same context spec are *live* in one llama_context with one
sequence each (a group): every step evaluates one llama_batch that carries the next token of
each running agent and reads every row's logits at once (decode.py). A group's
context holds exactly its members' sequences (``n_seq_max`` = members, ``n_ctx`` = members x
the agent's n_ctx, one KV stream per sequence, so each agent attends to its own cells laid out
as if it were alone), so its device bytes never exceed the sum of its members' single
contexts; when membership changes, the group is rebuilt and every sequence is carried over with
``llama_state_seq_get_data`` / ``llama_state_seq_set_data`` (seqstate.py re-addresses a state
for the new number of streams).

An agent leaves its group only when the broker parks it (the broker's ledger decides what is
live, and each PARK says how much host memory the state may take and whether a file may hold
it: parking.py). Decode is greedy and driven here; the last sampled token of a reply stays
pending until the next step, so a park or rebuild between steps loses nothing.

A CHAT (chatrun.py) runs on the same steps: its prompt reuses the KV prefix the agent holds
(each slot keeps the exact tokens in its KV), and its row of each batch is sampled with its own
sampler chain (sampling.py) while DECODE rows keep the greedy argmax.

Every verb returns its record from common/jobs.py (RegisterResult, UnregisterResult, ParkResult,
DecodeResult, ChatResult); summary() and slot_state() give the facts each RESULT carries.
"""
import llama_cpp  # noqa: I001  -- must precede numpy: the CUDA load segfaulted otherwise

import ctypes
import logging
import os
import time

from lmx.common.ctxspec import KV_TYPES
from lmx.common.errors import Code, LmxError, Reason
from lmx.common.jobs import (EngineSummary, Measured, ModelState, RegisterResult, SlotState,
                             UnregisterResult)
from lmx.worker import parkdisk
from lmx.worker.chatrun import ChatMixin
from lmx.worker.decode import DecodeMixin
from lmx.worker.model import Model, Slot, Group, nvml_delta, trim_heap, device_bytes
from lmx.worker.llamalog import LlamaLog
from lmx.worker.parking import ParkMixin

log = logging.getLogger("lmx.worker")
FLASH_ATTN = {True: 1, False: 0}     # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED


class Engine(ChatMixin, DecodeMixin, ParkMixin):
    """Models, agents' slots, and the groups of live agents of this worker."""

    def __init__(self, n_threads, gpu, pinned, process_bytes=None, park_dir=None,
                 max_batch=8):
        self.process_bytes = process_bytes or (lambda: None)   # NVML reading of this process
        self.park_dir = park_dir          # parked state files, and copies for restarts
        if park_dir:
            os.makedirs(park_dir, mode=0o700, exist_ok=True)
        self.parked_ram = 0               # host bytes of parked state held now (a fact)
        self.lost = {}                    # agent -> STATE_LOST error: its conversation reset
        self.max_batch = max(1, max_batch)
        self.n_threads = n_threads
        self.gpu = gpu
        self.pinned = pinned
        self.models = {}
        self.slots = {}
        self.groups = []
        self.loads = 0
        self._batch = None
        self._batch_size = 0
        self._pool = None             # threads that sample a batch's rows (decode.py)
        self.llama_log = LlamaLog()
        llama_cpp.llama_backend_init()

    # -- models -------------------------------------------------------------------------

    def _acquire(self, path):
        model = self.models.get(path)
        if model is None:
            params = llama_cpp.llama_model_default_params()
            params.n_gpu_layers = -1 if self.gpu else 0
            self.llama_log.reset()
            before = self.process_bytes()
            t0 = time.perf_counter()
            ptr = llama_cpp.llama_model_load_from_file(path.encode(), params)
            if not ptr:
                why = self.llama_log.last_error() or "llama.cpp returned no model"
                raise LmxError(Code.MODEL_ERROR, f"llama.cpp could not load {path}: {why}",
                               Reason.LOAD_FAILED, path=path)
            model = Model(path, ptr, (time.perf_counter() - t0) * 1000,
                          self.llama_log.buffers(), nvml_delta(before, self.process_bytes()))
            if not self.loads:
                # The first load in a process also creates the CUDA context: its NVML delta is
                # not the model's (the broker books the context as the worker's overhead).
                model.nvml_delta = None
            self.loads += 1
            self.models[path] = model
            log.info("worker: loaded %s in %.0f ms", path, model.load_ms)
        model.refs += 1
        return model

    def _release(self, model):
        model.refs -= 1
        if model.refs == 0:
            llama_cpp.llama_model_free(model.ptr)
            del self.models[model.path]
            trim_heap()
            log.info("worker: freed %s", model.path)
            return True
        return False

    # -- agents -------------------------------------------------------------------------

    def register(self, agent, path, spec, resume=False):
        """Acquire the model (refcounted) and create the agent's slot (spec: ContextSpec);
        return a RegisterResult.

        The slot joins a group (gets a live sequence) at its first DECODE. resume: pick up the
        agent's state parked on disk before a restart, if it matches."""
        if agent in self.slots:
            raise LmxError(Code.AGENT_EXISTS, f"agent {agent!r} already has a slot")
        fresh = path not in self.models
        model = self._acquire(path)
        slot = self.slots[agent] = Slot(agent, model, spec)
        resumed = resume and self._resume(slot)
        if not resume and self.park_dir:
            parkdisk.remove(self.park_dir, agent)         # a new agent of an old name
        return RegisterResult(
            model_loaded=fresh, model_refs=model.refs, resumed=bool(resumed),
            load_ms=round(model.load_ms, 1) if fresh else 0.0, n_vocab=model.n_vocab,
            buffers=model.buffers,
            model_measured=Measured(device_bytes(model.buffers, self.gpu), model.nvml_delta,
                                    model.buffers))

    def unregister(self, agent):
        """Free the agent's sequence or parked state, its slot, and its model reference;
        return an UnregisterResult."""
        slot = self._slot(agent)
        if slot.group is not None:
            group = slot.group
            self._regroup(group, [s for s in group.members if s is not slot])
        self._drop_parked(slot)
        if self.park_dir:
            parkdisk.remove(self.park_dir, agent)
        del self.slots[agent]
        return UnregisterResult(model_freed=self._release(slot.model))

    def _slot(self, agent):
        slot = self.slots.get(agent)
        if slot is None:
            raise LmxError(Code.UNKNOWN_AGENT, f"no agent {agent!r} on this worker")
        return slot

    # -- groups -------------------------------------------------------------------------

    def _ctx_params(self, spec, k):
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = spec.n_ctx * k
        p.n_batch = spec.n_batch
        p.n_ubatch = spec.n_ubatch
        p.n_seq_max = spec.n_seq * k
        p.n_outputs_max = max(spec.n_outputs_max, k)
        # One KV stream of n_ctx cells per sequence: each agent attends to its own cells only,
        # laid out as if it were alone (seqstate.py moves a state between stream counts).
        p.kv_unified = False
        p.swa_full = spec.swa_full
        p.flash_attn_type = FLASH_ATTN[spec.flash_attn]
        p.type_k = KV_TYPES[spec.type_k][0]
        p.type_v = KV_TYPES[spec.type_v][0]
        p.n_threads = p.n_threads_batch = self.n_threads
        p.no_perf = True
        return p

    def _batchable(self, slot):
        return slot.spec.n_seq == 1 and slot.spec.n_batch >= self.max_batch

    def _rebuild(self, group, members):
        """Recreate the group's context for exactly `members`, carrying every remaining
        member's sequence over (a member leaving must have been saved already). A member
        whose sequence cannot be carried is reset, the others keep theirs, then it raises."""
        carry = {}
        try:
            if group.ctx is not None:
                for slot in group.members:
                    if slot in members and slot.n_past:
                        carry[slot.agent] = self._seq_save(group.ctx, slot.seq)
                llama_cpp.llama_free(group.ctx)
                group.ctx = None
            for slot in group.members:
                if slot not in members:
                    slot.group = slot.seq = None
            group.members = list(members)
            if not members:
                self.groups.remove(group)
                trim_heap()
                return
            self._build(group)
            failed = None
            for seq, slot in enumerate(members):
                slot.group, slot.seq = group, seq
                buf = carry.get(slot.agent)
                try:
                    if buf is not None:
                        self._seq_load(group, seq, ctypes.addressof(buf.data.contents),
                                       buf.nbytes, buf.capacity, slot)
                except LmxError as err:
                    failed = failed or err
            if failed is not None:
                raise failed
        finally:
            for buf in carry.values():
                buf.free()

    def _regroup(self, group, members):
        """_rebuild, where a member whose sequence could not be carried is reset and noted in
        self.lost (answered by the scheduler) instead of failing the caller's job."""
        try:
            self._rebuild(group, members)
        except LmxError as err:
            if err.code != Code.STATE_LOST:
                raise

    def _build(self, group):
        """A new context for the group's members; on failure their sequences are lost."""
        members = group.members
        self.llama_log.reset()
        before = self.process_bytes()
        ctx = llama_cpp.llama_init_from_model(group.model.ptr, self._ctx_params(
            group.spec, len(members)))
        if not ctx:
            for slot in members:       # live sequences are lost (parked ones stay parked)
                slot.group = slot.seq = None
                if slot.parked is None and not slot.on_disk:
                    slot.tokens, slot.pending = [], []
            group.members = []
            self.groups.remove(group)
            why = self.llama_log.last_error() or "llama_init_from_model returned NULL"
            raise LmxError(Code.MODEL_ERROR, f"cannot create a context for {len(members)} "
                           f"sequence(s) of {group.spec.n_ctx} tokens: {why}",
                           Reason.CONTEXT_FAILED)
        group.ctx = ctx
        group.n_stream = group.spec.n_seq * len(members)
        group.buffers = self.llama_log.buffers()
        group.measured = Measured(device_bytes(group.buffers, self.gpu),
                                  nvml_delta(before, self.process_bytes()), group.buffers)

    def make_live(self, slots):
        """Give every slot a live sequence, restoring parked state; return the agents whose
        state was restored. One rebuild per group that gains members. A state that cannot be
        restored resets its agent and is noted in self.lost (the caller answers it); a context
        that cannot be built raises."""
        joining, seen = {}, set()
        for slot in slots:
            if slot.group is None and slot.agent not in seen:
                seen.add(slot.agent)
                group = self._group_for(slot, joining)
                joining.setdefault(group, []).append(slot)
        restored = []
        for group, new in joining.items():
            self._regroup(group, group.members + new)
            for slot in new:
                if slot.parked is not None or slot.on_disk:
                    try:
                        self._restore(slot)
                        restored.append(slot.agent)
                    except LmxError as err:     # reset (in self.lost); the others go on
                        if err.code != Code.STATE_LOST:
                            raise
        return restored

    def _group_for(self, slot, joining):
        for group in self.groups:
            if group.model is slot.model and group.spec == slot.spec and self._batchable(slot):
                if len(group.members) + len(joining.get(group, ())) < self.max_batch:
                    return group
        group = Group(slot.model, slot.spec)
        self.groups.append(group)
        return group

    def measure(self, agent):
        """Build a parked agent's context alone, free it, and return what it measured (a
        Measured: device_bytes, nvml_delta and llama.cpp's buffer report; the estimator's
        tools)."""
        slot = self._slot(agent)
        if slot.group is not None:
            raise LmxError(Code.BAD_REQUEST, f"agent {agent!r} is live")
        group = Group(slot.model, slot.spec)
        self.groups.append(group)
        self._rebuild(group, [slot])
        measured = group.measured
        self._rebuild(group, [])
        return measured

    # -- reporting ----------------------------------------------------------------------

    def summary(self):
        """What STATUS and LIST show of this worker: an EngineSummary."""
        known = sum(device_bytes(m.buffers, self.gpu) for m in self.models.values())
        known += sum(g.measured.device_bytes for g in self.groups if g.measured)
        return EngineSummary(
            live_agents=[s.agent for g in self.groups for s in g.members],
            groups=[len(g.members) for g in self.groups], known_device_bytes=known,
            process_bytes=self.process_bytes(), parked_ram_bytes=self.parked_ram,
            models={p: ModelState(m.refs, dict(m.buffers)) for p, m in self.models.items()})

    def slot_state(self, agent):
        """The agent as this worker holds it (a SlotState), or None when it has no slot."""
        s = self.slots.get(agent)
        if s is None:
            return None
        return SlotState(agent=agent, model=s.model.path, n_ctx=s.n_ctx,
                         n_past=s.n_past + len(s.pending), live=s.group is not None,
                         parked=self._where(s), parked_bytes=s.parked_bytes,
                         parked_pinned=bool(s.parked and s.parked.pinned),
                         batch=len(s.group.members) if s.group else 0, parks=s.parks,
                         decodes=s.decodes, generated=s.generated)

    def close(self):
        """Free every context, parked buffer and model."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for group in list(self.groups):
            if group.ctx is not None:
                llama_cpp.llama_free(group.ctx)
            for slot in group.members:
                slot.group = slot.seq = None
        self.groups.clear()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch, self._batch_size = None, 0
        for slot in list(self.slots.values()):
            self._drop_parked(slot)
        for model in list(self.models.values()):
            llama_cpp.llama_model_free(model.ptr)
        self.slots.clear()
        self.models.clear()

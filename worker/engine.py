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
live). Its sequence state goes to host memory (pinned on CUDA) within the ``park_ram`` budget,
past it to a file in ``park_dir``. Decode is greedy and driven here; the last sampled token of a
reply stays pending until the next step, so a park or rebuild between steps loses nothing.
"""
import llama_cpp  # noqa: I001  -- must precede numpy: the CUDA load segfaulted otherwise

import ctypes
import logging
import os
import time

from lmx.common.ctxspec import KV_TYPES
from lmx.common.errors import Code, LmxError, Reason
from lmx.worker import parkdisk, seqstate
from lmx.worker.decode import DecodeMixin
from lmx.worker.device import HostBuffer
from lmx.worker.model import Model, Slot, Group, nvml_delta, trim_heap, device_bytes
from lmx.worker.llamalog import LlamaLog

log = logging.getLogger("lmx.worker")
FLASH_ATTN = {True: 1, False: 0}     # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
STATE_FORMAT = "seq-1"               # what the parked files hold: llama_state_seq_get_data


class Engine(DecodeMixin):
    """Models, agents' slots, and the groups of live agents of this worker."""

    def __init__(self, n_threads, gpu, pinned, process_bytes=None, park_dir=None,
                 park_ram=None, max_batch=8):
        self.process_bytes = process_bytes or (lambda: None)   # NVML reading of this process
        self.park_dir = park_dir          # spill past park_ram, and copies for restarts
        if park_dir:
            os.makedirs(park_dir, mode=0o700, exist_ok=True)
        self.park_ram = park_ram          # host bytes for parked state (None: no limit)
        self.parked_ram = 0
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
        """Acquire the model (refcounted) and create the agent's slot (spec: ContextSpec).

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
        return {"model_loaded": fresh, "model_refs": model.refs, "resumed": resumed,
                "load_ms": round(model.load_ms, 1) if fresh else 0.0,
                "buffers": model.buffers, "n_vocab": model.n_vocab,
                "model_measured": {"device_bytes": device_bytes(model.buffers, self.gpu),
                                   "nvml_delta": model.nvml_delta}}

    def _disk_key(self, slot):
        return {"model": slot.model.path, "model_size": os.path.getsize(slot.model.path),
                "spec": slot.spec.as_dict(), "format": STATE_FORMAT}

    def _resume(self, slot):
        """Adopt state parked on disk before a restart; True if there was a valid one."""
        found = self.park_dir and parkdisk.load(self.park_dir, slot.agent, self._disk_key(slot))
        if not found:
            return False
        raw, meta = found
        slot.on_disk, slot.parked_bytes = True, len(raw)
        slot.n_past, slot.pending = meta["n_past"], meta["pending"]
        log.info("worker: resumed %s from disk (%d tokens)", slot.agent, slot.n_past)
        return True

    def unregister(self, agent):
        """Free the agent's sequence or parked state, its slot, and its model reference."""
        slot = self._slot(agent)
        if slot.group is not None:
            group = slot.group
            self._rebuild(group, [s for s in group.members if s is not slot])
        self._drop_parked(slot)
        if self.park_dir:
            parkdisk.remove(self.park_dir, agent)
        del self.slots[agent]
        return {"model_freed": self._release(slot.model)}

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
                    slot.n_past, slot.pending = 0, []
            group.members = []
            self.groups.remove(group)
            why = self.llama_log.last_error() or "llama_init_from_model returned NULL"
            raise LmxError(Code.MODEL_ERROR, f"cannot create a context for {len(members)} "
                           f"sequence(s) of {group.spec.n_ctx} tokens: {why}",
                           Reason.CONTEXT_FAILED)
        group.ctx = ctx
        group.n_stream = group.spec.n_seq * len(members)
        group.buffers = self.llama_log.buffers()
        group.measured = {"device_bytes": device_bytes(group.buffers, self.gpu),
                          "nvml_delta": nvml_delta(before, self.process_bytes()),
                          "buffers": group.buffers}

    def _seq_save(self, ctx, seq):
        size = llama_cpp.llama_state_seq_get_size(ctx, seq)
        buf = HostBuffer(size + seqstate.SPARE, self.pinned)   # room to re-address in place
        buf.capacity = size + seqstate.SPARE
        buf.nbytes = llama_cpp.llama_state_seq_get_data(ctx, buf.data, size, seq)
        return buf

    def _seq_load(self, group, seq, address, nbytes, capacity, slot):
        """Restore a saved sequence state (at address) into the group's sequence seq."""
        try:
            address, nbytes, keep = seqstate.restream(address, nbytes, capacity,
                                                      group.n_stream)
        except seqstate.StateFormatError as exc:
            slot.n_past, slot.pending = 0, []
            raise LmxError(Code.INTERNAL, f"the saved state of {slot.agent!r} cannot be "
                           f"restored ({exc}); its context was reset") from None
        data = ctypes.cast(address, ctypes.POINTER(ctypes.c_uint8))
        if llama_cpp.llama_state_seq_set_data(group.ctx, data, nbytes, seq) == 0:
            slot.n_past, slot.pending = 0, []
            raise LmxError(Code.INTERNAL, f"restoring {slot.agent!r} failed; its context was "
                           "reset")
        del keep

    def make_live(self, slots):
        """Give every slot a live sequence, restoring parked state; return the agents whose
        state was restored. One rebuild per group that gains members."""
        joining, seen = {}, set()
        for slot in slots:
            if slot.group is None and slot.agent not in seen:
                seen.add(slot.agent)
                group = self._group_for(slot, joining)
                joining.setdefault(group, []).append(slot)
        restored = []
        for group, new in joining.items():
            self._rebuild(group, group.members + new)
            for slot in new:
                if slot.parked is not None or slot.on_disk:
                    self._restore(slot)
                    restored.append(slot.agent)
        return restored

    def _group_for(self, slot, joining):
        for group in self.groups:
            if group.model is slot.model and group.spec == slot.spec and self._batchable(slot):
                if len(group.members) + len(joining.get(group, ())) < self.max_batch:
                    return group
        group = Group(slot.model, slot.spec)
        self.groups.append(group)
        return group

    def _restore(self, slot):
        if slot.parked is not None:
            buf = slot.parked
            address, nbytes, capacity = ctypes.addressof(buf.data.contents), slot.parked_bytes, \
                buf.capacity
        else:
            found = parkdisk.load(self.park_dir, slot.agent, self._disk_key(slot))
            if not found:
                slot.n_past, slot.pending, slot.on_disk = 0, [], False
                raise LmxError(Code.INTERNAL, f"the state of {slot.agent!r} on disk is gone; "
                               "its context was reset")
            raw = found[0]
            nbytes, capacity = len(raw), len(raw) + seqstate.SPARE
            room = bytearray(capacity)
            room[:nbytes] = raw
            data = (ctypes.c_uint8 * capacity).from_buffer(room)
            address = ctypes.addressof(data)
        try:
            self._seq_load(slot.group, slot.seq, address, nbytes, capacity, slot)
        finally:
            self._drop_parked(slot)
            if self.park_dir:
                parkdisk.remove(self.park_dir, slot.agent)  # the live sequence is the truth now

    def park(self, agent):
        """Save the agent's sequence to host memory (within park_ram) or disk and leave its
        group; return where it went ("ram", "disk", or None when it had nothing to keep)."""
        slot = self._slot(agent)
        if slot.group is None:
            return {"parked": self._where(slot), "parked_bytes": slot.parked_bytes}
        group = slot.group
        if slot.n_past:
            size = llama_cpp.llama_state_seq_get_size(group.ctx, slot.seq)
            in_ram = self.park_ram is None or self.parked_ram + size <= self.park_ram
            if not in_ram and not self.park_dir:
                raise LmxError(Code.LIMIT, f"parking {agent!r} needs {size} bytes of host "
                               f"memory; {self.park_ram - self.parked_ram} of the parked-state "
                               "budget are left and there is no state directory",
                               Reason.PARK_BUDGET, needed=size, park_ram=self.park_ram)
            buf = self._seq_save(group.ctx, slot.seq)
            meta = dict(self._disk_key(slot), n_past=slot.n_past, pending=slot.pending)
            if in_ram:
                slot.parked, slot.parked_bytes = buf, buf.nbytes
                self.parked_ram += buf.nbytes
                if self.park_dir:       # a copy, so a restart can resume the conversation
                    parkdisk.save(self.park_dir, agent, ctypes.string_at(buf.data, buf.nbytes),
                                  meta)
            else:
                parkdisk.save(self.park_dir, agent, ctypes.string_at(buf.data, buf.nbytes),
                              meta)
                slot.on_disk, slot.parked_bytes = True, buf.nbytes
                buf.free()
        self._rebuild(group, [s for s in group.members if s is not slot])
        slot.parks += 1
        return {"parked": self._where(slot), "parked_bytes": slot.parked_bytes}

    def _where(self, slot):
        if slot.group is not None:
            return None
        return "ram" if slot.parked is not None else "disk" if slot.on_disk else None

    def _drop_parked(self, slot):
        if slot.parked is not None:
            self.parked_ram -= slot.parked_bytes
            slot.parked.free()
        slot.parked, slot.parked_bytes, slot.on_disk = None, 0, False

    def measure(self, agent):
        """Build a parked agent's context alone, free it, and return what it measured:
        device_bytes, nvml_delta and llama.cpp's buffer report (the estimator's tools)."""
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
        """What STATUS and LIST show of this worker: models, agents, groups."""
        known = sum(device_bytes(m.buffers, self.gpu) for m in self.models.values())
        known += sum(g.measured["device_bytes"] for g in self.groups if g.measured)
        live = [s.agent for g in self.groups for s in g.members]
        return {"live_agent": live[0] if len(live) == 1 else None,
                "live_agents": live, "groups": [len(g.members) for g in self.groups],
                "known_device_bytes": known, "process_bytes": self.process_bytes(),
                "parked_ram_bytes": self.parked_ram, "park_ram_budget": self.park_ram,
                "models": {p: {"refs": m.refs, "buffers": m.buffers}
                           for p, m in self.models.items()},
                "slots": {a: {"model": s.model.path, "n_ctx": s.n_ctx, "n_past": s.n_past,
                              "live": s.group is not None, "parked": self._where(s),
                              "parked_bytes": s.parked_bytes,
                              "parked_pinned": bool(s.parked and s.parked.pinned),
                              "batch": len(s.group.members) if s.group else 0,
                              "parks": s.parks, "decodes": s.decodes,
                              "generated": s.generated}
                          for a, s in self.slots.items()}}

    def close(self):
        """Free every context, parked buffer and model."""
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

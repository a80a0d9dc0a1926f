"""llama.cpp in one process: models shared by refcount, agents batched into shared contexts.

Agents on the same model with the same context spec are *live* in one llama_context with a
seat (sequence) each (a group, seats.py): every step evaluates one llama_batch that carries the
next token of each running agent, and chunks of newcomers' prompts, and reads every row's logits
at once (decode.py). A group is built with a capacity of seats; joining a free seat, parking
and restoring never rebuild it, only a change of capacity does (the broker's placement).

An agent leaves its seat only when the broker parks it (the broker's ledger decides what is
live, and each PARK says how much host memory the state may take and whether a file may hold
it: parking.py) or when it unregisters. Decode is greedy and driven here; the last sampled
token of a reply stays pending until the next step, so a park or resize between steps loses
nothing.

A CHAT (chatrun.py) runs on the same steps: its prompt reuses the KV prefix the agent holds
(each slot keeps the exact tokens in its KV), and its row of each batch is sampled with its own
sampler chain (sampling.py) while DECODE rows keep the greedy argmax.

Every verb returns its record from common/jobs.py (RegisterResult, UnregisterResult, ParkResult,
DecodeResult, ChatResult); summary() and slot_state() give the facts each RESULT carries.
"""
import llama_cpp  # noqa: I001  -- must precede numpy: the CUDA load segfaulted otherwise

import logging
import os
import time

from lmx.common.errors import Code, LmxError, Reason
from lmx.common.jobs import (EngineSummary, GroupState, Measured, ModelState, RegisterResult,
                             SlotState, UnregisterResult)
from lmx.worker import parkdisk
from lmx.worker.chatrun import ChatMixin
from lmx.worker.device import HostBuffer
from lmx.worker.decode import DecodeMixin
from lmx.worker.model import LoadProgress, Model, Slot, device_bytes, nvml_delta, trim_heap
from lmx.worker.llamalog import LlamaLog
from lmx.worker.parking import ParkMixin
from lmx.worker.seats import Group, SeatMixin

log = logging.getLogger("lmx.worker")


class Engine(ChatMixin, DecodeMixin, ParkMixin, SeatMixin):
    """Models, agents' slots, and the groups of live agents of this worker."""

    def __init__(self, n_threads, gpu, pinned, process_bytes=None, park_dir=None,
                 max_batch=256):
        self.process_bytes = process_bytes or (lambda: None)   # NVML reading of this process
        self.park_dir = park_dir          # parked state files, and copies for restarts
        if park_dir:
            os.makedirs(park_dir, mode=0o700, exist_ok=True)
        self.parked_ram = 0               # host bytes of parked state held now (a fact)
        self.lost = {}                    # agent -> STATE_LOST error: its conversation reset
        self.incoming = {}                # agent -> bytearray: a state being imported
        self.max_batch = max(1, max_batch)
        self.n_threads = n_threads
        self.gpu = gpu
        self.pinned = pinned
        self.models = {}
        self.slots = {}
        self.groups = []
        self.context_builds = 0       # every llama_context built (seats.py), for STATUS
        self.loads = 0
        self._batch = None
        self._batch_size = 0
        self._pool = None             # threads that sample a batch's rows (decode.py)
        self.on_launch = None         # called while the GPU computes a step (decode.py)
        self.step_tokens = 0          # tokens the last step evaluated (the scheduler's turns)
        self._emits = []              # DECODE tokens whose streaming waits for on_launch
        self.llama_log = LlamaLog()
        llama_cpp.llama_backend_init()

    # -- models -------------------------------------------------------------------------

    def _acquire(self, path, on_progress=None):
        model = self.models.get(path)
        if model is None:
            params = llama_cpp.llama_model_default_params()
            params.n_gpu_layers = -1 if self.gpu else 0
            relay = LoadProgress(on_progress) if on_progress is not None else None
            if relay is not None:       # held until the load returns: it owns the callback
                params.progress_callback = relay.c_callback
            self.llama_log.reset()
            before = self.process_bytes()
            t0 = time.perf_counter()
            ptr = llama_cpp.llama_model_load_from_file(path.encode(), params)
            if ptr and relay is not None:
                relay.finish()
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
            for group in [g for g in self.groups if g.model is model]:
                self.resize(group, 0)       # no agent left on it: its seats go with it
            llama_cpp.llama_model_free(model.ptr)
            del self.models[model.path]
            trim_heap()
            log.info("worker: freed %s", model.path)
            return True
        return False

    # -- agents -------------------------------------------------------------------------

    def register(self, agent, path, spec, resume=False, seat=None, on_progress=None):
        """Acquire the model (refcounted) and create the agent's slot (spec: ContextSpec);
        return a RegisterResult. on_progress(fraction): llama.cpp's load progress, when this
        call loads the model.

        seat: the broker's placement ({"group", "capacity"}): the slot takes a seat now.
        Without one it is seated at its first DECODE. resume: pick up the agent's state parked
        on disk before a restart, if it matches (it stays parked)."""
        if agent in self.slots:
            raise LmxError(Code.AGENT_EXISTS, f"agent {agent!r} already has a slot")
        fresh = path not in self.models
        model = self._acquire(path, on_progress)
        slot = self.slots[agent] = Slot(agent, model, spec)
        resumed = resume and self._resume(slot)
        if not resume and self.park_dir:
            parkdisk.remove(self.park_dir, agent)         # a new agent of an old name
        if seat is not None and not resumed:
            try:
                self.seat(slot, seat)
            except LmxError:
                del self.slots[agent]
                self._release(model)
                raise
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
        self.unseat(slot)
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

    # -- seats ------------------------------------------------------------------------

    def make_live(self, slots, seats=None):
        """Seat every slot that has none (seats: agent -> the broker's placement), restoring
        parked state into the seat; return the agents whose state was restored. Only a group
        with no free seat is rebuilt (grown). A state that cannot be restored resets its agent
        and is noted in self.lost (the caller answers it); a context that cannot be built
        raises."""
        restored = []
        for slot in slots:
            if slot.group is not None:
                continue
            self.seat(slot, (seats or {}).get(slot.agent))
            if slot.parked is not None or slot.on_disk:
                try:
                    self._restore(slot)
                    restored.append(slot.agent)
                except LmxError as err:     # reset (in self.lost); the others go on
                    if err.code != Code.STATE_LOST:
                        raise
        return restored

    def measure(self, agent):
        """Build a parked agent's context alone, free it, and return what it measured (a
        Measured: device_bytes, nvml_delta and llama.cpp's buffer report; the estimator's
        tools)."""
        slot = self._slot(agent)
        if slot.group is not None:
            raise LmxError(Code.BAD_REQUEST, f"agent {agent!r} is live")
        group = Group(next(self._auto_ids), slot.model, slot.spec)
        self.groups.append(group)
        self._build(group, [None])
        measured = group.measured
        self.resize(group, 0)
        return measured

    # -- reporting ----------------------------------------------------------------------

    def summary(self):
        """What STATUS and LIST show of this worker: an EngineSummary."""
        known = sum(device_bytes(m.buffers, self.gpu) for m in self.models.values())
        known += sum(g.measured.device_bytes for g in self.groups if g.measured)
        return EngineSummary(
            live_agents=[s.agent for g in self.groups for s in g.members],
            groups=[len(g.members) for g in self.groups], known_device_bytes=known,
            seats=[GroupState(g.gid, g.model.path, g.capacity, len(g.members), g.builds,
                              g.measured) for g in self.groups],
            context_builds=self.context_builds,
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
        """Free every context, parked buffer and model (parked files written first)."""
        if self.park_dir:
            parkdisk.flush(self.park_dir)
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
        HostBuffer.drain()

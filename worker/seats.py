"""Seats: a group's llama_context holds a capacity of sequences, and agents come and go
without rebuilding it (mixed into Engine).

A group is one context for agents of one model and context spec, built with ``capacity`` seats
(``n_seq_max`` = capacity, ``n_ctx`` = capacity x the agent's n_ctx, one KV stream per seat, so
each agent attends to its own cells laid out as if it were alone). A seat is a sequence id.
Taking a free seat, leaving one (``llama_memory_seq_rm`` of the whole sequence) and restoring a
parked state into a free seat (``llama_state_seq_set_data``) never rebuild the context. Only a
change of capacity does: growing when no seat is free, shrinking when the broker needs the
bytes; then every member's sequence is carried over with ``llama_state_seq_get_data`` /
``_set_data`` (seqstate.py re-addresses a state for the new number of streams).

Which group and what capacity is the broker's decision; each REGISTER, DECODE or CHAT that
must seat its agent says so (``seat``: {"group", "capacity"}), each PARK may say to shrink
(``shrink``), and RESIZE reclaims free seats. Without that (tests and tools driving the Engine
directly) the engine seats agents itself: a free seat of a matching group, else the group grows
geometrically up to ``max_batch``, else a new group.
"""
import llama_cpp  # noqa: I001  -- before numpy (CUDA load order), as everywhere in the worker

import ctypes
import itertools
import logging
import time

from lmx.common.ctxspec import KV_TYPES
from lmx.common.errors import Code, LmxError, Reason
from lmx.common.jobs import Measured
from lmx.worker.model import device_bytes, nvml_delta, trim_heap

log = logging.getLogger("lmx.worker")
FLASH_ATTN = {True: 1, False: 0}     # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
MAX_SEATS = 256                      # llama.cpp's LLAMA_MAX_SEQ


class Group:
    """One llama_context shared by agents of one model and spec: a seat (sequence) each."""

    def __init__(self, gid, model, spec):
        self.gid, self.model, self.spec = gid, model, spec
        self.ctx = None
        self.seats = []          # the slot on each seat (its sequence id), or None: free
        self.buffers = {}
        self.measured = None
        self.n_stream = 0        # KV streams of its context (one per seat)
        self.builds = 0          # contexts built for it (the first, then each resize)

    @property
    def capacity(self):
        return len(self.seats)

    @property
    def members(self):
        return [s for s in self.seats if s is not None]

    def free_seat(self):
        return next((i for i, s in enumerate(self.seats) if s is None), None)


class SeatMixin:
    """Groups and seats over the Engine's slots (needs groups, max_batch, llama_log, gpu,
    n_threads, process_bytes, lost, and ParkMixin's _seq_save / _seq_load)."""

    _auto_ids = itertools.count(-1, -1)     # ids of groups the engine made itself

    def _ctx_params(self, spec, k):
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = spec.n_ctx * k
        p.n_batch = spec.n_batch
        p.n_ubatch = spec.n_ubatch
        p.n_seq_max = spec.n_seq * k
        p.n_outputs_max = max(spec.n_outputs_max, k)
        p.kv_unified = False
        p.swa_full = spec.swa_full
        p.flash_attn_type = FLASH_ATTN[spec.flash_attn]
        p.type_k = KV_TYPES[spec.type_k][0]
        p.type_v = KV_TYPES[spec.type_v][0]
        p.n_threads = p.n_threads_batch = self.n_threads
        p.no_perf = True
        return p

    def max_seats(self, spec):
        """The most seats a group of this spec may have (1 when it cannot be batched)."""
        if spec.n_seq != 1:
            return 1
        return max(1, min(self.max_batch, spec.n_batch, MAX_SEATS))

    def group(self, gid):
        return next((g for g in self.groups if g.gid == gid), None)

    # -- seating ------------------------------------------------------------------------

    def seat(self, slot, seat=None):
        """Give a slot with no seat one: in seat["group"], grown to seat["capacity"] when no
        seat is free (the broker's placement), or where the engine's own rule puts it. The
        seat starts empty; restoring parked state is the caller's (make_live)."""
        if slot.group is not None:
            return slot.group
        if seat is None:
            group, capacity = self._auto_place(slot)
        else:
            group, capacity = self.group(seat["group"]), int(seat["capacity"])
            if group is None:
                group = Group(seat["group"], slot.model, slot.spec)
                self.groups.append(group)
            elif group.model is not slot.model or group.spec != slot.spec:
                raise LmxError(Code.INTERNAL, f"group {group.gid} holds another model or spec "
                               f"than agent {slot.agent!r} (a broker bug)")
        index = group.free_seat()
        if index is None:
            if not group.capacity < capacity <= self.max_seats(slot.spec):
                raise LmxError(Code.INTERNAL, f"no free seat in group {group.gid} of "
                               f"{group.capacity} and capacity {capacity} given (a broker bug)")
            self.resize(group, capacity)
            index = group.free_seat()
        group.seats[index] = slot
        slot.group, slot.seq = group, index
        return group

    def _auto_place(self, slot):
        """The engine's own placement: (group, capacity) for a slot with no seat given."""
        most = self.max_seats(slot.spec)
        mine = [g for g in self.groups if g.model is slot.model and g.spec == slot.spec]
        for group in mine:
            if group.free_seat() is not None:
                return group, group.capacity
        for group in mine:
            if group.capacity < most:
                return group, min(2 * group.capacity, most)
        group = Group(next(self._auto_ids), slot.model, slot.spec)
        self.groups.append(group)
        return group, 1

    def unseat(self, slot):
        """Free the slot's seat: its sequence is removed from the context, nothing rebuilt.
        (Its state must have been saved first if it is to be kept.)"""
        group = slot.group
        if group is None:
            return
        mem = llama_cpp.llama_get_memory(group.ctx)
        llama_cpp.llama_memory_seq_rm(mem, slot.seq, -1, -1)
        group.seats[slot.seq] = None
        slot.group = slot.seq = None

    # -- capacity -----------------------------------------------------------------------

    def resize(self, group, capacity):
        """Rebuild the group's context with `capacity` seats, carrying every member's
        sequence over (members keep their seats when it grows and are packed to the first
        seats when it shrinks); capacity 0 frees it. A member whose sequence cannot be carried
        is reset and noted in self.lost; a context that cannot be built raises."""
        members = group.members
        if capacity < len(members):
            raise LmxError(Code.INTERNAL, f"group {group.gid} has {len(members)} members; "
                           f"cannot shrink to {capacity} seats (a broker bug)")
        carry = {}
        try:
            if group.ctx is not None:
                for slot in members:
                    if slot.n_past:
                        carry[slot.agent] = self._seq_save(group.ctx, slot.seq)
                llama_cpp.llama_free(group.ctx)
                group.ctx = None
            if capacity == 0:
                group.seats = []
                self.groups.remove(group)
                trim_heap()
                return
            if capacity >= group.capacity:
                seats = group.seats + [None] * (capacity - group.capacity)
            else:
                seats = members + [None] * (capacity - len(members))
            self._build(group, seats)
            for seq, slot in enumerate(seats):
                if slot is not None:
                    slot.seq = seq
                    buf = carry.get(slot.agent)
                    if buf is not None:
                        self._carry(group, slot, buf)
        finally:
            for buf in carry.values():
                buf.free()

    def _carry(self, group, slot, buf):
        try:
            self._seq_load(group, slot.seq, ctypes.addressof(buf.data.contents), buf.nbytes,
                           buf.capacity, slot)
        except LmxError as err:     # reset and noted in self.lost; the others keep theirs
            if err.code != Code.STATE_LOST:
                raise

    def _build(self, group, seats):
        """A new context with one seat per entry of seats; on failure the members' live
        sequences are lost and the group is gone."""
        self.llama_log.reset()
        before = self.process_bytes()
        t0 = time.perf_counter()
        ctx = llama_cpp.llama_init_from_model(group.model.ptr, self._ctx_params(
            group.spec, len(seats)))
        if not ctx:
            for slot in seats:       # live sequences are lost (parked ones stay parked)
                if slot is not None:
                    slot.group = slot.seq = None
                    slot.tokens, slot.pending = [], []
            group.seats = []
            self.groups.remove(group)
            why = self.llama_log.last_error() or "llama_init_from_model returned NULL"
            raise LmxError(Code.MODEL_ERROR, f"cannot create a context of {len(seats)} seat(s) "
                           f"of {group.spec.n_ctx} tokens: {why}", Reason.CONTEXT_FAILED)
        group.ctx, group.seats = ctx, list(seats)
        group.n_stream = group.spec.n_seq * len(seats)
        group.builds += 1
        self.context_builds += 1
        group.buffers = self.llama_log.buffers()
        group.measured = Measured(device_bytes(group.buffers, self.gpu),
                                  nvml_delta(before, self.process_bytes()), group.buffers)
        log.info("worker: built group %d (%d seats) in %.0f ms", group.gid, len(seats),
                 (time.perf_counter() - t0) * 1000)

    def reclaim(self, gid, capacity):
        """RESIZE: shrink (or free, capacity 0) a group the broker needs the bytes of."""
        group = self.group(gid)
        if group is None:
            if capacity == 0:
                return
            raise LmxError(Code.INTERNAL, f"no group {gid} on this worker (a broker bug)")
        if capacity > group.capacity:
            raise LmxError(Code.INTERNAL, f"RESIZE may only shrink group {gid} "
                           f"({group.capacity} seats, {capacity} asked)")
        if capacity != group.capacity:
            self.resize(group, capacity)

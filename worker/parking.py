"""Parking on the engine: an agent's sequence saved to host memory or a file, its seat freed
without rebuilding the context, and restored into a free seat later (mixed into Engine).

Where a state goes is the broker's policy, carried by each PARK (``ram_bytes``, ``disk``): a
state of at most ``ram_bytes`` stays in host memory (pinned on CUDA), with a copy in
``park_dir`` when ``disk`` allows it, so a restart can resume the conversation; a larger one goes
to a file when ``disk`` allows it; otherwise the PARK is refused (LIMIT / PARK_BUDGET) and the
agent stays live, untouched. The engine keeps no budget; it reports the host bytes it holds.
A state that cannot be restored resets the agent's conversation and raises STATE_LOST.
"""
import llama_cpp  # noqa: I001  -- must precede numpy: the CUDA load segfaulted otherwise

import ctypes
import logging
import os
import time

from lmx.common.errors import Code, LmxError, Reason
from lmx.common.ctxspec import ContextSpec
from lmx.common.jobs import ExportResult, ImportResult, ParkResult, RegisterResult
from lmx.worker import parkdisk, seqstate
from lmx.worker.model import TRACE
from lmx.worker.device import HostBuffer

log = logging.getLogger("lmx.worker")
STATE_FORMAT = "seq-1"               # what the parked files hold: llama_state_seq_get_data


class ParkMixin:
    """park / resume / restore over the Engine's slots (needs parked_ram, park_dir, pinned,
    lost)."""

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
        # A file from before tokens were saved: placeholders (-1 matches no token), so its
        # conversation continues but a CHAT reuses none of it.
        slot.tokens = list(meta.get("tokens") or [-1] * meta["n_past"])
        slot.pending = meta["pending"]
        log.info("worker: resumed %s from disk (%d tokens)", slot.agent, slot.n_past)
        return True

    def park(self, agent, ram_bytes, disk, shrink=None):
        """Save the agent's sequence and free its seat: to host memory if it needs at most
        ram_bytes (plus a copy on disk when disk is true and there is a park_dir), else to a
        file if disk is true (and there is a park_dir), else LIMIT / PARK_BUDGET with the agent
        still live and unchanged. shrink: then resize its group to that many seats (0 frees
        it). A ParkResult: "ram", "disk", or None (nothing to keep)."""
        slot = self._slot(agent)
        if slot.group is None:
            return ParkResult(self._where(slot), slot.parked_bytes)
        group, t0 = slot.group, time.perf_counter()
        if slot.n_past:
            size = llama_cpp.llama_state_seq_get_size(group.ctx, slot.seq)
            to_disk = bool(disk and self.park_dir)
            in_ram = size <= ram_bytes
            if not in_ram and not to_disk:
                raise LmxError(Code.LIMIT, f"parking {agent!r} needs {size} bytes of host "
                               f"memory, {ram_bytes} allowed, and "
                               f"{'no state directory' if disk else 'no disk'}",
                               Reason.PARK_BUDGET, needed=size, ram_bytes=ram_bytes)
            self._save_parked(slot, in_ram, to_disk, size)
        self.unseat(slot)
        if shrink is not None and shrink != group.capacity:
            self.resize(group, shrink)
        slot.parks += 1
        if TRACE:
            log.info("park: %s %d bytes in %.2f ms", agent, slot.parked_bytes,
                     (time.perf_counter() - t0) * 1000)
        return ParkResult(self._where(slot), slot.parked_bytes)

    def _save_parked(self, slot, in_ram, to_disk, size):
        """Save the live sequence (size: its state's bytes): kept in host memory (in_ram)
        and/or written to a file."""
        buf = self._seq_save(slot.group.ctx, slot.seq, size)
        if to_disk:     # in RAM too: a copy, so a restart can resume the conversation
            meta = dict(self._disk_key(slot), n_past=slot.n_past, pending=list(slot.pending),
                        tokens=list(slot.tokens))
            slot.disk_copy = parkdisk.save_from(self.park_dir, slot.agent,
                                                ctypes.addressof(buf.data.contents),
                                                buf.nbytes, meta)
        slot.parked_bytes = buf.nbytes
        if in_ram:      # its copy on disk follows (written behind, from this buffer)
            slot.parked = buf
            self.parked_ram += buf.nbytes
        else:
            parkdisk.flush(self.park_dir)
            slot.disk_copy, slot.on_disk = None, True
            buf.free()

    def _restore(self, slot):
        """Load the slot's parked state into its new sequence; STATE_LOST (and a reset
        conversation) if it cannot be."""
        self._stop_disk_copy(slot)      # restoring may re-address the buffer in place
        if slot.parked is not None:
            buf = slot.parked
            address, nbytes, capacity = ctypes.addressof(buf.data.contents), slot.parked_bytes, \
                buf.capacity
        else:
            found = parkdisk.load(self.park_dir, slot.agent, self._disk_key(slot)) \
                if self.park_dir else None
            if not found:
                slot.on_disk = False
                raise self._lose(slot, f"the state of {slot.agent!r} on disk is gone")
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

    def _seq_save(self, ctx, seq, size=None):
        """The sequence's state in a host buffer (size: llama_state_seq_get_size when the
        caller has it; the call costs as much as a third of the save on the H200)."""
        if size is None:
            size = llama_cpp.llama_state_seq_get_size(ctx, seq)
        buf = HostBuffer.get(size + seqstate.SPARE, self.pinned)   # room to re-address in place
        buf.capacity = size + seqstate.SPARE
        buf.nbytes = llama_cpp.llama_state_seq_get_data(ctx, buf.data, size, seq)
        return buf

    def _seq_load(self, group, seq, address, nbytes, capacity, slot):
        """Restore a saved sequence state (at address) into the group's sequence seq; on
        failure the slot's conversation is reset and STATE_LOST raised."""
        try:
            address, nbytes, keep = seqstate.restream(address, nbytes, capacity,
                                                      group.n_stream)
        except seqstate.StateFormatError as exc:
            raise self._lose(slot, f"the saved state of {slot.agent!r} cannot be restored "
                             f"({exc})") from None
        data = ctypes.cast(address, ctypes.POINTER(ctypes.c_uint8))
        if llama_cpp.llama_state_seq_set_data(group.ctx, data, nbytes, seq) == 0:
            raise self._lose(slot, f"llama.cpp refused the saved state of {slot.agent!r}")
        del keep

    def _lose(self, slot, why):
        """Reset the slot's conversation and note it in self.lost; the STATE_LOST error."""
        slot.tokens, slot.pending = [], []
        err = LmxError(Code.STATE_LOST, f"{why}; its conversation was reset", agent=slot.agent)
        self.lost[slot.agent] = err
        return err

    def export_state(self, agent, offset, size):
        """Up to size bytes of a parked agent's saved state from offset (host memory or its
        file), the total, and with the first chunk its tokens: an ExportResult."""
        slot = self._slot(agent)
        if slot.group is not None:
            raise LmxError(Code.INTERNAL, f"EXPORT of {agent!r}, which is live (a broker bug)")
        if slot.parked is not None:
            total = slot.parked_bytes
            end = min(offset + size, total)
            data = ctypes.string_at(ctypes.addressof(slot.parked.data.contents) + offset,
                                    max(end - offset, 0))
        elif slot.on_disk:
            found = parkdisk.load(self.park_dir, agent, self._disk_key(slot)) \
                if self.park_dir else None
            if not found:
                raise LmxError(Code.STATE_LOST, f"the state of {agent!r} on disk is gone",
                               agent=agent)
            total, data = len(found[0]), found[0][offset:offset + size]
        else:
            total, data = 0, b""
        first = offset == 0
        return ExportResult(data, total, list(slot.tokens) if first else None,
                            list(slot.pending) if first else None)

    def import_state(self, job):
        """One chunk of a state another worker exported (an ImportJob): the first creates the
        slot (parked, no seat), the last makes the bytes its parked state in host memory."""
        if job.offset == 0:
            out = self.register(job.agent, job.path, ContextSpec(**job.spec))
            self.incoming[job.agent] = bytearray(job.total)
        else:
            self._slot(job.agent)
            out = RegisterResult()
        buf = self.incoming[job.agent]
        buf[job.offset:job.offset + len(job.data)] = job.data
        done = job.offset + len(job.data) >= job.total
        if done:
            del self.incoming[job.agent]
            slot = self._slot(job.agent)
            slot.tokens, slot.pending = list(job.tokens or []), list(job.pending or [])
            if job.total:
                host = HostBuffer.get(job.total + seqstate.SPARE, self.pinned)
                host.capacity, host.nbytes = job.total + seqstate.SPARE, job.total
                ctypes.memmove(host.data, bytes(buf), job.total)
                slot.parked, slot.parked_bytes = host, job.total
                self.parked_ram += job.total
            log.info("worker: imported %s (%d bytes of state, %d tokens)", job.agent,
                     job.total, slot.n_past)
        return ImportResult(**out.__dict__, done=done)

    def _where(self, slot):
        if slot.group is not None:
            return None
        return "ram" if slot.parked is not None else "disk" if slot.on_disk else None

    @staticmethod
    def _stop_disk_copy(slot):
        """The parked buffer is about to change or go: its copy to disk, if not written yet,
        is dropped (the live sequence or nothing will be the truth), or waited for."""
        if slot.disk_copy is not None:
            slot.disk_copy.cancel()
            slot.disk_copy = None

    def _drop_parked(self, slot):
        self._stop_disk_copy(slot)
        if slot.parked is not None:
            self.parked_ram -= slot.parked_bytes
            slot.parked.free()
        slot.parked, slot.parked_bytes, slot.on_disk = None, 0, False

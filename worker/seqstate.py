"""A sequence's saved KV state, re-addressed for a context with another number of KV streams.

A group keeps one KV stream per sequence (llama.cpp's non-unified cache: each sequence attends
to its own cells only, laid out as if it were alone). ``llama_state_seq_get_data`` writes a
magic number and the source sequence id, then, for each KV cache of the model (two for sliding-
window models), the cache's stream count and then one cell count per stream, followed by that
stream's cells when the count is not zero; only the saved sequence's stream has cells.
``llama_state_seq_set_data`` refuses a state whose stream count differs from the context's
("n_stream mismatch") but restores the one non-empty stream into the destination sequence's
stream whatever its position. So moving a sequence to a group of another size needs only a new
stream count and a new number of empty entries.

With one KV cache that is done in place, without copying the cells: the new header is written
into the old run of empty entries and the trailing empty entries into spare room after the state
(``SPARE`` bytes, which parked buffers carry). Sliding-window models (two caches back to back)
get a rewritten copy. The layout is llama.cpp 0.3.36's ``llama_kv_cache::state_write``; anything
that does not parse exactly raises StateFormatError, never a guess.
"""
import llama_cpp  # noqa: F401,I001  -- before numpy in every worker module (see engine.py)

import ctypes
import struct

import numpy as np

SPARE = 4 * 256          # room for the empty entries of up to 256 streams
MAGIC = 0xAF143CD8       # llama-context.cpp io_magic
PREFIX = 8               # magic, source seq_id


class StateFormatError(ValueError):
    """The bytes are not a single sequence's KV state as this module knows it."""


def _section(mv, off, end):
    """Parse one cache's section at off: (n_stream, [(index, start, stop)], next offset)."""
    def take(fmt):
        nonlocal off
        if off + struct.calcsize(fmt) > end:
            raise StateFormatError("state ends inside a header")
        vals = struct.unpack_from(fmt, mv, off)
        off += struct.calcsize(fmt)
        return vals

    (n_stream,) = take("<I")
    if not 1 <= n_stream <= 4096:
        raise StateFormatError(f"implausible stream count {n_stream}")
    cells = []
    for index in range(n_stream):
        start = off
        (count,) = take("<I")
        if count == 0:
            continue
        meta = count * 12                  # pos, n_seq_id (1: one sequence), seq_id
        if off + meta > end:
            raise StateFormatError("state ends inside the cell list")
        rows = np.frombuffer(mv, dtype="<i4", count=count * 3, offset=off).reshape(count, 3)
        if not (rows[:, 1] == 1).all():
            raise StateFormatError("cells carry other than one sequence id")
        off += meta
        v_trans, n_layer = take("<II")
        for _ in range(n_layer):           # K rows per layer: type, row size, rows
            _, row = take("<iQ")
            off += count * row
        for _ in range(n_layer):           # V per layer, transposed or not
            if v_trans:
                _, size_el, n_embd = take("<iII")
                off += n_embd * count * size_el
            else:
                _, row = take("<iQ")
                off += count * row
        if off > end:
            raise StateFormatError("state ends inside the cells")
        cells.append((index, start, off))
    if len(cells) > 1:
        raise StateFormatError("more than one stream holds cells")
    return n_stream, cells, off


def parse(mv, nbytes):
    """The sections of a state (after its magic and seq id): [(start, n_stream, cells, stop)]."""
    if nbytes < PREFIX + 4 or struct.unpack_from("<I", mv, 0)[0] != MAGIC:
        raise StateFormatError("not a sequence state (magic)")
    sections, off = [], PREFIX
    while off < nbytes:
        start = off
        n_stream, cells, off = _section(mv, off, nbytes)
        sections.append((start, n_stream, cells, off))
    if off != nbytes or not sections:
        raise StateFormatError("state does not end where its last section does")
    return sections


def restream(address, nbytes, capacity, n_target):
    """(address, nbytes) of the state at address re-addressed for n_target streams, plus an
    object to keep alive while it is used (a copy, or None when rewritten in place)."""
    mv = memoryview((ctypes.c_uint8 * capacity).from_address(address)).cast("B")
    sections = parse(mv, nbytes)
    if all(n == n_target for _, n, _, _ in sections):
        return address, nbytes, None
    prefix = bytes(mv[:PREFIX])
    if len(sections) == 1:
        _, n_stream, cells, stop = sections[0]
        if not cells:
            lead, start, payload_stop = 0, PREFIX + 4, PREFIX + 4
        else:
            index, start, payload_stop = cells[0]
            lead = min(index, n_target - 1)
        # The new prefix and stream count go just before `lead` empty entries that end where
        # the stream's cells start (that span held the old empty entries: zeros).
        head = start - 4 * lead - 4 - PREFIX
        trail = n_target - 1 - lead if cells else n_target
        if payload_stop + 4 * trail <= capacity:
            mv[head:head + PREFIX] = prefix
            struct.pack_into("<I", mv, head + PREFIX, n_target)
            mv[payload_stop:payload_stop + 4 * trail] = bytes(4 * trail)
            return address + head, payload_stop + 4 * trail - head, None
    parts = [prefix]
    for _, n_stream, cells, _ in sections:
        parts.append(struct.pack("<I", n_target))
        if cells:
            index, start, payload_stop = cells[0]
            lead = min(index, n_target - 1)
            parts += [bytes(4 * lead), bytes(mv[start:payload_stop]),
                      bytes(4 * (n_target - 1 - lead))]
        else:
            parts.append(bytes(4 * n_target))
    raw = b"".join(parts)
    copy = (ctypes.c_uint8 * len(raw)).from_buffer_copy(raw)
    return ctypes.addressof(copy), len(raw), copy

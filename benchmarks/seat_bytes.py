#!/usr/bin/env python3
"""Is a parked-and-restored seat the same bytes? (the engine alone, GPU or CPU)

    python benchmarks/seat_bytes.py --model M.gguf [--cpu] [--agents 8] [--tokens 32]

N agents in one group decode together; for each of the first half: its sequence state is
saved (llama_state_seq_get_data), it is parked, another (fresh) agent takes its seat, it is
restored into a different free seat, and its state is saved again. The KV cells of the two states are
compared byte for byte (the stream index differs with the seat, so the one non-empty stream's
bytes are compared, seqstate.parse). Then every agent continues together, and the parked ones'
continuations are compared with twins that decoded the same text and were never parked.
"""
import llama_cpp  # noqa: I001  -- before numpy (the CUDA load order)

import ctypes
import json
import os
import struct

import click
import numpy as np

from lmx.common.ctxspec import ContextSpec
from lmx.worker import seqstate
from lmx.worker.engine import Engine


def cells(engine, slot):
    """Per KV cache section, the slot's one non-empty stream: its cells' positions (the
    sequence id each cell carries is its seat, so it is left out) and every byte of K and V."""
    buf = engine._seq_save(slot.group.ctx, slot.seq)
    try:
        raw = ctypes.string_at(buf.data, buf.nbytes)
        mv = memoryview(raw)
        out = []
        for _, _, found, _ in seqstate.parse(mv, len(raw)):
            for _, start, stop in found:
                (count,) = struct.unpack_from("<I", raw, start)
                meta = np.frombuffer(raw, "<i4", count * 3, start + 4).reshape(count, 3)
                out.append((meta[:, :2].tobytes(), bytes(mv[start + 4 + 12 * count:stop])))
        return out
    finally:
        buf.free()


def together(engine, agents, prompts, n):
    done = engine.run_all([engine.start(a, p, n) for a, p in zip(agents, prompts)])
    return {agent: result.tokens for agent, result in done.items()}


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--agents", default=8, show_default=True)
@click.option("--tokens", default=32, show_default=True)
@click.option("--cpu", is_flag=True)
def main(model, agents, tokens, cpu):
    """Print one JSON line: states equal byte for byte, continuations equal to twins."""
    gpu = not cpu and llama_cpp.llama_supports_gpu_offload()
    eng = Engine(len(os.sched_getaffinity(0)), gpu=gpu, pinned=gpu)
    spec = ContextSpec(n_ctx=1024, n_gpu_layers=-1 if gpu else 0)
    names = [f"a{i}" for i in range(agents)]
    twins = [f"t{i}" for i in range(agents // 2)]
    try:
        fillers = [f"x{i}" for i in range(len(twins))]
        for name in names + twins + fillers:
            eng.register(name, model, spec)
        prompts = [f"Agent {i} tells a story about the number {i}:" for i in range(agents)]
        first = together(eng, names + twins, prompts + prompts[:len(twins)], tokens)
        same_bytes, builds = [], eng.context_builds
        moved = []
        for name, filler in zip(names, fillers):
            slot = eng.slots[name]
            before, seat_before = cells(eng, slot), slot.seq
            eng.park(name, 1 << 40, False)
            eng.make_live([eng.slots[filler]])           # another agent takes the freed seat
            eng.make_live([slot])                        # restored into another free seat
            same_bytes.append(cells(eng, slot) == before)
            moved.append(slot.seq != seat_before)
        cont = together(eng, names + twins, [" and then"] * (agents + len(twins)), tokens)
        equal = [cont[n] == cont[t] for n, t in zip(names, twins)]
        first_equal = [first[n] == first[t] for n, t in zip(names, twins)]
        print(json.dumps({
            "device": "gpu" if gpu else "cpu", "agents": agents, "tokens": tokens,
            "states_equal_byte_for_byte": f"{sum(same_bytes)} of {len(same_bytes)}",
            "restored_into_another_seat": f"{sum(moved)} of {len(moved)}",
            "first_turn_equal_to_twin": f"{sum(first_equal)} of {len(first_equal)}",
            "continuation_equal_to_twin": f"{sum(equal)} of {len(equal)}",
            "context_builds_during_parking": eng.context_builds - builds}))
    finally:
        eng.close()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What one park and one restore cost, by the kind of host buffer (the engine alone).

    python benchmarks/park_cost.py --model M.gguf [--cpu] [--agents 80] [--rounds 3] [--parks 20]

N agents in one group decode --rounds rounds of 64 tokens (their states grow as a
conversation's does); then --parks of them are parked and restored four times: with new
pageable buffers, pooled pageable ones, new pinned ones (cudaHostAlloc, GPU only) and pooled
pinned ones. Prints per-park and per-restore milliseconds, the cost of one
llama_state_seq_get_size call, and of a cudaHostAlloc + cudaFreeHost pair per buffer size.
No disk copy (the worker's copy for restarts is written behind, from the parked buffer).
"""
import llama_cpp  # noqa: I001  -- before numpy (the CUDA load order)

import ctypes
import json
import os
import time

import click

from lmx.common.ctxspec import ContextSpec
from lmx.worker.device import HostBuffer
from lmx.worker.engine import Engine


def host_alloc_ms(sizes_mib, repeats=10):
    """{MiB: ms} for a cudaHostAlloc + cudaFreeHost pair (first CUDA call made before)."""
    rt = HostBuffer._load_cudart()
    if rt is None:
        return {}
    rt.cudaFree(None)                       # the CUDA context first, outside the timing
    out = {}
    for mib in sizes_mib:
        ptr = ctypes.c_void_p()
        t0 = time.perf_counter()
        for _ in range(repeats):
            rt.cudaHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(mib << 20), 0)
            rt.cudaFreeHost(ptr)
        out[mib] = round((time.perf_counter() - t0) / repeats * 1000, 3)
    return out


def park_round(eng, victims, pinned, fresh):
    """(ms per park, ms per restore) for victims, with new (fresh) or pooled buffers."""
    if fresh:
        HostBuffer.drain()
    eng.pinned = pinned
    t0 = time.perf_counter()
    for agent in victims:
        eng.park(agent, 1 << 40, False)
    t1 = time.perf_counter()
    eng.make_live([eng.slots[a] for a in victims])
    t2 = time.perf_counter()
    return (round((t1 - t0) / len(victims) * 1000, 3), round((t2 - t1) / len(victims) * 1000, 3))


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--agents", default=80, show_default=True)
@click.option("--rounds", default=3, show_default=True, help="64-token rounds before parking.")
@click.option("--parks", default=20, show_default=True)
@click.option("--n-ctx", default=4096, show_default=True)
@click.option("--cpu", is_flag=True)
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False))
def main(model, agents, rounds, parks, n_ctx, cpu, out_dir):
    gpu = not cpu and llama_cpp.llama_supports_gpu_offload()
    out = {"host_alloc_free_ms": host_alloc_ms((2, 4, 8, 16)) if gpu else {}}
    eng = Engine(len(os.sched_getaffinity(0)), gpu=gpu, pinned=gpu, max_batch=256)
    names = [f"a{i}" for i in range(agents)]
    try:
        for name in names:
            eng.register(name, model, ContextSpec(n_ctx=n_ctx))
        for _ in range(rounds):
            eng.run_all([eng.start(a, f"{a} says: once upon a time", 64) for a in names])
        victims = names[-min(parks, agents):]
        slot = eng.slots[victims[0]]
        t0 = time.perf_counter()
        for _ in range(20):
            size = llama_cpp.llama_state_seq_get_size(slot.group.ctx, slot.seq)
        out.update(state_bytes=size, buffer_bytes=HostBuffer.size_class(size),
                   get_size_ms=round((time.perf_counter() - t0) / 20 * 1000, 3))
        kinds = [("pageable", False)] + ([("pinned", True)] if gpu else [])
        for kind, pinned in kinds:
            for label, fresh in (("new", True), ("pooled", False)):
                park_ms, restore_ms = park_round(eng, victims, pinned, fresh)
                out[f"{kind}_{label}"] = {"park_ms": park_ms, "restore_ms": restore_ms}
    finally:
        eng.close()
    out.update(device="GPU" if gpu else "CPU", agents=agents, rounds=rounds, parks=parks)
    text = json.dumps(out, indent=1)
    print(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "park_cost.json"), "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

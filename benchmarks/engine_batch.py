#!/usr/bin/env python3
"""The worker's engine alone (no broker, no sockets): aggregate tok/s of N agents batched.

    python benchmarks/engine_batch.py --model M.gguf [--cpu] [--n 1 --n 2 --n 4 --n 8]

Separates the engine's own cost from the messaging around it (benchmarks/parallel.py runs
the same through broker, worker and clients). --profile prints the top functions for the
largest N.
"""
import llama_cpp  # noqa: F401,I001  -- before numpy (the CUDA load order)

import cProfile
import os
import pstats
import time

import click

from lmx.common.ctxspec import ContextSpec
from lmx.worker.engine import Engine


def one_round(eng, agents, n_predict):
    runs = [eng.start(a, f"{a} says: once upon a time", n_predict) for a in agents]
    t0 = time.perf_counter()
    eng.prepare(runs)
    tokens = 0
    while runs:
        done = eng.step(runs)
        tokens += sum(r.result.generated_tokens for r in done)
        runs = [r for r in runs if r.result is None]
    return tokens, time.perf_counter() - t0


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--n", "ns", multiple=True, type=int, default=(1, 2, 4, 8), show_default=True)
@click.option("--n-predict", default=128, show_default=True)
@click.option("--cpu", is_flag=True)
@click.option("--profile", is_flag=True)
@click.option("--flash/--no-flash", default=True, show_default=True)
def main(model, ns, n_predict, cpu, profile, flash):
    """Print aggregate tok/s per N and the ratio to N = 1."""
    gpu = llama_cpp.llama_supports_gpu_offload() and not cpu
    eng = Engine(2 if cpu else (os.cpu_count() or 4), gpu=gpu, pinned=gpu)
    base = None
    try:
        for n in ns:
            agents = [f"n{n}a{i}" for i in range(n)]
            for a in agents:
                eng.register(a, model, ContextSpec(n_ctx=1024, flash_attn=flash,
                                                   n_gpu_layers=-1 if gpu else 0))
            one_round(eng, agents, 4)                     # build the group, warm up
            prof = cProfile.Profile() if profile and n == max(ns) else None
            if prof:
                prof.enable()
            tokens, seconds = one_round(eng, agents, n_predict)
            if prof:
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(12)
            rate = tokens / seconds
            base = base or rate
            print(f"N={n}: {rate:.1f} tok/s, ratio {rate / base:.2f} (goal {0.7 * n:.1f})",
                  flush=True)
            for a in agents:
                eng.unregister(a)
    finally:
        eng.close()


if __name__ == "__main__":
    main()

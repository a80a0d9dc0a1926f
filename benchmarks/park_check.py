#!/usr/bin/env python3
"""Parking inside a batch, checked on any device: do parked-and-restored agents continue as agents
that were never parked?

    python benchmarks/park_check.py --model M.gguf [--cpu] [--agents 4] [--park-ram 1MiB]

Two sets of agents, each in its own group, run the same prompts in the same batches: set A
decodes, then some of its agents are parked (one within --park-ram host memory, the others past
it, to files), then all continue; set B never parks. The script prints, per agent, where it was
parked and whether its continuation equals set B's, and the park/restore times. On the CPU they
must all be equal (tests/test_engine.py asserts it); on a GPU this is the check of the same
claim.
"""
import llama_cpp  # noqa: F401,I001  -- before numpy (the CUDA load order)

import json
import os
import tempfile
import time

import click

from lmx.common.config import parse_size
from lmx.common.ctxspec import ContextSpec
from lmx.worker.engine import Engine

PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time",
           "def fib(n):", "The weather today is", "In 1492,", "Dear diary,", "SELECT *"]


def together(eng, agents, prompts, n):
    return eng.run_all([eng.start(a, p, n) for a, p in zip(agents, prompts)])


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--agents", default=4, show_default=True, type=click.IntRange(2, 8))
@click.option("--first", default=48, show_default=True, help="Tokens before parking.")
@click.option("--then", "then_", default=32, show_default=True, help="Tokens after.")
@click.option("--park-ram", default=None, help="Host budget [default: fits one parked state].")
@click.option("--cpu", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def main(model, agents, first, then_, park_ram, cpu, as_json):
    """Print, per agent, whether parking changed its continuation."""
    gpu = llama_cpp.llama_supports_gpu_offload() and not cpu
    spec = ContextSpec(n_ctx=1024, n_gpu_layers=-1 if gpu else 0)
    probe = Engine(2, gpu=gpu, pinned=gpu)
    probe.register("p", model, spec)
    probe.decode("p", PROMPTS[0], first)
    budget = parse_size(park_ram) if park_ram else int(
        probe.park("p", 1 << 40, False).parked_bytes * 1.5)
    probe.close()
    eng = Engine(2 if cpu else (os.cpu_count() or 4), gpu=gpu, pinned=gpu,
                 park_dir=tempfile.mkdtemp(prefix="lmx-park-check-"))
    a = [f"a{i}" for i in range(agents)]
    b = [f"b{i}" for i in range(agents)]
    try:
        for name in a:
            eng.register(name, model, spec)
        for name in b:       # another group (another n_batch): the same batches, apart
            eng.register(name, model, ContextSpec(**dict(spec.as_dict(), n_batch=256)))
        prompts = PROMPTS[:agents]
        first_a, first_b = together(eng, a, prompts, first), together(eng, b, prompts, first)
        parked, times = {}, {}
        for name in a[1:]:                       # a0 stays live; the rest are parked
            t0 = time.perf_counter()
            # the broker's policy: the host budget that is left, then files
            parked[name] = eng.park(name, max(budget - eng.parked_ram, 0), True)
            times[name] = {"park_ms": round((time.perf_counter() - t0) * 1000, 2)}
        cont = [" and then"] * agents
        t0 = time.perf_counter()
        then_a = together(eng, a, cont, then_)
        restore_ms = round((time.perf_counter() - t0) * 1000, 2)
        then_b = together(eng, b, cont, then_)
        rows = []
        for x, y in zip(a, b):
            park = parked.get(x)
            rows.append({"agent": x, "parked": park.parked if park else None,
                         "parked_bytes": park.parked_bytes if park else 0,
                         **times.get(x, {}), "restored": then_a[x].kv_swap_restored,
                         "first_equal": first_a[x].tokens == first_b[y].tokens,
                         "continuation_equal": then_a[x].tokens == then_b[y].tokens})
        out = {"device": "cuda" if gpu else "cpu", "model": os.path.basename(model),
               "park_ram": budget, "restore_round_ms": restore_ms, "rows": rows,
               "equal": sum(r["continuation_equal"] for r in rows), "agents": agents}
    finally:
        eng.close()
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"device {out['device']}, model {out['model']}, park budget {budget} bytes")
    for r in rows:
        click.echo(f"{r['agent']}: parked={r['parked'] or 'no':4} bytes={r['parked_bytes']:>9} "
                   f"park_ms={r.get('park_ms', '-')!s:>7} restored={r['restored']!s:5} "
                   f"before-park equal={r['first_equal']!s:5} "
                   f"continuation equal={r['continuation_equal']}")
    click.echo(f"continuations equal to never-parked: {out['equal']} of {agents}; the round "
               f"that restored them took {restore_ms} ms")


if __name__ == "__main__":
    main()

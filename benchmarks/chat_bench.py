#!/usr/bin/env python3
"""CHAT's two speed goals, measured side by side in one run on the engine (any device):

1. Prefix reuse: the second turn of a long conversation (about --turn-tokens tokens) on the
   agent that holds the first turn in its KV, against the same messages on a fresh agent that
   must process all of them. Goal: the reusing turn's prefill is >= 10x faster.
2. Sampling inside a batch: N agents decoding together, each with its own llama.cpp sampler
   chain (top-k 40, top-p 0.95, min-p 0.05, temperature 0.8, dist(seed)), against the same N
   agents decoding greedily (one vectorized argmax). tok/s over the steps where all N rows
   run, as a share of greedy. Goal: >= 0.9 at N = 8.

    python benchmarks/chat_bench.py --model M.gguf [--template chatml] [--cpu] [--json]
"""
import llama_cpp  # noqa: F401,I001  -- before numpy (the CUDA load order)

import json
import os
import statistics
import time

import click

from lmx.common.ctxspec import ContextSpec
from lmx.common.jobs import ChatJob, Sampling
from lmx.worker.engine import Engine

FILLER = ("The committee reviewed the quarterly figures, the staffing plan and the notes from "
          "the last meeting before it agreed on the next steps. ")


def conversation(turn_tokens):
    """A system message and alternating turns, about turn_tokens tokens in all."""
    msgs = [{"role": "system", "content": "You are a careful assistant."}]
    words = 0
    i = 0
    while words * 1.3 < turn_tokens:
        msgs.append({"role": "user", "content": f"Part {i}: " + FILLER * 3})
        msgs.append({"role": "assistant", "content": "Noted. " + FILLER})
        words += len(FILLER.split()) * 4 + 4
        i += 1
    return msgs + [{"role": "user", "content": "Summarize all of it in one line."}]


def job(agent, messages, template, max_tokens=16, **sampling):
    return ChatJob(agent, messages, max_tokens, Sampling(**sampling), template=template)


def prefix_reuse(eng, model, spec, template, turn_tokens, repeats):
    """(reused prefill ms, full prefill ms, cached tokens, prompt tokens) medians."""
    rows = []
    for r in range(repeats):
        a, b = f"reuse{r}", f"fresh{r}"
        eng.register(a, model, spec)
        eng.register(b, model, spec)
        convo = conversation(turn_tokens)
        first = eng.chat(a, job(a, convo, template, temperature=0))
        convo2 = convo + [{"role": "assistant", "content": first.content},
                          {"role": "user", "content": "And one more thing?"}]
        reuse = eng.chat(a, job(a, convo2, template, temperature=0))
        full = eng.chat(b, job(b, convo2, template, temperature=0))
        rows.append((reuse.prompt_ms, full.prompt_ms, reuse.cached_tokens, reuse.prompt_tokens,
                     full.cached_tokens))
        eng.unregister(a)
        eng.unregister(b)
    med = [statistics.median(col) for col in zip(*rows)]
    return {"reuse_prefill_ms": round(med[0], 2), "full_prefill_ms": round(med[1], 2),
            "cached_tokens": int(med[2]), "prompt_tokens": int(med[3]),
            "fresh_cached_tokens": int(med[4]), "speedup": round(med[1] / med[0], 2)}


def width_rate(eng, runs, n):
    """tok/s over the steps in which all n rows decode one token each."""
    eng.prepare(runs)
    eng.step(runs)                        # the prompts (not timed)
    active, tokens, spent = list(runs), 0, 0.0
    while active:
        full = len(active) == n
        t0 = time.perf_counter()
        eng.step(active)
        if full:
            spent += time.perf_counter() - t0
            tokens += n
        active = [r for r in active if r.result is None]
    for run in runs:
        getattr(run, "close", lambda: None)()
    return tokens / spent if spent else 0.0, tokens


def sampling_share(eng, model, spec, template, n, tokens, repeats):
    agents = [f"w{i}" for i in range(n)]
    for a in agents:
        eng.register(a, model, spec)
    greedy, sampled = [], []
    try:
        for r in range(repeats):
            runs = [eng.start(a, f"{a} round {r}: once upon a time", tokens) for a in agents]
            greedy.append(width_rate(eng, runs, n))
            runs = [eng.start_chat(a, job(a, [{"role": "user", "content": f"{a} round {r}: "
                                                "tell a long story."}], template,
                                          max_tokens=tokens, temperature=0.8, top_k=40,
                                          top_p=0.95, min_p=0.05, seed=r * 100 + i))
                    for i, a in enumerate(agents)]
            sampled.append(width_rate(eng, runs, n))
    finally:
        for a in agents:
            eng.unregister(a)
    g = statistics.median(x for x, _ in greedy)
    s = statistics.median(x for x, _ in sampled)
    return {"n": n, "greedy_tok_s": round(g, 1), "sampled_tok_s": round(s, 1),
            "share": round(s / g, 3) if g else None,
            "timed_tokens": [t for _, t in sampled]}


def seeded_alone_vs_batch(eng, model, spec, template, n=4, tokens=24):
    """How many of n seeded chats give the same text alone and in one batch of n."""
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    alone = []
    for i in range(n):
        eng.register("solo", model, spec)
        alone.append(eng.chat("solo", job("solo", msgs, template, max_tokens=tokens,
                                          seed=1000 + i)).content)
        eng.unregister("solo")
    agents = [f"s{i}" for i in range(n)]
    for a in agents:
        eng.register(a, model, spec)
    runs = [eng.start_chat(a, job(a, msgs, template, max_tokens=tokens, seed=1000 + i))
            for i, a in enumerate(agents)]
    eng.prepare(runs)
    active = list(runs)
    while active:
        eng.step(active)
        active = [r for r in active if r.result is None]
    batched = [r.result.content for r in runs]
    for a in agents:
        eng.unregister(a)
    return {"n": n, "equal": sum(x == y for x, y in zip(alone, batched)),
            "batch": max(r.result.batch for r in runs)}


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--template", default=None, help="Template override (e.g. chatml) for models "
              "without one, such as shape-true synthetic GGUFs.")
@click.option("--turn-tokens", default=2000, show_default=True)
@click.option("--widths", default="8", show_default=True, help="Comma-separated N.")
@click.option("--tokens", default=64, show_default=True, help="Tokens per agent per round.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--cpu", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def main(model, template, turn_tokens, widths, tokens, repeats, cpu, as_json):
    """Print prefill with and without prefix reuse, and sampled vs greedy batched decode."""
    gpu = llama_cpp.llama_supports_gpu_offload() and not cpu
    threads = 2 if cpu else (os.cpu_count() or 4)
    eng = Engine(threads, gpu=gpu, pinned=gpu, max_batch=64)
    spec = ContextSpec(n_ctx=max(4096, turn_tokens * 2), n_gpu_layers=-1 if gpu else 0)
    try:
        out = {"device": "cuda" if gpu else "cpu", "model": os.path.basename(model),
               "reuse": prefix_reuse(eng, model, spec, template, turn_tokens, repeats),
               "sampling": [sampling_share(eng, model, ContextSpec(
                   n_ctx=1024, n_gpu_layers=spec.n_gpu_layers), template, int(n), tokens,
                   repeats) for n in widths.split(",")],
               "seeded": seeded_alone_vs_batch(eng, model, ContextSpec(
                   n_ctx=512, n_gpu_layers=spec.n_gpu_layers), template)}
    finally:
        eng.close()
    if as_json:
        click.echo(json.dumps(out))
        return
    r = out["reuse"]
    click.echo(f"device {out['device']}, model {out['model']}")
    click.echo(f"prefix reuse: turn 2 of {r['prompt_tokens']} tokens, {r['cached_tokens']} "
               f"cached: prefill {r['reuse_prefill_ms']} ms vs {r['full_prefill_ms']} ms "
               f"fresh ({r['speedup']}x; goal >= 10x)")
    sd = out["seeded"]
    click.echo(f"seeded sampling: {sd['equal']} of {sd['n']} texts equal alone and in a batch "
               f"of {sd['batch']}")
    for s in out["sampling"]:
        click.echo(f"N={s['n']}: greedy {s['greedy_tok_s']} tok/s, sampled "
                   f"{s['sampled_tok_s']} tok/s, share {s['share']} (goal >= 0.9 at N=8)")


if __name__ == "__main__":
    main()

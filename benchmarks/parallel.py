#!/usr/bin/env python3
"""Aggregate decode throughput with N agents on one model, and time to first token.

    python benchmarks/parallel.py --model M.gguf [--cpu] [--n 1 --n 2 --n 4 --n 8] --out DIR

For each N, N agents (one client thread each) stream a DECODE of --n-predict tokens at the same
time; aggregate tok/s = all tokens / wall time of the round, and the ratio to N = 1 is printed
with p50/p95 time to first token, the largest batch the worker reported, and whether the ratio
meets 0.7 x N. Agents of one model are decoded in one llama_decode batch (worker/engine.py).
Before each timed round the N agents run a 4-token warm-up round, in which the new ones join the
group (a rebuild of its context each); its wall time is recorded as warmup_round_ms. Then
--check agents decode the same prompt batched and one at a time, and the script counts equal
greedy continuations.
"""
import os
import tempfile
import threading
import time

import click

import benchlib
from lmx.common.client import Client


def round_of(endpoint, agents, n_predict, finals=None, stream=True):
    """All agents stream at once; return (tokens, seconds, first-token latencies, batch)."""
    ttft, tokens, errors, batch = [], [], [], []
    finals = {} if finals is None else finals

    def run(agent):
        try:
            with Client(endpoint, timeout=600) as c:
                t0 = time.monotonic()
                if not stream:    # the worker's own time to first token, one reply
                    r = c.decode(agent, f"{agent} says: once upon a time", n_predict)
                    ttft.append(r["ttft_ms"] / 1000)
                    tokens.append(r["generated_tokens"])
                    batch.append(r.get("batch", 1))
                    finals[agent] = r["tokens"]
                    return
                for r in c.decode_stream(agent, f"{agent} says: once upon a time", n_predict):
                    if r["status"] == "partial" and r["index"] == 0:
                        ttft.append(time.monotonic() - t0)
                    elif r["status"] == "ok":
                        tokens.append(r["generated_tokens"])
                        batch.append(r.get("batch", 1))
                        finals[agent] = r["tokens"]
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in agents]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(tokens), time.monotonic() - t0, ttft, max(batch)


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--n", "ns", multiple=True, type=int, default=(1, 2, 4, 8), show_default=True)
@click.option("--n-predict", default=128, show_default=True)
@click.option("--quantum", default=4, show_default=True)
@click.option("--max-batch", default=8, show_default=True)
@click.option("--check", default=4, show_default=True, help="Agents for the batched-vs-alone "
              "check (0: skip).")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Stream every token to the clients, or one reply per DECODE.")
@click.option("--cpu", is_flag=True)
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False))
def main(model, ns, n_predict, quantum, max_batch, check, stream, cpu, out_dir):
    """Print aggregate tok/s per N, the ratio to N = 1, and TTFT p50/p95."""
    broker, endpoint, status = benchlib.start_broker(
        tempfile.mkdtemp(prefix="lmx-par-"), [model], "--max-batch", str(max_batch),
        "--quantum", str(quantum), *(["--cpu", "--threads", "2"] if cpu else []))
    rows = []
    same = None
    try:
        with Client(endpoint, timeout=600) as c:
            agents = [f"a{i}" for i in range(max(ns))]
            for a in agents:
                c.register(a, model, n_ctx=max(1024, 4 * n_predict + 256))
            for n in ns:
                # Warm-up: the N agents join one group (each join rebuilds the group's context
                # once); the timed round is then the steady state of N live agents.
                join_t0 = time.monotonic()
                round_of(endpoint, agents[:n], 4, stream=stream)
                join_s = time.monotonic() - join_t0
                tokens, seconds, ttft, batch = round_of(endpoint, agents[:n], n_predict,
                                                        stream=stream)
                rows.append({"n": n, "tokens": tokens, "seconds": round(seconds, 3),
                             "tok_s": tokens / seconds, "batch": batch,
                             "warmup_round_ms": round(join_s * 1000, 1),
                             "ttft_p50_ms": benchlib.pct(ttft, 50) * 1000,
                             "ttft_p95_ms": benchlib.pct(ttft, 95) * 1000})
            if check:
                together, alone = {}, {}
                pairs = [(f"t{i}", f"s{i}") for i in range(check)]
                for t, a in pairs:
                    c.register(t, model, n_ctx=1024)
                    c.register(a, model, n_ctx=1024)
                round_of(endpoint, [t for t, _ in pairs], 32, together)
                for t, a in pairs:
                    alone[t] = c.decode(a, f"{t} says: once upon a time", 32)["tokens"]
                same = sum(together[t] == alone[t] for t, _ in pairs)
    finally:
        broker.terminate()
        broker.wait(60)
    base = rows[0]["tok_s"] if rows and rows[0]["n"] == 1 else None
    lines = [f"device: {status.get('device_name')}, model {os.path.basename(model)}, "
             f"{n_predict} tokens per agent, quantum {quantum}, "
             f"{'streaming' if stream else 'one reply per DECODE'}", "",
             "| N | aggregate tok/s | ratio to N=1 | goal 0.7 x N | met | batch | TTFT p50 ms "
             "| TTFT p95 ms |", "| ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: |"]
    for r in rows:
        ratio = r["tok_s"] / base if base else float("nan")
        r["ratio"] = ratio
        met = "yes" if ratio >= 0.7 * r["n"] else "no"
        lines.append(f"| {r['n']} | {r['tok_s']:.1f} | {ratio:.2f} | {0.7 * r['n']:.1f} | {met} "
                     f"| {r['batch']} | {r['ttft_p50_ms']:.1f} | {r['ttft_p95_ms']:.1f} |")
    if same is not None:
        lines += ["", f"batched vs alone: {same} of {check} agents' 32-token greedy "
                  "continuations equal"]
    text = "\n".join(lines)
    click.echo(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        benchlib.dump({"device": status.get("device_name"), "rows": rows,
                       "batched_equals_alone": same, "check": check},
                      os.path.join(out_dir, "parallel.json"))
        with open(os.path.join(out_dir, "parallel.md"), "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

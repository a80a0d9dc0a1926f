#!/usr/bin/env python3
"""Cold start: an agent's REGISTER + first token through lmx against `Llama()` + first token.

    python benchmarks/cold_start.py --model M.gguf [--n-ctx 2048] [--pairs 3] [--cpu] --out DIR

Each pair runs, one after the other, (1) a fresh Python process that times `Llama()` (all
layers on the GPU, flash attention) and its first token, the import of llama_cpp left out, as
an agent on its own pays; and (2) a fresh lmx broker (its worker up, its CUDA context made at
start) that times REGISTER and the first token of a DECODE. Pairs alternate, so the page
cache and the machine's drift fall on both sides. The broker's log splits each REGISTER into
the worker's model load and seat (context) build and the rest (estimate, booking, messages).
Prints the median of each side and their ratio (goal <= 1.1).
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import click

import benchlib
from lmx.common.client import Client

PROMPT = "Once upon a time, in a small village by the sea,"
RAW = r"""
import json, sys, time
import llama_cpp
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]),
                      n_gpu_layers=0 if sys.argv[3] == "cpu" else -1, flash_attn=True,
                      n_threads=int(sys.argv[4]), verbose=False)
t1 = time.perf_counter()
llm.create_completion(sys.argv[5], max_tokens=1, temperature=0.0)
print(json.dumps({"load_s": t1 - t0, "cold_s": time.perf_counter() - t0}))
"""


def raw(model, n_ctx, cpu, threads):
    out = subprocess.run([sys.executable, "-c", RAW, model, str(n_ctx), "cpu" if cpu else "gpu",
                          str(threads), PROMPT], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def lmx(model, n_ctx, cpu, threads, log_path):
    """A fresh broker: REGISTER + first token; the worker's load and build times from its log."""
    args = ["--threads", str(threads)] + (["--cpu"] if cpu else [])
    start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    with open(log_path, "a") as log:
        broker, endpoint, _ = benchlib.start_broker(tempfile.mkdtemp(prefix="lmx-cold-"),
                                                    [model], *args, stderr=log)
    try:
        with Client(endpoint, timeout=600) as c:
            t0 = time.perf_counter()
            c.register("cold", model, n_ctx=n_ctx)
            t1 = time.perf_counter()
            c.decode("cold", PROMPT, 1)
            row = {"register_s": t1 - t0, "cold_s": time.perf_counter() - t0}
    finally:
        broker.terminate()
        broker.wait(60)
    with open(log_path) as fh:
        fh.seek(start)
        text = fh.read()
    load = re.search(r"worker: loaded \S+ in (\d+) ms", text)
    build = re.search(r"worker: built group \d+ \(\d+ seats\) in (\d+) ms", text)
    row["load_s"] = int(load.group(1)) / 1000 if load else None
    row["build_s"] = int(build.group(1)) / 1000 if build else None
    return row


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--n-ctx", default=2048, show_default=True)
@click.option("--pairs", default=3, show_default=True)
@click.option("--cpu", is_flag=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
def main(model, n_ctx, pairs, cpu, out_dir):
    """Print the medians and the ratio; write cold_start.json and .md under --out."""
    os.makedirs(out_dir, exist_ok=True)
    threads = len(os.sched_getaffinity(0))
    log_path = os.path.join(out_dir, "broker.log")
    rows = []
    for _ in range(pairs):
        rows.append({"raw": raw(model, n_ctx, cpu, threads),
                     "lmx": lmx(model, n_ctx, cpu, threads, log_path)})
    med = {side: {k: benchlib.median([r[side][k] for r in rows if r[side].get(k) is not None])
                  for k in rows[0][side]} for side in ("raw", "lmx")}
    ratio = med["lmx"]["cold_s"] / med["raw"]["cold_s"]
    m = med["lmx"]
    lines = [f"{'CPU' if cpu else 'GPU'}, model {os.path.basename(model)}, n_ctx {n_ctx}, "
             f"{pairs} pairs (medians)", "",
             "| | load | first token after load | cold start |", "| --- | ---: | ---: | ---: |",
             f"| `Llama()` in a fresh process | {med['raw']['load_s']:.3f} s | "
             f"{med['raw']['cold_s'] - med['raw']['load_s']:.3f} s | {med['raw']['cold_s']:.3f} s |",
             f"| lmx REGISTER (worker load {m['load_s']:.3f} s + seat build {m['build_s']:.3f} s "
             f"+ the rest {m['register_s'] - m['load_s'] - m['build_s']:.3f} s) | "
             f"{m['register_s']:.3f} s | {m['cold_s'] - m['register_s']:.3f} s | "
             f"{m['cold_s']:.3f} s |", "",
             f"cold start lmx / raw: **{ratio:.3f}** (goal <= 1.1); every pair: " +
             ", ".join(f"{r['lmx']['cold_s']:.3f} / {r['raw']['cold_s']:.3f}" for r in rows)]
    text = "\n".join(lines)
    click.echo(text)
    benchlib.dump({"rows": rows, "median": med, "ratio": ratio, "env": benchlib.env_info()},
                  os.path.join(out_dir, "cold_start.json"))
    with open(os.path.join(out_dir, "cold_start.md"), "w") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The gateway's cost: streamed CHAT through lmx-gateway (HTTP + SSE) against native CHAT
(lmx.common.client) on the same broker, in the same run, rounds alternating.

For N concurrent clients (default 1 and 16), each round sends N identical streamed requests
(temperature 0, the same messages on each client's own agent, so both paths make the same
tokens) and measures per request the time to the first content token (TTFT) and the stream's
decode rate (tokens after the first / time after the first), plus the aggregate tokens/s of
the round. Goals at one client: gateway tok/s >= 0.95 of native, TTFT <= 5 ms more.

    python benchmarks/gateway_bench.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf --cpu \\
        --out benchmarks/results/gateway-cpu
"""
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time

import click
import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import start_broker  # noqa: E402

from lmx.broker.launch import stop  # noqa: E402
from lmx.common.client import Client  # noqa: E402
from lmx.gateway.launch import GatewayProc, toml_config  # noqa: E402

MESSAGES = [{"role": "system", "content": "You are a storyteller."},
            {"role": "user", "content": "Tell a long story about a lighthouse keeper."}]


def native_one(endpoint, agent, max_tokens):
    """One streamed native CHAT: (t0, t_first, t_end, completion tokens)."""
    with Client(endpoint, timeout=600) as c:
        t0, first = time.perf_counter(), None
        for reply in c.chat_stream(agent, MESSAGES, max_tokens=max_tokens, temperature=0):
            if reply.get("status") == "partial" and reply.get("delta") and first is None:
                first = time.perf_counter()
        return t0, first, time.perf_counter(), reply["completion_tokens"]


HTTP = {}      # session -> its keep-alive httpx.Client (made once: not timed)


def gateway_one(url, session, max_tokens):
    """One streamed chat completion over HTTP: (t0, t_first, t_end, completion tokens)."""
    body = {"model": "m", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    http = HTTP.setdefault(session, httpx.Client(timeout=600))
    t0, first, tokens = time.perf_counter(), None, None
    with http.stream("POST", url + "/v1/chat/completions", json=body,
                     headers={"X-Lmx-Session": session}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and \
                    first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return t0, first, time.perf_counter(), tokens


def round_of(fn, target, names, max_tokens):
    """N concurrent requests (one thread each): per-request rows and the aggregate tok/s."""
    rows = [None] * len(names)

    def run(i):
        rows[i] = fn(target, names[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start, end = min(r[0] for r in rows), max(r[2] for r in rows)
    return {"ttft_ms": [(r[1] - r[0]) * 1000 for r in rows],
            "stream_tok_s": [(r[3] - 1) / (r[2] - r[1]) for r in rows if r[3] > 1],
            "tokens": sum(r[3] for r in rows), "aggregate_tok_s": sum(r[3] for r in rows) /
            (end - start)}


def summary(rounds):
    """Medians over the rounds."""
    med = statistics.median
    return {"ttft_ms": round(med([med(r["ttft_ms"]) for r in rounds]), 2),
            "stream_tok_s": round(med([med(r["stream_tok_s"]) for r in rounds]), 2),
            "aggregate_tok_s": round(med([r["aggregate_tok_s"] for r in rounds]), 2),
            "tokens_per_round": rounds[0]["tokens"]}


def measure(endpoint, url, n, repeats, max_tokens):
    """Alternate native and gateway rounds of n clients; their summaries and ratios."""
    natives = [f"bench-native-{n}-{i}" for i in range(n)]
    sessions = [f"bench-gw-{n}-{i}" for i in range(n)]
    with Client(endpoint) as c:
        for agent in natives:
            c.register(agent, MODEL["path"], n_ctx=MODEL["n_ctx"])
    round_of(native_one, endpoint, natives, max_tokens)            # warm: not timed
    round_of(gateway_one, url, sessions, max_tokens)
    nat, gw = [], []
    for _ in range(repeats):
        nat.append(round_of(native_one, endpoint, natives, max_tokens))
        gw.append(round_of(gateway_one, url, sessions, max_tokens))
    with Client(endpoint) as c:
        for agent in natives:
            c.unregister(agent)
    a, b = summary(nat), summary(gw)
    return {"clients": n, "native": a, "gateway": b,
            "stream_tok_s_ratio": round(b["stream_tok_s"] / a["stream_tok_s"], 3),
            "aggregate_tok_s_ratio": round(b["aggregate_tok_s"] / a["aggregate_tok_s"], 3),
            "added_ttft_ms": round(b["ttft_ms"] - a["ttft_ms"], 2)}


MODEL = {}


def table(results):
    lines = ["| clients | native TTFT ms | gateway TTFT ms | added TTFT ms | native tok/s "
             "(per stream) | gateway tok/s (per stream) | ratio | native aggregate tok/s | "
             "gateway aggregate tok/s | ratio |", "|" + " --- |" * 10]
    for r in results["runs"]:
        a, b = r["native"], r["gateway"]
        lines.append(f"| {r['clients']} | {a['ttft_ms']} | {b['ttft_ms']} | "
                     f"{r['added_ttft_ms']} | {a['stream_tok_s']} | {b['stream_tok_s']} | "
                     f"{r['stream_tok_s_ratio']} | {a['aggregate_tok_s']} | "
                     f"{b['aggregate_tok_s']} | {r['aggregate_tok_s_ratio']} |")
    return "\n".join(lines)


@click.command()
@click.option("--model", "model_path", required=True, type=click.Path(exists=True))
@click.option("--cpu", is_flag=True, help="Run the worker on the CPU.")
@click.option("--clients", default="1,16", show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--n-ctx", default=1024, show_default=True)
@click.option("--threads", default=None, type=int, help="The worker's threads.")
@click.option("--out", default=None, help="Write results.json and table.md here.")
def main(model_path, cpu, clients, repeats, max_tokens, n_ctx, threads, out):
    """Gateway vs native CHAT: TTFT and tok/s, 1 and 16 clients."""
    MODEL.update(path=os.path.abspath(model_path), n_ctx=n_ctx)
    folder = tempfile.mkdtemp(prefix="lmx-gwbench-")
    args = ["--max-agents-per-client", "128"] + (["--cpu"] if cpu else []) + \
        (["--threads", str(threads)] if threads else [])
    proc, endpoint, status = start_broker(folder, [MODEL["path"]], *args)
    gw = None
    try:
        gw = GatewayProc(folder, endpoint, toml_config({"m": {"model": MODEL["path"],
                                                              "n_ctx": n_ctx}}),
                         name="gateway")
        runs = [measure(endpoint, gw.url, int(n), repeats, max_tokens)
                for n in clients.split(",")]
    finally:
        if gw:
            gw.stop()
        stop(proc)
    results = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
               "device": status.get("device_kind"), "model": os.path.basename(model_path),
               "max_tokens": max_tokens, "n_ctx": n_ctx, "repeats": repeats,
               "env": {"python": platform.python_version(), "cpus": os.cpu_count(),
                       "date": time.strftime("%Y-%m-%d")}, "runs": runs}
    text = table(results)
    print(text)
    for r in runs:
        print(f"HEADLINE: clients={r['clients']} tok/s ratio={r['stream_tok_s_ratio']} "
              f"(aggregate {r['aggregate_tok_s_ratio']}) added TTFT={r['added_ttft_ms']} ms")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump(results, fh, indent=1)
        with open(os.path.join(out, "table.md"), "w") as fh:
            fh.write(f"device: {results['device']}, model {results['model']}, max_tokens "
                     f"{max_tokens}, {repeats} rounds each, medians; {results['env']}\n\n"
                     f"rerun: `{results['command']}`\n\n{text}\n")


if __name__ == "__main__":
    main()

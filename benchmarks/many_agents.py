#!/usr/bin/env python3
"""Hundreds of agents on one model: lmx against the raw llama.cpp loop, in one run.

    python benchmarks/many_agents.py --model M.gguf [--cpu] [--n 1 --n 8 ...] --out DIR

The anchor: one llama_context holding N sequences (one KV stream each, kv_unified off), every
prompt evaluated in one llama_decode, then one llama_decode per step carrying the N next tokens
and one argmax over the batch's logits; tok/s = N x --n-predict / wall time.

lmx: a broker (its worker on the GPU, or --cpu) on an emulated card of --card bytes (a ballast
process holds the rest of the GPU; on CPU the size is declared), --admit-by-parking, N agents
registered on the model for the round (unregistered after it; --population P registers P and
N of them decode: the idle ones between busy seats cost a filler token each step), and N
streaming clients (a socket each, in --procs client processes of one polling thread each, so
the clients' own Python does not throttle the measurement) each decoding --n-predict tokens
at once. A 4-token warm-up round seats the agents first; the timed rounds (--repeats, both sides; the
median is reported, since one round swings by 10 % on a shared machine) are the steady state.
Printed per N: aggregate tok/s, the ratio to the raw loop at the same N (and, past the raw
loop's largest N, to its figure there), TTFT p50/p99, parks and restores during the round, and
the context builds during the timed rounds (parking never rebuilds: it swaps seats).
"""
import llama_cpp  # noqa: I001  -- before numpy (the CUDA load order)

import multiprocessing as mp
import os
import statistics
import subprocess
import tempfile
import time

import click
import numpy as np

import benchlib

PROMPT = "{agent} says: once upon a time"


# -- the raw llama.cpp loop --------------------------------------------------------------------

@llama_cpp.llama_log_callback
def _quiet(level, text, user_data):
    """llama.cpp's log, dropped (the worker keeps its own)."""


def raw_loop(model_path, ns, n_ctx, n_predict, gpu, threads, repeats=1):
    """{N: tok/s} of the raw loop (the model loaded once, a context per round; the median of
    `repeats` rounds)."""
    llama_cpp.llama_log_set(_quiet, None)
    llama_cpp.llama_backend_init()
    mp_ = llama_cpp.llama_model_default_params()
    mp_.n_gpu_layers = -1 if gpu else 0
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), mp_)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    out = {}
    try:
        for n in ns:
            out[n] = statistics.median(_raw_round(model, vocab, n_vocab, n, n_ctx, n_predict,
                                                  threads) for _ in range(repeats))
    finally:
        llama_cpp.llama_model_free(model)
    return out


def _tokens(vocab, text):
    raw = text.encode()
    buf = (llama_cpp.llama_token * (len(raw) + 8))()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(raw) + 8, True, False)
    return list(buf[:n])


def _raw_round(model, vocab, n_vocab, n, n_ctx, n_predict, threads):
    p = llama_cpp.llama_context_default_params()
    p.n_ctx, p.n_seq_max, p.kv_unified = n_ctx * n, n, False
    p.n_batch = p.n_ubatch = 512
    p.n_outputs_max = n
    p.n_threads = p.n_threads_batch = threads
    p.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, p)
    batch = llama_cpp.llama_batch_init(max(512, n), 0, 1)
    try:
        prompts = [_tokens(vocab, PROMPT.format(agent=f"a{i}")) for i in range(n)]
        t0 = time.perf_counter()
        items = [(s, j, t, j == len(pr) - 1) for s, pr in enumerate(prompts)
                 for j, t in enumerate(pr)]
        for k in range(0, len(items), 512):
            _decode(ctx, batch, items[k:k + 512])
        pos = [len(pr) for pr in prompts]
        for _ in range(n_predict):
            rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n, n_vocab))
            picks = rows.argmax(axis=1).tolist()
            _decode(ctx, batch, [(s, pos[s], picks[s], True) for s in range(n)])
            pos = [q + 1 for q in pos]
        return n * n_predict / (time.perf_counter() - t0)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def _decode(ctx, b, items):
    for i, (seq, pos, tok, out) in enumerate(items):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
        b.seq_id[i][0] = seq
    b.n_tokens = len(items)
    if llama_cpp.llama_decode(ctx, b) != 0:
        raise RuntimeError("llama_decode failed")


# -- lmx: streaming clients in a few processes -------------------------------------------------

def _client_proc(endpoint, agents, n_predict, start_at, queue):
    """Every agent of this process streams one DECODE, all sent at start_at; one thread polls
    every agent's socket (a thread per agent made the clients' GIL part of the measurement)."""
    import zmq
    from lmx.common import protocol
    from lmx.common.client import Client
    ctx = zmq.Context()
    clients = {a: Client(endpoint, timeout=600, ctx=ctx) for a in agents}
    by_sock = {c.socket: a for a, c in clients.items()}
    poller = zmq.Poller()
    for sock in by_sock:
        poller.register(sock, zmq.POLLIN)
    rows, t0, first = {}, {}, {}
    time.sleep(max(0.0, start_at - time.time()))
    for agent, c in clients.items():
        t0[agent] = time.time()
        c.send("DECODE", agent=agent, prompt=PROMPT.format(agent=agent), n_predict=n_predict,
               stream=True)
    while len(rows) < len(agents):
        for sock, _ in poller.poll(600_000):
            agent = by_sock[sock]
            while True:
                try:
                    r = protocol.decode_reply(sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if r["status"] == "partial":
                    first.setdefault(agent, time.time())
                elif r["status"] != "ok":
                    raise RuntimeError(f"{agent}: {r}")
                else:
                    rows[agent] = dict(agent=agent, t0=t0[agent], first=first.get(agent),
                                       end=time.time(), tokens=r["generated_tokens"],
                                       restored=bool(r["kv_swap_restored"]),
                                       parked=len(r.get("kv_swap_parked") or []))
    for c in clients.values():
        c.close()
    ctx.term()
    queue.put(list(rows.values()))


def lmx_round(endpoint, agents, n_predict, procs):
    """All agents decode at once; their rows (t0, first token, end, tokens, swaps)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 1.5 + 0.02 * len(agents)
    parts = [agents[k::procs] for k in range(procs) if agents[k::procs]]
    ps = [ctx.Process(target=_client_proc, args=(endpoint, part, n_predict, start_at, queue))
          for part in parts]
    for p in ps:
        p.start()
    rows = sum((queue.get(timeout=900) for _ in ps), [])
    for p in ps:
        p.join()
    return rows


def summarize(rows):
    start = min(r["t0"] for r in rows)
    seconds = max(r["end"] for r in rows) - start
    ttft = [r["first"] - r["t0"] for r in rows if r["first"]]
    return dict(tokens=sum(r["tokens"] for r in rows), seconds=round(seconds, 3),
                tok_s=sum(r["tokens"] for r in rows) / seconds,
                ttft_p50_ms=benchlib.pct(ttft, 50) * 1000,
                ttft_p99_ms=benchlib.pct(ttft, 99) * 1000,
                restores=sum(r["restored"] for r in rows), parks=sum(r["parked"] for r in rows))


def run_lmx(model, ns, n_ctx, n_predict, card, cpu, procs, max_batch, repeats=1,
            population=0, broker_log=None):
    """{N: row} through a broker on an emulated card of `card` bytes: per N, N agents (or
    `population` when larger, N of them decoding) registered, measured, unregistered."""
    ballast = None
    handle = None if cpu else benchlib.nvml_handle()
    if handle is not None:
        ballast = benchlib.start_ballast(handle, card)
    args = ["--admit-by-parking", "--max-batch", str(max_batch), "--park-ram", "64GiB",
            "--max-agents-per-client", "1024"]
    args += ["--cpu", "--threads", str(len(os.sched_getaffinity(0))), "--vram-total",
             str(card)] if cpu else []
    log = open(broker_log, "w") if broker_log else subprocess.DEVNULL
    broker, endpoint, _ = benchlib.start_broker(tempfile.mkdtemp(prefix="lmx-many-"), [model],
                                                *args, stderr=log)
    from lmx.common.client import Client
    out = {}
    try:
        with Client(endpoint, timeout=600) as c:
            for n in ns:
                names = [f"n{n}-{i}" for i in range(max(n, population))]
                for name in names:
                    c.register(name, model, n_ctx=n_ctx)
                out[n] = _measure(c, endpoint, names[:n], n_predict, procs, repeats)
                out[n]["population"] = len(names)
                for name in names:
                    c.unregister(name)
    finally:
        broker.terminate()
        broker.wait(60)
        if ballast is not None:
            ballast.kill()
    return out


def _measure(c, endpoint, agents, n_predict, procs, repeats):
    """A warm-up round that seats the agents, then the timed rounds; the median one."""
    lmx_round(endpoint, agents, 4, procs)
    before = c.request("STATUS")["context_builds"]
    rounds = [summarize(lmx_round(endpoint, agents, n_predict, procs)) for _ in range(repeats)]
    status = c.request("STATUS")
    row = dict(sorted(rounds, key=lambda r: r["tok_s"])[len(rounds) // 2])
    row.update(n=len(agents), context_builds=status["context_builds"] - before,
               live=len(status["live_agents"]), rounds=rounds,
               groups=[(g["seats"], g["seats_used"]) for g in status["groups"]])
    return row


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--n", "ns", multiple=True, type=int, default=(1, 8, 32, 64, 100),
              show_default=True)
@click.option("--raw-max", default=64, show_default=True,
              help="Largest N of the raw loop (the anchor for larger N).")
@click.option("--n-ctx", default=4096, show_default=True)
@click.option("--n-predict", default=64, show_default=True)
@click.option("--card", default="8GiB", show_default=True, help="The emulated card's bytes.")
@click.option("--procs", default=4, show_default=True, help="Client processes.")
@click.option("--max-batch", default=256, show_default=True)
@click.option("--population", default=0, show_default=True,
              help="Agents registered per round when more than N (N of them decode): idle "
              "agents between busy ones in a group cost a filler token a step.")
@click.option("--repeats", default=3, show_default=True,
              help="Timed rounds per N, both sides; the median round is reported.")
@click.option("--broker-log", default=None, type=click.Path(dir_okay=False),
              help="Keep the broker's and worker's log here (with LMX_TRACE_STEPS=1 in the "
              "environment: a line per step and per park).")
@click.option("--cpu", is_flag=True)
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False))
def main(model, ns, raw_max, n_ctx, n_predict, card, procs, max_batch, population, repeats,
         broker_log, cpu, out_dir):
    """Print the table; write many_agents.json and .md under --out."""
    from lmx.common.config import parse_size
    card = parse_size(card)
    threads = len(os.sched_getaffinity(0))
    raw = raw_loop(model, [n for n in ns if n <= raw_max], n_ctx, n_predict, not cpu, threads,
                   repeats)
    rows = run_lmx(model, ns, n_ctx, n_predict, card, cpu, procs, max_batch, repeats,
                   population, broker_log)
    top = max(raw)
    lines = [f"{'CPU' if cpu else 'GPU'}, model {os.path.basename(model)}, n_ctx {n_ctx}, "
             f"{n_predict} tokens per agent, emulated card {card / (1 << 30):.1f} GiB, "
             f"--max-batch {max_batch}, the median of {repeats} timed rounds per N, "
             f"{max(population, 0) or 'N'} agents registered per round", "",
             "| N | raw tok/s | lmx tok/s | lmx / raw | TTFT p50 ms | TTFT p99 ms | live | "
             "parks | restores | context builds |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in ns:
        r = rows[n]
        anchor = raw.get(n, raw[top])
        r["raw_tok_s"], r["ratio"] = anchor, r["tok_s"] / anchor
        label = f"{anchor:.0f}" if n in raw else f"({top}) {anchor:.0f}"
        lines.append(f"| {n} | {label} | {r['tok_s']:.0f} | {r['ratio']:.3f} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['live']} | "
                     f"{r['parks']} | {r['restores']} | {r['context_builds']} |")
    text = "\n".join(lines)
    click.echo(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        benchlib.dump({"raw": raw, "rows": rows, "env": benchlib.env_info()},
                      os.path.join(out_dir, "many_agents.json"))
        with open(os.path.join(out_dir, "many_agents.md"), "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()

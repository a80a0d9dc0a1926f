#!/usr/bin/env python3
"""lmx's overheads, measured side by side in one run and printed as ratios.

- DECODE tokens/s through the broker vs raw llama-cpp-python (`Llama.create_completion`,
  greedy) on the same model and context (goal >= 0.97);
- cold start: REGISTER + first token vs `Llama()` + first token (goal <= 1.1), and REGISTER
  alone vs `Llama()` (lmx builds the context at the first DECODE);
- park/restore: llama.cpp's state save and restore into the worker's host buffer (pinned on
  CUDA) vs the same bytes over the copy bandwidth measured in this run (goals: save >= 0.85,
  restore >= 0.6 of it; on CPU the reference is a host memcpy);
- STATUS round trips/s vs a raw pyzmq ROUTER/DEALER echo of the same frames, at 1 and 100
  concurrent agents, with p50/p99 (goal >= 0.5).

    python benchmarks/overheads.py --model M.gguf --out DIR            # GPU when there is one
    python benchmarks/overheads.py --cpu --model M.gguf --out DIR ...  # CPU
"""
import llama_cpp  # noqa: I001  -- before numpy (CUDA load order)

import ctypes
import gc
import os
import subprocess
import sys
import tempfile
import time

import click
import zmq

import benchlib
from lmx.common import protocol
from lmx.common.client import Client

ECHO = r"""
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])
print("READY", flush=True)
while True:
    s.send_multipart(s.recv_multipart())
"""
PROMPT = "Once upon a time, in a small village by the sea,"


def raw_llama(model, n_ctx, n_predict, repeats, gpu, threads):
    """Load with the high-level API, first token, then timed greedy completions."""
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_gpu_layers=-1 if gpu else 0,
                          flash_attn=True, n_threads=threads, verbose=False)
    load = time.perf_counter() - t0
    llm.create_completion(PROMPT, max_tokens=1, temperature=0.0)
    cold = time.perf_counter() - t0
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = llm.create_completion(PROMPT, max_tokens=n_predict, temperature=0.0)
        rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - t))
    del llm
    gc.collect()
    return {"load_s": load, "cold_s": cold, "tok_s": benchlib.median(rates), "tok_s_all": rates}


def lmx_decode(c, model, n_ctx, n_predict, repeats):
    """REGISTER, first token, then timed DECODEs of the same prompt, each on a fresh agent so
    the context holds what the raw side's does (the raw side's completions restart from the
    prompt; a conversation that grows would make lmx decode over more cells)."""
    t0 = time.perf_counter()
    c.register("bench", model, n_ctx=n_ctx)
    reg = time.perf_counter() - t0
    c.decode("bench", PROMPT, 1)
    cold = time.perf_counter() - t0
    rates = []
    for i in range(repeats):
        c.register(f"bench{i}", model, n_ctx=n_ctx)
        t = time.perf_counter()
        r = c.decode(f"bench{i}", PROMPT, n_predict)
        rates.append(r["generated_tokens"] / (time.perf_counter() - t))
        c.unregister(f"bench{i}")
    c.unregister("bench")
    return {"register_s": reg, "cold_s": cold, "tok_s": benchlib.median(rates),
            "tok_s_all": rates}


def round_trips(endpoint, concurrency, total):
    """Requests/s and latency percentiles with `concurrency` DEALERs, one request each in flight."""
    ctx = zmq.Context()
    socks = []
    for _ in range(concurrency):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    sent = {s: time.perf_counter() for s in socks}
    lat, issued = [], 0
    t0 = time.perf_counter()
    for s in socks:
        s.send_multipart(protocol.encode_request("STATUS", issued))
        issued += 1
    while len(lat) < total:
        for s, _ in poller.poll(10000):
            s.recv_multipart()
            now = time.perf_counter()
            lat.append(now - sent[s])
            if issued < total:
                sent[s] = now
                s.send_multipart(protocol.encode_request("STATUS", issued))
                issued += 1
    elapsed = time.perf_counter() - t0
    for s in socks:
        s.close()
    ctx.term()
    return {"rps": len(lat) / elapsed, "p50_ms": benchlib.pct(lat, 50) * 1000,
            "p99_ms": benchlib.pct(lat, 99) * 1000}


def park_restore(model, tokens, gpu, threads, repeats=3):
    """llama_state_seq_get/set_data (what the engine parks with) into the worker's host buffer
    vs the copy bandwidth."""
    from lmx.common.ctxspec import ContextSpec
    from lmx.worker.device import HostBuffer
    from lmx.worker.engine import Engine
    eng = Engine(threads, gpu=gpu, pinned=gpu)
    eng.register("s", model, ContextSpec(n_ctx=tokens + 256, n_gpu_layers=-1 if gpu else 0))
    eng.decode("s", "hello " * tokens, 1)
    slot = eng.slots["s"]
    ctx, seq, n_past = slot.group.ctx, slot.seq, slot.n_past
    size = llama_cpp.llama_state_seq_get_size(ctx, seq)
    buf = HostBuffer(size, gpu)
    save, restore = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        llama_cpp.llama_state_seq_get_data(ctx, buf.data, size, seq)
        save.append(time.perf_counter() - t)
        t = time.perf_counter()
        llama_cpp.llama_state_seq_set_data(ctx, buf.data, size, seq)
        restore.append(time.perf_counter() - t)
    ref = copy_bandwidth(buf, size, gpu, repeats)
    out = {"state_bytes": size, "tokens": n_past, "pinned": buf.pinned,
           "save_gbps": size / min(save) / 1e9, "restore_gbps": size / min(restore) / 1e9,
           **ref}
    buf.free()
    eng.close()
    return out


def copy_bandwidth(buf, size, gpu, repeats):
    """GPU: cudaMemcpy D2H/H2D between the same pinned buffer and device memory. CPU: memmove."""
    if not gpu:
        other = (ctypes.c_uint8 * size)()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            ctypes.memmove(other, buf.data, size)
            times.append(time.perf_counter() - t)
        bw = size / min(times) / 1e9
        return {"ref": "host memmove", "ref_d2h_gbps": bw, "ref_h2d_gbps": bw}
    rt = benchlib.cudart()
    dev = ctypes.c_void_p()
    assert rt.cudaMalloc(ctypes.byref(dev), ctypes.c_size_t(size)) == 0
    res = {}
    for name, dst, src, kind in (("d2h", buf.data, dev, 2), ("h2d", dev, buf.data, 1)):
        times = []
        for _ in range(repeats):
            rt.cudaDeviceSynchronize()
            t = time.perf_counter()
            rt.cudaMemcpy(ctypes.cast(dst, ctypes.c_void_p), ctypes.cast(src, ctypes.c_void_p),
                          ctypes.c_size_t(size), kind)
            rt.cudaDeviceSynchronize()
            times.append(time.perf_counter() - t)
        res[f"ref_{name}_gbps"] = size / min(times) / 1e9
    rt.cudaFree(dev)
    res["ref"] = "cudaMemcpy with the pinned buffer"
    return res


def figures(r):
    """The table rows: (figure, value, goal text, passes)."""
    raw, lmx, pr, rt = r["raw"], r["lmx"], r["park"], r["rtt"]
    rows = [("DECODE tok/s lmx / raw", lmx["tok_s"] / raw["tok_s"], ">= 0.97",
             lmx["tok_s"] / raw["tok_s"] >= 0.97),
            ("cold start (REGISTER + first token) / (Llama() + first token)",
             lmx["cold_s"] / raw["cold_s"], "<= 1.1", lmx["cold_s"] / raw["cold_s"] <= 1.1),
            ("REGISTER alone / Llama()", lmx["register_s"] / raw["load_s"], "(info)", True),
            ("state save GB/s / copy GB/s", pr["save_gbps"] / pr["ref_d2h_gbps"], ">= 0.85",
             pr["save_gbps"] / pr["ref_d2h_gbps"] >= 0.85),
            ("state restore GB/s / copy GB/s", pr["restore_gbps"] / pr["ref_h2d_gbps"],
             ">= 0.6", pr["restore_gbps"] / pr["ref_h2d_gbps"] >= 0.6)]
    for n in sorted(rt["broker"], key=int):
        b, e = rt["broker"][n], rt["echo"][n]
        rows.append((f"STATUS round trips/s lmx / raw echo, {n} agents", b["rps"] / e["rps"],
                     ">= 0.5", b["rps"] / e["rps"] >= 0.5))
    return rows


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--n-ctx", default=2048, show_default=True)
@click.option("--n-predict", default=128, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--state-tokens", default=8192, show_default=True,
              help="Tokens in the context whose state is saved and restored.")
@click.option("--rtt-requests", default=5000, show_default=True)
@click.option("--cpu", is_flag=True)
@click.option("--threads", default=None, type=int)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
def main(model, n_ctx, n_predict, repeats, state_tokens, rtt_requests, cpu, threads, out_dir):
    """Measure and print every overhead ratio; write results.json and table.md to --out."""
    os.makedirs(out_dir, exist_ok=True)
    gpu = not cpu and llama_cpp.llama_supports_gpu_offload() and \
        benchlib.nvml_handle() is not None
    threads = threads or len(os.sched_getaffinity(0))
    r = {"env": benchlib.env_info(), "gpu": gpu, "model": os.path.basename(model),
         "n_ctx": n_ctx, "n_predict": n_predict}
    r["raw"] = raw_llama(model, n_ctx, n_predict, repeats, gpu, threads)
    folder = tempfile.mkdtemp(prefix="lmx-over-")
    echo_ep = f"ipc://{folder}/echo.sock"
    broker, endpoint, status = benchlib.start_broker(
        folder, [model], "--threads", str(threads), "--max-n-predict", str(max(n_predict, 4096)),
        *([] if gpu else ["--cpu"]))
    echo = subprocess.Popen([sys.executable, "-c", ECHO, echo_ep], stdout=subprocess.PIPE,
                            text=True)
    echo.stdout.readline()
    try:
        with Client(endpoint, timeout=600) as c:
            r["device"] = status.get("device_name")
            r["lmx"] = lmx_decode(c, model, n_ctx, n_predict, repeats)
        r["rtt"] = {"broker": {}, "echo": {}}
        for n in (1, 100):
            r["rtt"]["broker"][str(n)] = round_trips(endpoint, n, rtt_requests)
            r["rtt"]["echo"][str(n)] = round_trips(echo_ep, n, rtt_requests)
    finally:
        broker.terminate()
        echo.kill()
        broker.wait(60)
    r["park"] = park_restore(model, state_tokens, gpu, threads)
    rows = figures(r)
    r["figures"] = [{"figure": f, "value": v, "goal": g, "pass": p} for f, v, g, p in rows]
    benchlib.dump(r, os.path.join(out_dir, "results.json"))
    lines = [f"device: {r['device']} ({'GPU' if gpu else 'CPU'}), model {r['model']}, "
             f"n_ctx {n_ctx}, {r['env']['date']}", "",
             "| figure | value | goal | met |", "| --- | ---: | --- | --- |"]
    lines += [f"| {f} | {v:.3f} | {g} | {'yes' if p else 'NO'} |" for f, v, g, p in rows]
    lines += ["", f"raw: load {r['raw']['load_s']:.3f} s, {r['raw']['tok_s']:.1f} tok/s; lmx: "
              f"REGISTER {r['lmx']['register_s']:.3f} s, {r['lmx']['tok_s']:.1f} tok/s; state "
              f"{r['park']['state_bytes'] / 2**20:.1f} MiB ({r['park']['tokens']} tokens, pinned="
              f"{r['park']['pinned']}): save {r['park']['save_gbps']:.1f} GB/s, restore "
              f"{r['park']['restore_gbps']:.1f} GB/s, copy d2h {r['park']['ref_d2h_gbps']:.1f} / "
              f"h2d {r['park']['ref_h2d_gbps']:.1f} GB/s ({r['park']['ref']})"]
    for n in ("1", "100"):
        b, e = r["rtt"]["broker"][n], r["rtt"]["echo"][n]
        lines.append(f"STATUS at {n} agents: lmx {b['rps']:.0f}/s p50 {b['p50_ms']:.3f} ms p99 "
                     f"{b['p99_ms']:.3f} ms; raw echo {e['rps']:.0f}/s p50 {e['p50_ms']:.3f} ms "
                     f"p99 {e['p99_ms']:.3f} ms")
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "table.md"), "w") as fh:
        fh.write(text + "\n")
    click.echo(text)


if __name__ == "__main__":
    main()

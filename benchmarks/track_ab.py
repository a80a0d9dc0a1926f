#!/usr/bin/env python3
r"""Track A vs Track B: three agents' models on one emulated card, without and with lmx.

Track A starts three independent llama-cpp-python processes (all layers on the GPU), one after
another, and records who survives and the error text of those that die. Track B runs
lmx-broker on the same card and REGISTERs the same three models: first at the same context
(what it admits, what it refuses and with which numbers, and whether a q8_0 KV cache gets a
refused agent in), then at a context agents really use; every admitted agent DECODEs.
Track B with parking (on by default; --no-parking skips it; the code is in track_parking.py)
runs a broker with --admit-by-parking at --parking-n-ctx (default --n-ctx, the seed's 172032),
f16 then q8_0 KV: the three agents are registered (one parks others to get in when they do not
fit together) and served round-robin, --rounds (2) times each, one streamed request at a time.
Per request: the agent's residence when asked (LIST), the make-live time (sent to first token;
the broker's queue_ms and the worker's swap_ms, its context build plus restore), what it parked,
whether it restored its state, a refusal's numbers, the ledger after it (STATUS). Per KV type
a table: agent, served in round 1 / 2, make-live ms, allocated / cap. Per-process device memory
is sampled throughout (NVML; RSS on CPU) and drawn as one PNG, a panel per track; the parking
panel marks each KV phase's registration and rounds.

    # GPU: a ballast leaves --card bytes free on the real card
    python benchmarks/track_ab.py --models a.gguf --models b.gguf --models c.gguf \
        --n-ctx 172032 --card 8GiB --out DIR
    # CPU (CI's tiny mode): no ballast; the broker's declared size is --card (the parking
    # broker's is --parking-card, small enough that the tiny models must park)
    python benchmarks/track_ab.py --cpu --models ... --n-ctx 2048 --alt-n-ctx 512 --card 256MiB \
        --parking-n-ctx 16384 --parking-card 76MiB --out DIR
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import click

import benchlib
import track_parking
from lmx.common.client import Client
from lmx.common.config import parse_size

RAW = r"""
import sys
from llama_cpp import Llama
model, n_ctx, fa, gpu = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
try:
    llm = Llama(model_path=model, n_ctx=n_ctx, n_gpu_layers=-1 if gpu else 0, flash_attn=fa,
                n_threads=2, verbose=True)
    llm.create_completion("Hello", max_tokens=4, temperature=0.0)
    print("ALIVE", flush=True)
except Exception as exc:
    print("DIED", repr(exc), flush=True)
    sys.exit(1)
sys.stdin.read()
"""


def track_a(models, n_ctx, fa, gpu, watch, folder):
    """Start the raw processes one after another; keep survivors until all have tried."""
    procs, rows = [], []
    for model in models:
        err_path = os.path.join(folder, f"raw-{os.path.basename(model)}.log")
        with open(err_path, "w") as err:
            p = subprocess.Popen([sys.executable, "-c", RAW, model, str(n_ctx), str(int(fa)),
                                  str(int(gpu))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=err, text=True)
        watch.watch(p.pid, f"A: {os.path.basename(model)}")
        line = p.stdout.readline().strip()
        alive = line == "ALIVE"
        if not alive:
            p.wait(60)
        text = open(err_path, errors="replace").read().splitlines()
        errors = [ln for ln in text if any(w in ln.lower() for w in
                                           ("error", "fail", "out of memory", "unable"))]
        rows.append({"model": os.path.basename(model), "pid": p.pid, "survived": alive,
                     "result": line, "errors": errors[-4:]})
        procs.append(p)
        time.sleep(1.0)
    time.sleep(1.0)
    for p in procs:
        if p.poll() is None:
            p.stdin.close()
            p.wait(60)
    return rows


def _call(c, verb, **fields):
    r = c.call(verb, **fields)
    keep = ("status", "code", "reason", "message", "booked_bytes", "model_booked_bytes",
            "ledger_max_bytes", "ledger_allocated_bytes", "requested_bytes", "freeable_bytes",
            "generated_tokens",
            "elapsed_ms", "kv_swap_evicted", "kv_swap_parked", "kv_swap_restored",
            "context_reset", "estimate_source")
    return {k: r[k] for k in keep if k in r}


def track_b(models, n_ctx, alt_n_ctx, gpu, card, watch, folder):
    """lmx-broker on the same card: register at both contexts, decode, record every reply."""
    log = open(os.path.join(folder, "broker.log"), "w")
    broker, endpoint, status = benchlib.start_broker(
        folder, models, *([] if gpu else ["--cpu", "--vram-total", str(card), "--threads", "2"]),
        stderr=log)
    out = {"n_ctx": n_ctx, "alt_n_ctx": alt_n_ctx, "phases": []}
    try:
        with Client(endpoint, timeout=600) as c:
            watch.watch(status["worker_pid"], "B: lmx-worker")
            out["cap"] = {k: status[k] for k in ("ledger_max_bytes", "ledger_percent_cap_bytes",
                                                  "external_bytes", "device_total_bytes")}
            for ctx, kv in ((n_ctx, "f16"), (n_ctx, "q8_0"), (alt_n_ctx, "f16")):
                out["phases"].append(_phase(c, models, ctx, kv))
            out["final_status"] = {k: status.get(k) for k in ("device_name", "device_kind")}
    finally:
        broker.terminate()
        broker.wait(60)
    return out


def _phase(c, models, n_ctx, kv):
    """REGISTER every model with this KV type, DECODE each admitted one, UNREGISTER."""
    phase = {"n_ctx": n_ctx, "kv": kv, "agents": []}
    for i, model in enumerate(models):
        agent = f"{os.path.basename(model).split('.')[0]}-{kv}-{n_ctx}"
        fields = {"agent": agent, "model": model, "n_ctx": n_ctx}
        if kv != "f16":
            fields.update(type_k=kv, type_v=kv)
        reg = _call(c, "REGISTER", **fields)
        row = {"agent": agent, "register": reg}
        if reg["status"] == "ok":
            row["decode"] = _call(c, "DECODE", agent=agent, prompt="Hello, my name is",
                                  n_predict=16)
        phase["agents"].append(row)
    s = c.call("STATUS")
    phase["ledger_allocated_bytes"] = s["ledger_allocated_bytes"]
    phase["worker_process_bytes"] = s.get("worker_process_bytes")
    for row in phase["agents"]:
        if row["register"]["status"] == "ok":
            c.call("UNREGISTER", agent=row["agent"])
    return phase


@click.command()
@click.option("--models", multiple=True, type=click.Path(exists=True))
@click.option("--n-ctx", default=172032, show_default=True)
@click.option("--alt-n-ctx", default=8192, show_default=True)
@click.option("--card", default="8GiB", show_default=True, help="The emulated card size.")
@click.option("--flash-attn/--no-flash-attn", default=True, show_default=True,
              help="For Track A's raw processes (lmx's default is on).")
@click.option("--parking/--no-parking", default=True, show_default=True,
              help="Also run Track B with --admit-by-parking (round-robin at --n-ctx).")
@click.option("--rounds", default=2, show_default=True, help="Round-robin turns per agent.")
@click.option("--parking-n-ctx", default=None, type=int,
              help="The parking track's context [default: --n-ctx].")
@click.option("--parking-card", default=None,
              help="CPU only: the parking broker's declared size [default: --card] (tiny "
              "models need a smaller card than the other tracks to have to park).")
@click.option("--cpu", is_flag=True, help="No GPU: no ballast, RSS instead of NVML.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--replot", is_flag=True, help="Only redraw OUT/tracks.png from OUT/results.json.")
def main(models, n_ctx, alt_n_ctx, card, flash_attn, parking, rounds, parking_n_ctx,
         parking_card, cpu, out_dir, replot):
    """Run Track A, then Track B, and write results.json and tracks.png to --out."""
    if replot:
        with open(os.path.join(out_dir, "results.json")) as fh:
            result = json.load(fh)
        draw(result, os.path.join(out_dir, "tracks.png"))
        summary(result)
        return
    if len(models) != 3:
        raise click.UsageError("give three --models")
    os.makedirs(out_dir, exist_ok=True)
    card = parse_size(card)
    folder = tempfile.mkdtemp(prefix="lmx-ab-")
    handle = None if cpu else benchlib.nvml_handle()
    gpu = handle is not None
    ballast = None
    result = {"env": benchlib.env_info(), "card_bytes": card, "gpu": gpu, "n_ctx": n_ctx,
              "models": [os.path.basename(m) for m in models]}
    if gpu:
        import pynvml
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        result["device"] = {"name": pynvml.nvmlDeviceGetName(handle), "total": info.total,
                            "free_before": info.free}
        ballast = benchlib.start_ballast(handle, card)
        result["device"]["free_after_ballast"] = pynvml.nvmlDeviceGetMemoryInfo(handle).free
    watch = benchlib.MemWatch(handle)
    if ballast is not None:
        watch.watch(ballast.pid, "ballast")
    watch.start()
    try:
        a0 = watch.mark()
        result["track_a"] = track_a(models, n_ctx, flash_attn, gpu, watch, folder)
        a1 = watch.mark()
        time.sleep(1.0)
        b0 = watch.mark()
        result["track_b"] = track_b(models, n_ctx, alt_n_ctx, gpu, card, watch, folder)
        b1 = watch.mark()
        if parking:
            time.sleep(1.0)
            p0 = watch.mark()
            result["track_p"] = track_parking.track_p(models, parking_n_ctx or n_ctx, rounds, gpu,
                                        parse_size(parking_card) if parking_card else card,
                                        watch, folder)
            result["phases_s"] = {"p": [p0, watch.mark()]}
    finally:
        watch.stop()
        if ballast is not None:
            ballast.stdin.close()
            ballast.wait(60)
    result["samples"] = watch.series()
    result["phases_s"] = dict(result.get("phases_s", {}), a=[a0, a1], b=[b0, b1])
    benchlib.dump(result, os.path.join(out_dir, "results.json"))
    draw(result, os.path.join(out_dir, "tracks.png"))
    summary(result)


def draw(result, path):
    """The PNG: one panel per track, one line per process (needs matplotlib)."""
    try:
        series = {k: v for k, v in result["samples"].items() if k != "ballast"}
        ph, card = result["phases_s"], result["card_bytes"] if result["gpu"] else None
        panels = [("Track A: independent llama-cpp-python processes", series, ph["a"]),
                  ("Track B: lmx-broker (one worker)", series, ph["b"])]
        if "p" in ph:
            panels.append(("Track B, --admit-by-parking: round-robin, f16 then q8_0 KV",
                           series, ph["p"], result["track_p"].get("marks", [])))
        benchlib.plot(panels, path,
                      "device MiB (NVML)" if result["gpu"] else "RSS MiB", card)
    except ImportError:
        click.echo("track_ab: matplotlib missing; no PNG (rerun with --replot)", err=True)


def summary(r):
    click.echo(f"card {r['card_bytes'] / 2**30:.2f} GiB, n_ctx {r['n_ctx']}, gpu={r['gpu']}")
    for row in r["track_a"]:
        click.echo(f"A {row['model']:28} {'survived' if row['survived'] else 'DIED'} "
                   f"{'; '.join(row['errors'][-2:])[:160]}")
    for ph in r["track_b"]["phases"]:
        for row in ph["agents"]:
            reg = row["register"]
            verdict = "admitted" if reg["status"] == "ok" else \
                f"refused {reg.get('code')}/{reg.get('reason')} requested={reg.get('requested_bytes')} " \
                f"allocated={reg.get('ledger_allocated_bytes')} max={reg.get('ledger_max_bytes')}"
            dec = row.get("decode", {})
            click.echo(f"B n_ctx={ph['n_ctx']:6} kv={ph['kv']:5} {row['agent'][:30]:30} {verdict}"
                       f"{'  decoded ' + str(dec.get('generated_tokens')) if dec else ''}")
    for line in track_parking.summary_lines(r.get("track_p", {})):
        click.echo(line)

if __name__ == "__main__":
    main()

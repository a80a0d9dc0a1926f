#!/usr/bin/env python3
"""Several devices (issue 15): one broker, two emulated cards, four models, one worker killed.

    # GPU (two H200s): a ballast on each GPU leaves --card bytes free there
    python benchmarks/devices_x2.py --gpus 0,1 --card 8GiB --models A.gguf --models B.gguf \\
        --models C.gguf --models D.gguf --n-ctx 8192 --agents-per-model 2 --tokens 1024 --out DIR
    # CPU (CI's tiny mode): as many declared devices of --card bytes as --gpus names; RSS
    python benchmarks/devices_x2.py --cpu --card 256MiB --models ... --n-ctx 4096 --out DIR

1. REGISTER --agents-per-model agents of every model, models in turn, with no device (placement
   decides), one agent of the first model pinned to the last device, and one at --refuse-n-ctx
   that fits nowhere (its refusal lists each device's reason); every device's ledger is read
   after each REGISTER.
2. Every agent streams one DECODE at once, on its own socket, while each device's memory is
   sampled (NVML per process and the card's bytes in use; RSS on CPU). Once every agent has its
   first token, the worker of --kill-device is SIGKILLed. Recorded: who got WORKER_LOST (it
   must be exactly that device's agents), the other devices' streams through the kill (tokens,
   the largest gap around it), the killed device's ledger once its worker is gone (seats
   released, weights kept), its worker's states until a new one is ready, and how long that took.
3. The lost agents decode again on the respawned device (lmx keeps them registered and rebuilds
   them, so a REGISTER of one answers AGENT_EXISTS and its next DECODE says context_reset), and a
   fresh agent pinned there is admitted and decodes.

results.json, devices.md (the tables and the verdicts) and devices.png (per device: memory over
time with the card dashed and the kill marked; every agent's tokens over time) go to --out.
With one device (--gpus 0) the script runs what one device allows and says what it did not.
"""
import os
import signal
import tempfile
import threading
import time

import click

import benchlib
import devices_report as report
from lmx.common.client import Client
from lmx.common.config import parse_size
from lmx.common.errors import LmxError

PROMPT = "Once upon a time, {agent} said"
T0 = time.monotonic()
CARD = -1                         # the pseudo pid of a GPU's "card in use" series


def now():
    """Seconds since the script started: one clock for samples, tokens and the kill."""
    return round(time.monotonic() - T0, 4)


class DeviceWatch(benchlib.MemWatch):
    """One device's memory on the script's clock; on a GPU also the emulated card's bytes in use
    (its free bytes once the ballast held the rest, minus its free bytes now: every process)."""

    def __init__(self, handle, baseline_free=None):
        super().__init__(handle, 0.05)
        self.t0, self.baseline = T0, baseline_free
        if baseline_free is not None:
            self.watch(CARD, "card in use (NVML)")

    def _read(self):
        out = super()._read()
        if self.baseline is not None:
            import pynvml
            out[CARD] = self.baseline - pynvml.nvmlDeviceGetMemoryInfo(self.handle).free
        return out


class Stream(threading.Thread):
    """One agent's streamed DECODE on its own socket (sockets never cross threads): each
    token's arrival time, then the final reply or the error's code."""

    def __init__(self, endpoint, agent, tokens):
        super().__init__(daemon=True)
        self.endpoint, self.agent, self.tokens = endpoint, agent, tokens
        self.times, self.reply, self.error = [], None, None
        self.first = threading.Event()

    def run(self):
        try:
            with Client(self.endpoint, timeout=600) as c:
                for r in c.decode_stream(self.agent, PROMPT.format(agent=self.agent),
                                         self.tokens):
                    if r["status"] == "partial":
                        self.times.append(now())
                        self.first.set()
                    else:
                        self.reply = r
        except LmxError as err:
            self.error = {"code": err.code, "message": err.message}
        finally:
            self.first.set()      # one that ends without a token must not hold the kill back


class LedgerWatch(threading.Thread):
    """Every device's ledger (allocated bytes) over time, from STATUS on its own socket: the
    ledger's line next to the memory it stands for."""

    def __init__(self, endpoint, interval=0.1):
        super().__init__(daemon=True)
        self.endpoint, self.interval = endpoint, interval
        self.series, self.stop_flag = {}, threading.Event()

    def run(self):
        with Client(self.endpoint, timeout=60) as c:
            while not self.stop_flag.wait(self.interval):
                for d in c.request("STATUS")["devices"]:
                    self.series.setdefault(d["device"], []).append(
                        (now(), d["ledger_allocated_bytes"]))

    def stop(self):
        self.stop_flag.set()
        self.join()


def ledgers(c):
    """Every device's ledger as STATUS shows it: seats are the bookings that are neither
    weights nor the worker's own overhead."""
    return [{"device": d["device"], "name": d["name"], "state": d["worker_state"],
             "pid": d["worker_pid"], "restarts": d["worker_restarts"],
             "allocated": d["ledger_allocated_bytes"], "cap": d["ledger_max_bytes"],
             "models": [os.path.basename(m) for m in d["models"]], "agents": d["agents"],
             "seats": sorted(k for k in d["bookings"]
                             if not k.startswith(("model:", "worker:")))}
            for d in c.request("STATUS")["devices"]]


def _short(model):
    return os.path.basename(model).rsplit(".gguf", 1)[0][:40]


def register(c, agent, model, n_ctx, device=None):
    """One REGISTER (pinned when device is given): where it went or why not, then the ledgers."""
    fields = {"agent": agent, "model": model, "n_ctx": n_ctx}
    if device is not None:
        fields["device"] = device
    r = c.call("REGISTER", **fields)
    row = {"agent": agent, "model": os.path.basename(model), "n_ctx": n_ctx, "pinned": device,
           "status": r["status"]}
    if r["status"] == "ok":
        row.update(device=r["device"], booked_bytes=r["booked_bytes"],
                   model_booked_bytes=r.get("model_booked_bytes"))
    else:
        keep = ("device", "reason", "requested_bytes", "ledger_allocated_bytes",
                "ledger_max_bytes", "weights_loaded", "worker_state")
        row.update(code=r.get("code"), reason=r.get("reason"), message=r.get("message"),
                   devices=[{k: d.get(k) for k in keep} for d in r.get("devices", [])])
    row["ledgers"] = ledgers(c)
    return row


def register_all(c, models, n_ctx, per_model, n_devices, refuse_n_ctx):
    """Agents of every model in turn (placement decides), one pinned, one that fits nowhere."""
    rows = [register(c, f"{_short(m)}-{k}", m, n_ctx) for k in range(per_model) for m in models]
    rows.append(register(c, f"{_short(models[0])}-pinned", models[0], n_ctx, n_devices - 1))
    big = register(c, f"{_short(models[0])}-toobig", models[0], refuse_n_ctx)
    if big["status"] == "ok":                    # it fit: say so, and keep it out of the rest
        c.call("UNREGISTER", agent=big["agent"])
        big["note"] = "admitted, not refused: raise --refuse-n-ctx"
    rows.append(big)
    return rows


def _await_respawn(c, dev, old_pid, t_kill, deadline_s=300):
    """The killed device's ledger once its worker is gone, then its worker's states until a
    new worker is ready (STATUS polled with a deadline)."""
    after = ledgers(c)[dev]
    after["t"] = now()
    trace = [[after["t"], after["state"]]]
    deadline = time.monotonic() + deadline_s
    while True:
        d = ledgers(c)[dev]
        if d["state"] != trace[-1][1]:
            trace.append([now(), d["state"]])
        if d["state"] == "ready" and d["pid"] not in (None, old_pid):
            return {"after_loss": after, "states": trace, "respawned_pid": d["pid"],
                    "ready_s": round(now() - t_kill, 3), "restarts": d["restarts"]}
        if time.monotonic() > deadline:
            raise RuntimeError(f"device {dev}'s worker not back within {deadline_s} s")
        time.sleep(0.05)


def _stream_row(s, device, t_kill):
    """What one agent's stream did, with its token gaps around the kill."""
    times = s.times
    pairs = list(zip(times, times[1:]))
    gaps = [b - a for a, b in pairs]
    around = [b - a for a, b in pairs if b >= t_kill - 0.5 and a <= t_kill + 2.0]
    row = {"device": device, "tokens_streamed": len(times), "times": times,
           "tokens_after_kill": sum(t > t_kill for t in times),
           "median_gap_ms": round(benchlib.median(gaps) * 1000, 2) if gaps else None,
           "max_gap_around_kill_ms": round(max(around) * 1000, 2) if around else None}
    if s.reply is not None:
        row.update(status="ok", generated_tokens=s.reply["generated_tokens"],
                   stopped_by=s.reply["stopped_by"], stopped_on_eos=s.reply["stopped_on_eos"])
    else:
        row.update(status="error", **(s.error or {"code": None}))
    return row


def decode_and_kill(endpoint, c, tokens, kill_dev, watch_new):
    """Every agent streams at once; kill_dev's worker is SIGKILLed once each has its first
    token (awaited); then the lost ones' errors, the respawn and the others' ends."""
    where = {a["agent"]: a["device"] for a in c.list_agents()}
    streams = {a: Stream(endpoint, a, tokens) for a in sorted(where)}
    for s in streams.values():
        s.start()
    for s in streams.values():
        if not s.first.wait(600):
            raise RuntimeError(f"{s.agent}: no token within 600 s")
    pid = ledgers(c)[kill_dev]["pid"]
    t_kill = now()
    os.kill(pid, signal.SIGKILL)
    for a in (a for a, d in where.items() if d == kill_dev):
        streams[a].join(600)
    respawn = _await_respawn(c, kill_dev, pid, t_kill)
    watch_new(kill_dev, respawn["respawned_pid"])
    for s in streams.values():
        s.join(900)
    return {"kill": {"device": kill_dev, "pid": pid, "t": t_kill}, "placement": where,
            "agents": {a: _stream_row(s, where[a], t_kill) for a, s in streams.items()},
            "respawn": respawn}


def recover(c, dev, lost, models, n_ctx, n_predict, deadline_s=300):
    """The lost agents, rebuilt by lmx, decode again on the respawned device; REGISTER of one
    says it is still registered; a fresh agent pinned there is admitted and decodes."""
    deadline = time.monotonic() + deadline_s
    while not all(a["state"] == "ready" for a in c.list_agents() if a["agent"] in lost):
        if time.monotonic() > deadline:
            raise RuntimeError(f"lost agents not rebuilt within {deadline_s} s")
        time.sleep(0.05)
    out = {"rebuilt_s": now(), "agents": {}}
    if lost:
        again = c.call("REGISTER", agent=lost[0], model=models[lost[0]], n_ctx=n_ctx)
        out["register_again"] = {"agent": lost[0], "status": again["status"],
                                 "code": again.get("code")}
    for a in lost:
        r = c.call("DECODE", agent=a, prompt="And then", n_predict=n_predict)
        out["agents"][a] = {"status": r["status"], "code": r.get("code"),
                            "generated_tokens": r.get("generated_tokens"),
                            "context_reset": r.get("context_reset")}
    fresh = register(c, f"fresh-on-{dev}", next(iter(models.values())), n_ctx, dev)
    if fresh["status"] == "ok":
        r = c.call("DECODE", agent=fresh["agent"], prompt="Hello", n_predict=n_predict)
        fresh["decode"] = {"status": r["status"], "generated_tokens": r.get("generated_tokens")}
    out["fresh"] = fresh
    where = {a["agent"]: a["device"] for a in c.list_agents()}
    for a, row in out["agents"].items():
        row["device"] = where.get(a)
    out["ledgers"] = ledgers(c)
    return out


def open_cards(gpus, card):
    """A ballast on each GPU leaving `card` bytes free there; NVML handles and figures."""
    import pynvml
    cards = []
    try:
        for g in gpus:
            handle = benchlib.nvml_handle(g)
            if handle is None:
                raise click.ClickException(f"NVML sees no GPU {g} (use --cpu without a GPU)")
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            cards.append({"gpu": g, "handle": handle, "name": pynvml.nvmlDeviceGetName(handle),
                          "total": info.total, "free_before": info.free})
            cards[-1]["ballast"] = benchlib.start_ballast(handle, card, gpu=g)
            cards[-1]["free_after_ballast"] = pynvml.nvmlDeviceGetMemoryInfo(handle).free
    except BaseException:
        close_cards(cards)
        raise
    return cards


def close_cards(cards):
    for card in cards:
        if card.get("ballast") is not None:
            card["ballast"].stdin.close()
            card["ballast"].wait(60)


def run_broker(o, card, watches, out_dir):
    """The broker on the devices, and the three steps against it."""
    gpus, models = o["gpus"], o["models"]
    args = ["--max-agents-per-client", "1024"]
    if o["cpu"]:
        args += ["--cpu", "--threads", str(o["threads"]), *sum(
            (["--vram-total", str(card)] for _ in gpus), [])]
    else:
        args += ["--gpus", ",".join(map(str, gpus))]
    with open(os.path.join(out_dir, "broker.log"), "w") as log:
        broker, endpoint, _ = benchlib.start_broker(
            tempfile.mkdtemp(prefix="lmx-devx2-"), models, *args, stderr=log)
    books = LedgerWatch(endpoint)
    books.start()
    try:
        with Client(endpoint, timeout=600) as c:
            out = {"start": ledgers(c)}
            for w, d in zip(watches, out["start"]):
                w.watch(d["pid"], f"worker pid {d['pid']}")
            out["register"] = register_all(c, models, o["n_ctx"], o["agents_per_model"],
                                           len(gpus), o["refuse_n_ctx"])
            out["decode"] = decode_and_kill(
                endpoint, c, o["tokens"], o["kill_device"],
                lambda dev, pid: watches[dev].watch(pid, f"worker pid {pid} (respawned)"))
            by_agent = {r["agent"]: r["model"] for r in out["register"] if r["status"] == "ok"}
            paths = {a: next(m for m in models if os.path.basename(m) == b)
                     for a, b in by_agent.items()}
            lost = sorted(a for a, d in out["decode"]["placement"].items()
                          if d == o["kill_device"])
            out["recover"] = recover(c, o["kill_device"], lost, paths, o["n_ctx"],
                                     min(o["tokens"], 32))
    finally:
        books.stop()
        broker.terminate()
        broker.wait(60)
    out["ledger_samples"] = books.series
    return out


@click.command()
@click.option("--gpus", default="0,1", show_default=True, help="GPU indices (NVML), a worker "
              "and a ballast each; with --cpu, one declared device per index.")
@click.option("--card", default="8GiB", show_default=True, help="The emulated card per device.")
@click.option("--models", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="GGUF paths (repeat; the issue's run gives four).")
@click.option("--n-ctx", default=8192, show_default=True)
@click.option("--agents-per-model", default=2, show_default=True)
@click.option("--tokens", default=1024, show_default=True, help="n_predict of each stream.")
@click.option("--refuse-n-ctx", default=1 << 20, show_default=True,
              help="n_ctx of the agent (first model) that should fit no device.")
@click.option("--kill-device", default=0, show_default=True, help="Whose worker is killed.")
@click.option("--cpu", is_flag=True, help="No GPU: declared devices, RSS instead of NVML.")
@click.option("--threads", default=1, show_default=True, help="--cpu: threads per worker.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--replot", is_flag=True, help="Only redraw from OUT/results.json.")
def main(**o):
    """Run the three steps; write results.json, devices.md and devices.png to --out."""
    out_dir = o["out_dir"]
    if o["replot"]:
        report.write(benchlib.load(os.path.join(out_dir, "results.json")), out_dir)
        return
    try:
        o["gpus"] = [int(g) for g in o["gpus"].split(",")]
    except ValueError:
        raise click.UsageError("--gpus takes indices like 0,1") from None
    if not o["models"] or not 0 <= o["kill_device"] < len(o["gpus"]):
        raise click.UsageError("give --models, and a --kill-device among the devices")
    if len(o["gpus"]) == 1:
        click.echo("devices_x2: one device: NOT RUN: placement across devices, pinning to "
                   "another device, another device decoding through the kill", err=True)
    os.makedirs(out_dir, exist_ok=True)
    card = parse_size(o["card"])
    cards = [] if o["cpu"] else open_cards(o["gpus"], card)
    watches = [DeviceWatch(k["handle"], k["free_after_ballast"]) for k in cards] or \
        [DeviceWatch(None) for _ in o["gpus"]]
    result = {"env": benchlib.env_info(), "gpu": not o["cpu"], "card_bytes": card,
              "gpus": o["gpus"], "models": [os.path.basename(m) for m in o["models"]],
              "cards": [{k: v for k, v in c.items() if k not in ("handle", "ballast")}
                        for c in cards],
              **{k: o[k] for k in ("n_ctx", "agents_per_model", "tokens", "refuse_n_ctx")}}
    for w in watches:
        w.start()
    try:
        result.update(run_broker(o, card, watches, out_dir))
    finally:
        for w in watches:
            w.stop()
        close_cards(cards)
    result["samples"] = [w.series() for w in watches]
    report.write(result, out_dir)


if __name__ == "__main__":
    main()

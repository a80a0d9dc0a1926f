#!/usr/bin/env python3
"""Soak: simulated agents doing random REGISTER, DECODE and UNREGISTER against one broker.

    python benchmarks/soak.py --agents 100 --seconds 60 --model M.gguf [--model N.gguf] --out DIR

Each agent is a thread with its own client; it registers on a random model, decodes a few
tokens a few times, unregisters, and starts over, until the time is up (every request has a
timeout, the loop is bounded). At the end it reports requests served, errors by code, and the
broker's and worker's RSS and open file descriptors and the ledger before and after; it exits
non-zero if the ledger does not return to its starting point or descriptors leaked.
CANCEL is not in the mix: the verb does not exist yet (issue 5).
"""
import collections
import json
import os
import random
import sys
import tempfile
import threading
import time

import click

import benchlib
from lmx.common.client import Client, LmxTimeout


def proc_stats(pid):
    """RSS bytes and open file descriptors of a process."""
    rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return {"rss_bytes": rss, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def snapshot(c, broker_pid):
    s = c.request("STATUS")
    return {"ledger_allocated_bytes": s["ledger_allocated_bytes"], "agents": s["agents"],
            "bookings": s["bookings"], "broker": proc_stats(broker_pid),
            "worker": proc_stats(s["worker_pid"]), "queue_depth": s["queue_depth"]}


def agent_loop(i, endpoint, models, deadline, counts, lock, seed):
    rng = random.Random(seed + i)
    name = f"soak-{i}"
    with Client(endpoint, timeout=60) as c:
        registered = False
        while time.monotonic() < deadline:
            if not registered:
                verb, fields = "REGISTER", {"agent": name, "model": rng.choice(models),
                                            "n_ctx": rng.choice([256, 512, 1024])}
            elif rng.random() < 0.25:
                verb, fields = "UNREGISTER", {"agent": name}
            else:
                verb, fields = "DECODE", {"agent": name, "prompt": f"step {rng.random():.3f}",
                                          "n_predict": rng.randint(1, 4)}
            try:
                reply = c.call(verb, **fields)
                key = "ok" if reply["status"] == "ok" else reply["code"]
                if verb == "REGISTER" and reply["status"] == "ok":
                    registered = True
                elif verb == "UNREGISTER" and reply["status"] == "ok":
                    registered = False
                elif reply.get("code") in ("CONTEXT_FULL", "UNKNOWN_AGENT"):
                    if c.call("UNREGISTER", agent=name)["status"] == "ok":
                        registered = False
            except LmxTimeout:
                key = "TIMEOUT"
            with lock:
                counts[f"{verb} {key}"] += 1
        if registered:
            c.call("UNREGISTER", agent=name)


def sample(out, broker_pid, worker_pid, until):
    """(t, broker RSS, worker RSS) every half second while the soak runs."""
    while time.monotonic() < until:
        try:
            out.append((time.monotonic(), proc_stats(broker_pid)["rss_bytes"],
                        proc_stats(worker_pid)["rss_bytes"]))
        except OSError:
            pass
        time.sleep(0.5)


def quarters(rss):
    """Peak broker and worker RSS (MiB) in each quarter of the run: growth shows as a rising row."""
    if len(rss) < 4:
        return {}
    n = len(rss)
    parts = [rss[i * n // 4:(i + 1) * n // 4] for i in range(4)]
    return {"broker": [round(max(p[1] for p in q) / 2**20, 1) for q in parts],
            "worker": [round(max(p[2] for p in q) / 2**20, 1) for q in parts]}


@click.command()
@click.option("--agents", default=100, show_default=True)
@click.option("--seconds", default=60.0, show_default=True)
@click.option("--model", "models", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--cpu", is_flag=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False))
def main(agents, seconds, models, cpu, seed, out_dir):
    """Run the soak and print its report (JSON)."""
    models = [os.path.abspath(m) for m in models]
    broker, endpoint, _ = benchlib.start_broker(
        tempfile.mkdtemp(prefix="lmx-soak-"), models, "--max-agents-per-client", "4",
        *(["--cpu", "--threads", "2"] if cpu else []))
    counts, lock = collections.Counter(), threading.Lock()
    try:
        with Client(endpoint, timeout=60) as c:
            before = snapshot(c, broker.pid)
            worker_pid = c.request("STATUS")["worker_pid"]
            t0 = time.monotonic()
            rss = []
            sampler = threading.Thread(target=sample, args=(rss, broker.pid, worker_pid,
                                                            t0 + seconds), daemon=True)
            sampler.start()
            threads = [threading.Thread(target=agent_loop, args=(i, endpoint, models,
                                                                 t0 + seconds, counts, lock,
                                                                 seed)) for i in range(agents)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(seconds + 120)
            elapsed = time.monotonic() - t0
            time.sleep(0.5)
            after = snapshot(c, broker.pid)
    finally:
        broker.terminate()
        broker.wait(60)
    served = sum(counts.values())
    report = {"agents": agents, "seconds": round(elapsed, 1), "requests": served,
              "requests_per_s": round(served / elapsed, 1),
              "by_outcome": dict(sorted(counts.items())), "before": before, "after": after,
              "ledger_back_to_start": after["ledger_allocated_bytes"] ==
              before["ledger_allocated_bytes"] and after["agents"] == 0,
              "broker_fds_delta": after["broker"]["fds"] - before["broker"]["fds"],
              "worker_fds_delta": after["worker"]["fds"] - before["worker"]["fds"],
              "broker_rss_delta_mib": round((after["broker"]["rss_bytes"] -
                                             before["broker"]["rss_bytes"]) / 2**20, 1),
              "worker_rss_delta_mib": round((after["worker"]["rss_bytes"] -
                                             before["worker"]["rss_bytes"]) / 2**20, 1),
              "rss_mib_by_quarter": quarters(rss)}
    text = json.dumps(report, indent=1)
    click.echo(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "soak.json"), "w") as fh:
            fh.write(text)
    ok = report["ledger_back_to_start"] and abs(report["broker_fds_delta"]) <= 2 and \
        abs(report["worker_fds_delta"]) <= 2 and "TIMEOUT" not in " ".join(counts)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What `lmx-broker --metrics` costs: the same load on a broker with metrics and one without,
in one run, printed as ratios (goal >= 0.97 of both). Each round measures off, on, on, off
(then on, off, off, on), so drift (a growing conversation, other load) hits both alike; the
ratio is the median of the rounds' ratios.

- STATUS round trips/s: one client sending STATUS back to back for --seconds;
- DECODE tokens/s seen by the client (wall time of the request), plain and streamed (a streamed
  run is the metered broker's busiest path: every token is an event it observes).

While the metered broker serves, a scraper reads its /metrics every --scrape-s seconds (more
often than Prometheus' usual 15 s), so the cost of collecting is in the figures.

    python benchmarks/metrics_cost.py --model M.gguf --cpu --out DIR
"""
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import click

import benchlib
from lmx.common.client import Client

PROMPT = "Once upon a time, in a small village by the sea,"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scraper(threading.Thread):
    """GET /metrics every interval seconds until stopped; counts the scrapes."""

    def __init__(self, port, interval):
        super().__init__(daemon=True)
        self.url, self.interval = f"http://127.0.0.1:{port}/metrics", interval
        self.done = threading.Event()
        self.scrapes, self.nbytes, self.seconds = 0, 0, []

    def run(self):
        while not self.done.wait(self.interval):
            t0 = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=10) as r:
                self.nbytes = len(r.read())
            self.seconds.append(time.perf_counter() - t0)
            self.scrapes += 1


def status_rate(endpoint, seconds):
    """STATUS round trips per second of one client."""
    with Client(endpoint, timeout=30) as c:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            c.request("STATUS")
            n += 1
        return n / (time.perf_counter() - t0)


def decode_rate(endpoint, agent, n_predict, stream, repeats=1):
    """Tokens per second of DECODEs continuing one conversation, by the client's clock."""
    with Client(endpoint, timeout=600) as c:
        tokens, t0 = 0, time.perf_counter()
        for _ in range(repeats):
            if stream:
                tokens += sum(1 for p in c.decode_stream(agent, " and", n_predict)
                              if p.get("status") == "partial")
            else:
                tokens += c.decode(agent, " and", n_predict)["generated_tokens"]
        return tokens / (time.perf_counter() - t0)


def observe_cost(n=100_000):
    """Microseconds one Metrics.observe takes in the loop, per kind of event (no sockets)."""
    from types import SimpleNamespace

    from lmx.broker.core.events import ClientRequest, Reply, WorkerToken
    from lmx.broker.metrics import Metrics
    metrics = Metrics(SimpleNamespace(config=SimpleNamespace(table={})))
    status = (ClientRequest(b"c", 1, "STATUS", {}, 0.0, 0.0), [Reply(b"c", 1, None, 1)])
    cases = {"status_us": lambda i: status,
             "token_us": lambda i: (WorkerToken(7, i, 1, "x", i * 1e-3), [Reply(
                 b"c", 1, {"agent": "a", "index": i, "token": 1, "text": "x",
                           "status": "partial"})])}
    out = {}
    for name, make in cases.items():
        events = [make(i) for i in range(n)]
        t0 = time.perf_counter()
        for event, actions in events:
            metrics.observe(event, actions)
        out[name] = (time.perf_counter() - t0) / n * 1e6
    return out


def start(folder, model, args, metrics_port):
    extra = ["--metrics", f"127.0.0.1:{metrics_port}"] if metrics_port else []
    proc, endpoint, _ = benchlib.start_broker(folder, [model], *args, *extra)
    with Client(endpoint, timeout=600) as c:
        c.register("bench", model, n_ctx=8192)
        c.decode("bench", PROMPT, 8)              # the context is built: warm
    return proc, endpoint


def measure(endpoint, opts):
    return {"status_rps": status_rate(endpoint, opts["seconds"]),
            "decode_tps": decode_rate(endpoint, "bench", opts["n_predict"], False),
            "stream_tps": decode_rate(endpoint, "bench", opts["n_predict"], True)}


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--cpu", is_flag=True, help="Run the workers on the CPU.")
@click.option("--threads", default=None, type=int)
@click.option("--rounds", default=5, show_default=True)
@click.option("--seconds", default=1.0, show_default=True, help="STATUS seconds per round.")
@click.option("--n-predict", default=64, show_default=True)
@click.option("--scrape-s", default=1.0, show_default=True)
@click.option("--out", default=None, type=click.Path(file_okay=False))
def main(model, cpu, threads, rounds, seconds, n_predict, scrape_s, out):
    """Metrics on against off, same run, alternating rounds."""
    opts = {"seconds": seconds, "n_predict": n_predict}
    args = ["--vram-total", "8GiB"] + (["--cpu"] if cpu else []) + (
        ["--threads", str(threads)] if threads else [])
    port = free_port()
    folder = tempfile.mkdtemp(prefix="lmx-metrics-cost-")
    os.makedirs(f"{folder}/off"), os.makedirs(f"{folder}/on")
    brokers = {"off": start(f"{folder}/off", model, args, None),
               "on": start(f"{folder}/on", model, args, port)}
    scraper = Scraper(port, scrape_s)
    scraper.start()
    runs = {"off": [], "on": []}
    try:
        for i in range(rounds):
            # ABBA within a round, the first swapped every round: drift hits both alike
            order = ("off", "on", "on", "off") if i % 2 == 0 else ("on", "off", "off", "on")
            parts = {"off": [], "on": []}
            for mode in order:
                parts[mode].append(measure(brokers[mode][1], opts))
            for mode in ("off", "on"):
                runs[mode].append({k: statistics.mean(p[k] for p in parts[mode])
                                   for k in parts[mode][0]})
                print(f"round {i + 1} {mode:3}: " + "  ".join(
                    f"{k} {v:,.1f}" for k, v in runs[mode][-1].items()), flush=True)
    finally:
        scraper.done.set()
        for proc, _ in brokers.values():
            proc.terminate()
            proc.wait(30)
    micro = observe_cost()
    print("Metrics.observe per event: " + "  ".join(f"{k} {v:.2f}" for k, v in micro.items()))
    result = summarize(runs, scraper, dict(opts, model=os.path.basename(model), cpu=cpu,
                                           rounds=rounds, scrape_s=scrape_s,
                                           argv=sys.argv[1:]), micro)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as fh:
            json.dump(result, fh, indent=1)


def summarize(runs, scraper, meta, micro):
    """Medians per mode, the on/off ratios, and the table printed."""
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
           for mode, rs in runs.items()}
    ratios = {k: statistics.median(on[k] / off[k] for on, off in zip(runs["on"], runs["off"]))
              for k in med["off"]}
    print(f"\n| metric ({meta['rounds']} rounds) | off (median) | on (median) | on / off "
          "(median of the rounds' ratios) | goal |")
    print("| --- | ---: | ---: | ---: | --- |")
    for k, ratio in ratios.items():
        print(f"| {k} | {med['off'][k]:,.1f} | {med['on'][k]:,.1f} | **{ratio:.3f}** | "
              ">= 0.97 |")
    scrape_ms = statistics.median(scraper.seconds) * 1000 if scraper.seconds else None
    print(f"\n{scraper.scrapes} scrapes of /metrics, one every {meta['scrape_s']:g} s "
          f"({scraper.nbytes:,} bytes, median {scrape_ms or 0:.2f} ms each) during the run")
    return {"meta": meta, "runs": runs, "median": med, "ratio": ratios, "observe_us": micro,
            "scrapes": scraper.scrapes, "scrape_bytes": scraper.nbytes,
            "scrape_ms_median": scrape_ms}


if __name__ == "__main__":
    main()

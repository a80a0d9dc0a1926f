#!/usr/bin/env python3
"""The broker's ledger against the device: register models, decode, compare bookings with NVML.

    python benchmarks/ledger_check.py MODEL.gguf [...] --n-ctx 4096 [-- lmx-broker args]

Starts lmx-broker (and its worker), registers one agent per model, decodes a few tokens (which
builds each context, so the worker measures it), then prints, per model and agent, the
estimate, llama.cpp's measured bytes and the booking, and the worker process's NVML usage
beside the ledger's total. Agents are swapped one live context at a time, so NVML shows the
weights of every model but only one context.
"""
import json
import tempfile
import time

import click

import benchlib
from lmx.common.client import Client


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("models", nargs=-1, required=True)
@click.option("--n-ctx", default=4096, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--broker-arg", "broker_args", multiple=True, help="Passed to lmx-broker.")
def main(models, n_ctx, as_json, broker_args):
    """Register, decode, and compare the ledger with the device."""
    proc, endpoint, _ = benchlib.start_broker(tempfile.mkdtemp(prefix="lmx-ledger-"), models,
                                              *broker_args)
    try:
        with Client(endpoint, timeout=120) as c:
            for i, m in enumerate(models):
                c.register(f"a{i}", m, n_ctx=n_ctx)
                c.decode(f"a{i}", "Hello", 4)
            time.sleep(2.5)                      # a fresh NVML reading arrives by heartbeat
            status, agents = c.request("STATUS"), c.list_agents()
    finally:
        proc.terminate()
        proc.wait(60)
    out = {"status": status, "agents": agents}
    if as_json:
        click.echo(json.dumps(out, default=str))
        return
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    click.echo(f"device: {status['device_name']} total {mib(status['device_total_bytes'])} MiB")
    click.echo("| what | estimate MiB | measured MiB | booked MiB |\n| --- | ---: | ---: | ---: |")
    for m in status["models"]:
        click.echo(f"| weights {m['path'].rsplit('/', 1)[-1]} | {mib(m['estimated_bytes'])} | "
                   f"{mib(m['measured_bytes'])} | {mib(m['booked_bytes'])} |")
    for a in agents:
        click.echo(f"| context {a['agent']} (n_ctx {a['n_ctx']}) | {mib(a['estimated_bytes'])} | "
                   f"{mib(a['measured_bytes'])} | {mib(a['booked_bytes'])} |")
    click.echo(f"\nledger allocated {mib(status['ledger_allocated_bytes'])} MiB (with "
               f"{mib(status['bookings'].get('worker:overhead'))} MiB worker overhead); "
               f"NVML: worker process {mib(status['worker_process_bytes'])} MiB, device used "
               f"{mib(status['device_used_bytes'])} MiB, others {mib(status['external_bytes'])} MiB")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The README walk, end to end, as a transcript: start lmx-broker (one live context at a time,
so every switch parks and restores), drive it with lmx-probe, then check that smol's restored
continuation equals an uninterrupted run.

    bin/walk.py                                   # CPU, the example table's smol and gemma
    bin/walk.py --smol /path/a.gguf --gemma /path/b.gguf -- --vram-total 8GiB

Arguments after `--` go to lmx-broker. Exit status 0 only if every step was as expected.
"""
import os
import subprocess
import sys
import tempfile

import click

from lmx.broker.launch import start_broker
from lmx.common.client import Client

PROMPTS = [("smol", "Hello, my name is"), ("gemma", "The capital of France is"),
           ("smol", "The weather today is")]
# the first DECODE parks gemma (registered, nothing to keep yet): one live context at a time
EXPECTED_SWAPS = [("gemma", False), ("smol", False), ("gemma", True)]


def probe(endpoint, *args):
    """Run lmx-probe like a user, echo the command and its output."""
    shown = " ".join(f'"{a}"' if " " in a else a for a in args)
    click.echo(f"$ lmx-probe --endpoint {endpoint} {shown}")
    out = subprocess.run([sys.executable, "-m", "lmx.common.probe", "--endpoint", endpoint,
                          *args], capture_output=True, text=True)
    click.echo(out.stdout.rstrip() + "\n")
    if out.returncode:
        raise SystemExit(f"walk: lmx-probe exited {out.returncode}: {out.stderr}")


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--smol", default="smol", help="Table key or path for the first agent's model.")
@click.option("--gemma", default="gemma", help="Table key or path for the second's.")
@click.option("--table", default="configs/model_vram.example.txt", show_default=True)
@click.option("--n-predict", default=24, show_default=True)
@click.option("--broker-log", type=click.File("wb"), default=None,
              help="Where the broker's log goes [default: discarded].")
@click.argument("broker_args", nargs=-1, type=click.UNPROCESSED)
def main(smol, gemma, table, n_predict, broker_log, broker_args):
    """Run the walk and print its transcript."""
    folder = tempfile.mkdtemp(prefix="lmx-walk-")
    endpoint = f"ipc://{folder}/lmx.sock"
    dirs = sorted({os.path.dirname(os.path.abspath(m)) for m in (smol, gemma) if os.sep in m})
    args = ["--vram-table", table, "--max-live-contexts", "1",     # one live: parking shows
            "--state-dir", os.path.join(folder, "state"),     # not another broker's journal
            *sum((["--model-dir", d] for d in dirs), []), *broker_args]
    click.echo(f"$ lmx-broker --endpoint {endpoint} " + " ".join(args) + " &\n")
    try:
        proc, _ = start_broker(args, endpoint, stderr=broker_log or subprocess.DEVNULL,
                               timeout=120)
    except RuntimeError as exc:
        raise SystemExit(f"walk: {exc}") from None
    try:
        probe(endpoint, "REGISTER", "smol", smol)
        probe(endpoint, "REGISTER", "gemma", gemma)
        replies = []
        with Client(endpoint) as c:
            for agent, prompt in PROMPTS:
                probe(endpoint, "DECODE", agent, str(n_predict), prompt)
            probe(endpoint, "STATUS")
            probe(endpoint, "LIST")
            probe(endpoint, "UNREGISTER", "smol")
            probe(endpoint, "UNREGISTER", "gemma")
            replies = check(c, smol, gemma, n_predict)
        click.echo("\n".join(replies))
        if any(line.startswith("FAIL") for line in replies):
            raise SystemExit(1)
    finally:
        proc.terminate()
        proc.wait(60)


def check(c, smol, gemma, n_predict):
    """Replay the walk through the client (cold start) and compare with an uninterrupted run."""
    out = []
    c.register("w-smol", smol)
    c.register("w-gemma", gemma)
    got = [c.decode(f"w-{a}", p, n_predict) for a, p in PROMPTS]
    for (agent, _), reply, (evicted, restored) in zip(PROMPTS, got, EXPECTED_SWAPS):
        swap = (reply["kv_swap_evicted"], reply["kv_swap_restored"])
        verdict = "ok" if swap == (evicted and f"w-{evicted}", restored) else "FAIL"
        out.append(f"{verdict}: w-{agent} evicted={swap[0]} restored={swap[1]} "
                   f"elapsed_ms={reply['elapsed_ms']} swap_ms={reply['swap_ms']}")
    c.register("w-ref", smol)
    c.decode("w-ref", PROMPTS[0][1], n_predict)
    ref = c.decode("w-ref", PROMPTS[2][1], n_predict)
    same = ref["tokens"] == got[2]["tokens"]
    out.append(f"{'ok' if same else 'FAIL'}: restored continuation equals an uninterrupted run "
               f"({len(ref['tokens'])} tokens)")
    for agent in ("w-smol", "w-gemma", "w-ref"):
        c.unregister(agent)
    return out


if __name__ == "__main__":
    main()

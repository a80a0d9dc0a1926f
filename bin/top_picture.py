"""Render one lmx-top frame from a real broker to SVG (the README's picture).

    python bin/top_picture.py [OUT.svg]        # default: docs/lmx-top.svg

Starts a broker with configs/model_vram.example.txt (the models under models/; fetch them with
`lmx-fetch-models models`), registers three agents with at most two live contexts (so one is
parked), decodes a little, samples STATUS and LIST twice (so tok/s has a value) and saves the
frame lmx.common.top.frame builds, 120 columns wide, with rich's save_svg.
"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from lmx.broker.launch import start_broker, stop
from lmx.common.client import Client
from lmx.common.top import Rates, frame, sample

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "configs" / "model_vram.example.txt"
PROMPT = "The three most useful things to know about a shared GPU are"


def main(out):
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/lmx.sock"
        args = ["--vram-table", str(TABLE), "--vram-total", "8GiB", "--threads", "2",
                "--state-dir", f"{tmp}/state", "--model-dir", str(ROOT / "models"),
                "--max-live-contexts", "2", "--log-level", "WARNING"]
        with open(f"{tmp}/broker.log", "wb") as log:
            proc, _ = start_broker(args, endpoint, stdout=log, stderr=subprocess.STDOUT)
            try:
                with Client(endpoint, timeout=120) as c:
                    c.register("planner", "smol")
                    c.register("coder", "gemma")
                    c.register("reviewer", "smol")
                    c.decode("planner", PROMPT, 8)
                    c.decode("reviewer", PROMPT, 8)
                    rates = Rates()
                    snap = sample(c)
                    rates.update(snap["agents"], time.monotonic())
                    c.decode("coder", PROMPT, 24)
                    c.decode("reviewer", PROMPT, 16)
                    snap = sample(c)
                    rates.update(snap["agents"], time.monotonic())
            finally:
                stop(proc)
    console = Console(record=True, width=120, file=open("/dev/null", "w"))
    console.print(frame(snap, "residence"))
    print(console.export_text(clear=False))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    console.save_svg(str(out), title=f"lmx-top --endpoint {endpoint}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "lmx-top.svg")

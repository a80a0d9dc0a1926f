"""`lmx-top`: a live view of one broker (STATUS and LIST, redrawn every --interval seconds).

    device  ledger cap, booked, NVML used, other processes' bytes (the sums over devices)
    devices with several: per device its worker, ledger, NVML reading, agents (live)
    models  path, agents, booked bytes, worker refs
    groups  seats, seats used, rebuilds
    agents  residence, booked and parked bytes, queue, tok/s, last active (sortable)

tok/s is the growth of each agent's generated_tokens between two refreshes, so `--once` (one
frame, for scripts) leaves it blank. Exit status: 0, 1 on an error reply, 3 when the broker did
not answer within --timeout.
"""
import os
import sys
import time

import click
from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from lmx.common.client import Client, LmxTimeout
from lmx.common.config import DEFAULT_ENDPOINT
from lmx.common.errors import LmxError
from lmx.common.probe import _curve

RESIDENCE_ORDER = {"live": 0, "parked_ram": 1, "parked_disk": 2, "parked_empty": 3}
# Each sort key: agent row -> value; largest (or most recent, or live first) comes first.
SORTS = {
    "residence": lambda a: (RESIDENCE_ORDER.get(a["residence"], 9), a["agent"]),
    "booked": lambda a: (-a["booked_now_bytes"], a["agent"]),
    "parked": lambda a: (-a["parked_bytes"], a["agent"]),
    "queue": lambda a: (-a["queue_depth"], a["agent"]),
    "toks": lambda a: (-(a.get("tok_s") or 0.0), a["agent"]),
    "last": lambda a: (-(a.get("last_active") or 0.0), a["agent"]),
}


def human(n):
    """Bytes as a short binary-unit string (1.5 GiB); '-' for None."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024


def ago(stamp, now):
    """Seconds since a wall-clock stamp, as '3s ago' / '4m ago'; '-' for never."""
    if stamp is None:
        return "-"
    secs = max(0.0, now - stamp)
    if secs < 120:
        return f"{secs:.0f}s ago"
    if secs < 7200:
        return f"{secs / 60:.0f}m ago"
    return f"{secs / 3600:.0f}h ago"


class Rates:
    """tok/s per agent from generated_tokens deltas between two samples."""

    def __init__(self):
        self._last = {}               # agent -> (monotonic time, generated_tokens)

    def update(self, agents, now):
        """Set each agent row's tok_s (None on its first sample) and remember this sample."""
        seen = {}
        for a in agents:
            prev = self._last.get(a["agent"])
            tokens = a.get("generated_tokens", 0)
            a["tok_s"] = None
            if prev and now > prev[0] and tokens >= prev[1]:
                a["tok_s"] = (tokens - prev[1]) / (now - prev[0])
            seen[a["agent"]] = (now, tokens)
        self._last = seen


def sample(client):
    """One STATUS and one LIST from the broker: {"status": ..., "agents": [...]}."""
    status = client.request("STATUS")
    agents = client.request("LIST")["agents"]
    return {"status": status, "agents": agents}


def _pct(part, whole):
    return f"{100.0 * part / whole:.0f}%" if part is not None and whole else "-"


def device_panel(st):
    """The ledger and device lines, with a bar for each."""
    cap, booked = st["ledger_max_bytes"], st["ledger_allocated_bytes"]
    total, used = st.get("device_total_bytes"), st.get("device_used_bytes")
    name = st.get("device_name") or st.get("device_kind") or "device"
    head = Text(f"lmx {st['version']}  {st['endpoint']}  worker {st['worker_state']} "
                f"pid {st['worker_pid']} restarts {st['worker_restarts']}  {name}", style="bold")
    grid = Table.grid(padding=(0, 1))
    grid.add_row("ledger", ProgressBar(total=max(cap, 1), completed=booked, width=30),
                  f"booked {human(booked)} of cap {human(cap)} ({_pct(booked, cap)})")
    grid.add_row("device", ProgressBar(total=max(total or 1, 1), completed=used or 0, width=30),
                  f"NVML used {human(used)} of {human(total)} ({_pct(used, total)})  "
                  f"other processes {human(st.get('external_bytes'))}  "
                  f"worker process {human(st.get('worker_process_bytes'))}")
    grid.add_row("", "", f"agents {st['agents']}  live {len(st['live_agents'])}  "
                 f"queue {st['queue_depth']}  waiting for room {st['waiting_for_room']}  "
                 f"inflight {st['inflight']}  parked in RAM {human(st['parked_ram_bytes'])}")
    return Group(head, grid)


def devices_table(st):
    """One row per device (shown when the broker drives several)."""
    table = Table(title="devices", title_justify="left")
    for col in ("device", "name", "worker", "booked", "cap", "NVML used", "of", "agents",
                "live", "waiting"):
        table.add_column(col, justify="left" if col in ("name", "worker") else "right")
    for d in st.get("devices", []):
        where = d.get("device_name") or d.get("kind") or "-"
        worker = f"{d['worker_state']} pid {d.get('worker_pid') or '-'} " \
                 f"restarts {d.get('worker_restarts', 0)}{' (remote)' if d.get('remote') else ''}"
        table.add_row(str(d["device"]), f"{d.get('name') or '-'}: {where}", worker,
                      human(d["ledger_allocated_bytes"]), human(d["ledger_max_bytes"]),
                      human(d.get("used_bytes")), human(d.get("total_bytes")),
                      str(len(d.get("agents") or [])), str(len(d.get("live_agents") or [])),
                      str(d.get("waiting_for_room", 0)))
    return table


def models_table(st):
    """One row per loaded or booked model."""
    table = Table(title="models", title_justify="left", expand=False)
    for col in ("path", "agents", "booked", "context booked", "source", "worker refs"):
        table.add_column(col, justify="left" if col in ("path", "source") else "right")
    for m in st.get("models", []):
        table.add_row(os.path.basename(m["path"]), str(m["agents"]), human(m["booked_bytes"]),
                      human(m.get("context_booked_bytes")), str(m.get("source") or "-"),
                      str(m.get("worker_refs", 0)))
    return table


def groups_table(st):
    """One row per group context: seats, seats used, rebuilds."""
    table = Table(title="groups", title_justify="left")
    for col in ("group", "model", "seats", "used", "rebuilds", "seat bytes", "booked"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for g in st.get("groups", []):
        table.add_row(str(g["group"]), os.path.basename(g["model"]), str(g["seats"]),
                      str(g["seats_used"]), str(g["rebuilds"]), human(g["seat_bytes"]),
                      human(g["booked_bytes"]))
    return table


def agents_table(agents, sort, now, devices=False):
    """One row per agent, sorted by `sort` (a SORTS key); devices: a column for where it
    lives."""
    table = Table(title=f"agents (sorted by {sort})", title_justify="left")
    cols = ("agent", "model") + (("device",) if devices else ()) + (
        "residence", "booked", "parked", "queue", "tok/s", "tokens", "last active")
    for col in cols:
        table.add_column(col, justify="left" if col in ("agent", "model", "residence")
                         else "right")
    for a in sorted(agents, key=SORTS[sort]):
        tok_s = a.get("tok_s")
        style = "green" if a["residence"] == "live" else None
        where = (str(a.get("device", "-")),) if devices else ()
        table.add_row(a["agent"], a["model"], *where, Text(a["residence"], style=style),
                      human(a["booked_now_bytes"]), human(a["parked_bytes"]),
                      str(a["queue_depth"]), "-" if tok_s is None else f"{tok_s:.1f}",
                      str(a["generated_tokens"]), ago(a.get("last_active"), now))
    return table


def frame(snap, sort, now=None, note=None):
    """Everything one refresh shows, as one rich renderable."""
    now = time.time() if now is None else now
    st = snap["status"]
    several = len(st.get("devices") or []) > 1
    parts = [device_panel(st)]
    if several:
        parts.append(devices_table(st))
    parts.append(models_table(st))
    if st.get("groups"):
        parts.append(groups_table(st))
    parts.append(agents_table(snap["agents"], sort, now, devices=several))
    if note:
        parts.append(Text(note, style="bold red"))
    return Group(*parts)


def _console():
    # Not a terminal (a script, a pipe): no colour, and wide enough that tables do not wrap.
    if sys.stdout.isatty():
        return Console()
    columns = os.environ.get("COLUMNS", "")
    width = max(160, int(columns) if columns.isdigit() else 0)
    return Console(width=width, no_color=True, highlight=False)


def _live(client, console, sort, interval, first):
    """Redraw until Ctrl-C; a missed refresh is shown on the last frame, not fatal."""
    from rich.live import Live
    rates, snap = Rates(), first
    rates.update(snap["agents"], time.monotonic())
    with Live(frame(snap, sort), console=console, screen=True, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            note = None
            try:
                snap = sample(client)
                rates.update(snap["agents"], time.monotonic())
            except (LmxTimeout, LmxError) as exc:
                note = f"last refresh failed: {exc}"
            live.update(frame(snap, sort, note=note), refresh=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--endpoint", default=DEFAULT_ENDPOINT, show_default=True,
              help="The broker's client endpoint.")
@click.option("--sort", type=click.Choice(sorted(SORTS)), default="residence",
              show_default=True, help="Order of the agents table.")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
@click.option("--timeout", default=2.0, show_default=True,
              help="Seconds to wait for the broker's reply.")
@click.option("--curve-client-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="tcp brokers: this client's zmq.auth secret key file.")
@click.option("--curve-server-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="tcp brokers: the broker's public key file.")
def main(endpoint, sort, interval, once, timeout, curve_client_key, curve_server_key):
    """A live view of a broker: device, models, groups and agents, refreshed every
    --interval seconds (Ctrl-C to leave)."""
    console = _console()
    with Client(endpoint, timeout=timeout,
                curve=_curve(curve_client_key, curve_server_key)) as client:
        try:
            first = sample(client)
        except LmxTimeout:
            click.echo(f"lmx-top: no reply from the broker at {endpoint} within {timeout:g} s "
                       f"(is lmx-broker running there?)", err=True)
            sys.exit(3)
        except LmxError as exc:
            click.echo(f"lmx-top: the broker refused STATUS/LIST: {exc}", err=True)
            sys.exit(1)
        if once:
            console.print(frame(first, sort))
            return
        try:
            _live(client, console, sort, interval, first)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

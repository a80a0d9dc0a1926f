"""lmx-top as a script runs it: `--once` against a real broker, and no broker at all."""
import subprocess
import sys

from lmx.common.top import Rates, frame, human
from rich.console import Console

TOP = [sys.executable, "-m", "lmx.common.top"]


def top(*args, timeout=60):
    return subprocess.run([*TOP, *args], capture_output=True, text=True, timeout=timeout)


def _row(out, agent):
    return next(line for line in out.splitlines() if f" {agent} " in f" {line} ")


def test_once_shows_two_agents_and_the_ledger(broker_factory, table):
    b = broker_factory("--vram-table", str(table), "--vram-total", "8GiB")
    with b.client() as c:
        c.register("topa", "smol")
        c.register("topb", "gemma")
        assert c.decode("topa", "Hello, my name is", 4)["generated_tokens"] == 4
        status = c.request("STATUS")
        agents = {a["agent"]: a for a in c.list_agents()}
    r = top("--endpoint", b.endpoint, "--once", "--sort", "booked")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "\x1b[" not in out                      # not a terminal: no colour codes
    for name, a in agents.items():
        row = _row(out, name)
        assert a["residence"] in row and a["model"] in row
        assert human(a["booked_now_bytes"]) in row
    assert "4" in _row(out, "topa").split()        # generated tokens
    assert f"cap {human(status['ledger_max_bytes'])}" in out
    assert f"booked {human(status['ledger_allocated_bytes'])}" in out
    assert f"of {human(status['device_total_bytes'])}" in out
    assert "other processes" in out and "SmolLM2-135M-Instruct.Q4_1.gguf" in out
    # --sort booked: gemma's larger context booking comes first
    order = sorted(agents.values(), key=lambda a: (-a["booked_now_bytes"], a["agent"]))
    assert out.index(f" {order[0]['agent']} ") < out.index(f" {order[1]['agent']} ")


def test_unreachable_broker_exits_3_with_a_message(tmp_path):
    r = top("--endpoint", f"ipc://{tmp_path}/nobody.sock", "--once", "--timeout", "0.3",
            timeout=30)
    assert r.returncode == 3
    assert "no reply from the broker" in r.stderr and "nobody.sock" in r.stderr
    assert r.stdout == ""


def test_rates_from_token_deltas():
    rates = Rates()
    rows = [{"agent": "a", "generated_tokens": 10}]
    rates.update(rows, 100.0)
    assert rows[0]["tok_s"] is None
    rows = [{"agent": "a", "generated_tokens": 40}]
    rates.update(rows, 102.0)
    assert rows[0]["tok_s"] == 15.0


def test_frame_renders_without_device_numbers():
    st = {"version": "0.1.0", "endpoint": "ipc://x", "worker_state": "ready", "worker_pid": 1,
          "worker_restarts": 0, "ledger_max_bytes": 1 << 30, "ledger_allocated_bytes": 0,
          "device_total_bytes": None, "device_used_bytes": None, "external_bytes": None,
          "agents": 0, "live_agents": [], "queue_depth": 0, "waiting_for_room": 0,
          "inflight": 0, "parked_ram_bytes": 0, "models": [], "groups": []}
    console = Console(width=120, no_color=True, record=True, file=open("/dev/null", "w"))
    console.print(frame({"status": st, "agents": []}, "residence"))
    text = console.export_text()
    assert "cap 1.0 GiB" in text and "NVML used -" in text


def test_several_devices_get_a_row_each():
    st = {"version": "0.2.0", "endpoint": "ipc://x", "worker_state": "ready", "worker_pid": 1,
          "worker_restarts": 0, "ledger_max_bytes": 3 << 30, "ledger_allocated_bytes": 1 << 29,
          "device_total_bytes": None, "device_used_bytes": None, "external_bytes": None,
          "agents": 3, "live_agents": ["a", "b"], "queue_depth": 0, "waiting_for_room": 1,
          "inflight": 0, "parked_ram_bytes": 0, "models": [], "groups": [],
          "devices": [
              {"device": 0, "name": "local:0", "remote": False, "worker_state": "ready",
               "worker_pid": 11, "worker_restarts": 0, "device_name": "cpu (declared size)",
               "ledger_allocated_bytes": 1 << 29, "ledger_max_bytes": 1 << 30,
               "used_bytes": None, "total_bytes": 1 << 30, "agents": ["a", "b"],
               "live_agents": ["a", "b"], "waiting_for_room": 0},
              {"device": 1, "name": "gpu-host:gpu1", "remote": True, "worker_state": "lost",
               "worker_pid": None, "worker_restarts": 2, "device_name": "NVIDIA H200",
               "ledger_allocated_bytes": 0, "ledger_max_bytes": 2 << 30,
               "used_bytes": 5 << 20, "total_bytes": 2 << 30, "agents": ["c"],
               "live_agents": [], "waiting_for_room": 1}]}
    agent = {"agent": "c", "model": "m.gguf", "device": 1, "residence": "parked_ram",
             "booked_now_bytes": 0, "parked_bytes": 1 << 20, "queue_depth": 0,
             "generated_tokens": 5, "last_active": None}
    console = Console(width=200, no_color=True, record=True, file=open("/dev/null", "w"))
    console.print(frame({"status": st, "agents": [agent]}, "residence"))
    text = console.export_text()
    assert [c.strip() for c in _row(text, "c").split("│")[1:4]] == ["c", "m.gguf", "1"]
    cells = [(line.split("│")[1].strip(), line) for line in text.splitlines()
             if line.count("│") > 3]
    rows = {first: line for first, line in cells if first in ("0", "1")}
    assert "devices" in text and set(rows) == {"0", "1"}, text
    assert "local:0" in rows["0"] and "ready pid 11" in rows["0"] and "512.0 MiB" in rows["0"]
    assert "gpu-host:gpu1" in rows["1"] and "lost" in rows["1"] and "(remote)" in rows["1"]
    assert "restarts 2" in rows["1"] and "2.0 GiB" in rows["1"]
    single = dict(st, devices=st["devices"][:1])
    console = Console(width=200, no_color=True, record=True, file=open("/dev/null", "w"))
    console.print(frame({"status": single, "agents": []}, "residence"))
    assert "devices" not in console.export_text()           # one device: the panel says it

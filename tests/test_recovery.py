"""Restarts lose nothing an agent was told: worker SIGKILL, broker SIGKILL, crash mid-REGISTER."""
import os
import shutil
import signal
import threading

import pytest

from conftest import BrokerProc, wait_until
from lmx.common.errors import Code, LmxError


def ready(c, n):
    return wait_until(lambda: (a := c.list_agents()) and len(a) == n and
                      all(x["state"] == "ready" for x in a) and a, timeout=60,
                      what=f"{n} agents ready")


def reference(c, prompts, n):
    """The same conversation, uninterrupted, on a fresh agent."""
    c.register("ref", "smol")
    out = [c.decode("ref", p, n)["tokens"] for p in prompts]
    c.unregister("ref")
    return out


def test_parked_state_on_disk_survives_a_worker_kill(broker_factory, table):
    broker = broker_factory("--vram-table", str(table), "--max-live-contexts", "1")
    with broker.client() as c:
        c.register("parked", "smol")
        c.register("live", "gemma")
        first = c.decode("parked", "Hello, my name is", 12)
        c.decode("live", "The capital of France is", 6)           # parks 'parked' to disk
        before = c.request("STATUS")
        os.kill(before["worker_pid"], signal.SIGKILL)
        wait_until(lambda: c.request("STATUS")["worker_pid"] not in (None, before["worker_pid"]),
                   timeout=60, what="a new worker")
        ready(c, 2)
        after = c.request("STATUS")
        # the weights stay booked; seats are booked again as agents run
        assert after["bookings"] == {k: v for k, v in before["bookings"].items()
                                     if k.startswith(("model:", "worker:"))}
        resumed = c.decode("parked", "The weather today is", 12)
        assert resumed["context_reset"] is False and resumed["kv_swap_restored"] is True
        reset = c.decode("live", "and", 4)
        assert reset["context_reset"] is True                       # it was live: lost, said
        want = reference(c, ["Hello, my name is", "The weather today is"], 12)
        assert [first["tokens"], resumed["tokens"]] == want


def test_registrations_survive_a_broker_kill(tmp_path, table):
    state = tmp_path / "state"
    args = ["--vram-table", str(table), "--state-dir", str(state), "--max-live-contexts", "1"]
    b1 = BrokerProc(tmp_path, args, name="one")
    with b1.client() as c:
        c.register("a", "smol")
        c.register("b", "gemma", n_ctx=1024)
        first = c.decode("a", "Hello, my name is", 10)
        c.decode("b", "Paris is", 4)                                  # parks 'a' to disk
        before = c.request("STATUS")
    b1.proc.send_signal(signal.SIGKILL)
    b1.proc.wait(30)
    b1.log.close()
    b2 = BrokerProc(tmp_path, args, name="two", endpoint=b1.endpoint)
    try:
        with b2.client() as c:
            agents = {a["agent"]: a for a in ready(c, 2)}
            assert agents["b"]["n_ctx"] == 1024 and agents["a"]["model"] == "smol"
            status = c.request("STATUS")
            assert status["bookings"] == {k: v for k, v in before["bookings"].items()
                                          if k.startswith("model:")}   # seats: when they run
            resumed = c.decode("a", "The weather today is", 10)
            assert resumed["context_reset"] is False
            want = reference(c, ["Hello, my name is", "The weather today is"], 10)
            assert [first["tokens"], resumed["tokens"]] == want
            assert c.decode("b", "more", 2)["context_reset"] is True
    finally:
        b2.stop()
        wait_until(lambda: not _alive(before["worker_pid"]), 30, what="the old worker to go")


def _alive(pid):
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except (ProcessLookupError, OSError):
        return False


def test_a_worker_crash_during_register_unwinds(broker_factory, table):
    broker = broker_factory("--vram-table", str(table))
    before = broker.status()
    result = {}

    def register():
        with broker.client() as c:
            result["reply"] = c.call("REGISTER", agent="g", model="gemma")

    t = threading.Thread(target=register)
    t.start()
    wait_until(lambda: broker.status()["inflight"], what="the REGISTER in flight", interval=0.01)
    os.kill(before["worker_pid"], signal.SIGKILL)
    t.join(30)
    assert result["reply"]["code"] == "WORKER_LOST"
    status = wait_until(lambda: (s := broker.status())["worker_state"] == "ready" and s,
                        timeout=60, what="restart")
    assert status["agents"] == 0 and status["models"] == []
    assert status["ledger_allocated_bytes"] == before["ledger_allocated_bytes"]
    with broker.client() as c:
        assert c.register("g", "gemma")["status"] == "ok"        # and it can be done again


def test_an_agent_that_cannot_be_restored_is_reported_lost(tmp_path, smol_path):
    models = tmp_path / "models"
    models.mkdir()
    copy = models / "smol.gguf"
    shutil.copy(smol_path, copy)
    args = ["--state-dir", str(tmp_path / "state")]
    b1 = BrokerProc(tmp_path, args, name="one", model_dirs=[str(models)])
    with b1.client() as c:
        c.register("doomed", str(copy))
    b1.stop()
    copy.unlink()
    b2 = BrokerProc(tmp_path, args, name="two", model_dirs=[str(models)])
    try:
        with b2.client() as c:
            with pytest.raises(LmxError) as info:
                c.decode("doomed", "hi", 1)
            assert info.value.code == Code.AGENT_LOST and "not found" in info.value.message
            assert c.request("STATUS")["ledger_allocated_bytes"] == 0
    finally:
        b2.stop()

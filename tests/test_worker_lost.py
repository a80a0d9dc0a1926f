"""A worker that dies: in-flight requests fail fast with WORKER_LOST, the broker restarts it."""
import os
import signal
import subprocess
import sys
import threading
import time


from conftest import wait_until
from lmx.common.errors import Code, LmxError


def test_sigkill_mid_decode_fails_fast_and_the_worker_comes_back(broker_factory, table):
    broker = broker_factory("--vram-table", str(table), "--heartbeat", "0.5")
    with broker.client() as c:
        c.register("long", "smol", n_ctx=4096)
    before = broker.status()
    old_pid = before["worker_pid"]
    outcome = {}

    flowing = threading.Event()

    def decode():
        with broker.client() as c:
            try:
                for reply in c.decode_stream("long", "Once upon a time", 4000):
                    flowing.set()
                outcome["error"] = None
            except LmxError as err:
                outcome["error"] = err
            outcome["at"] = time.monotonic()

    t = threading.Thread(target=decode)
    t.start()
    assert flowing.wait(60), "no token came"       # the worker is deep in the DECODE
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    t.join(30)
    assert outcome["error"] is not None and outcome["error"].code == Code.WORKER_LOST
    assert outcome["at"] - killed_at < 2 * 0.5 + 0.5
    status = wait_until(lambda: (s := broker.status())["worker_state"] == "ready" and
                        s["worker_pid"] != old_pid and s, timeout=60, what="worker restart")
    assert status["worker_restarts"] == 1
    # The agent survives with its model's booking; its live context died with its seat (it is
    # seated again when it runs), and the next reply says so.
    assert status["agents"] == 1 and "agent:long" in before["bookings"]
    assert "agent:long" not in status["bookings"] and not status["groups"]
    assert {k for k in status["bookings"] if k.startswith("model:")} == {
        k for k in before["bookings"] if k.startswith("model:")}
    with broker.client() as c:
        wait_until(lambda: c.list_agents()[0]["state"] == "ready", what="agent rebuilt")
        first = c.decode("long", "hi", 1)
        assert first["context_reset"] is True and first["n_past"] <= 4
        assert c.decode("long", "again", 1)["context_reset"] is False   # said once
        c.unregister("long")


def test_broker_refuses_bad_options_before_it_starts_anything(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmx.broker.main", "--endpoint",
                        f"ipc://{tmp_path}/x.sock", "--threads", "-1", "--vram-total", "lots"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a size" in r.stderr


def test_broker_refuses_to_start_when_the_worker_cannot(tmp_path):
    """The worker cannot load llama.cpp (its library path points nowhere; the broker never
    loads llama.cpp itself): the broker exits 1 and says so, and serves nothing."""
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(tmp_path / "no-such-lib"))
    sock = tmp_path / "x.sock"
    r = subprocess.run([sys.executable, "-m", "lmx.broker.main", "--endpoint", f"ipc://{sock}",
                        "--state-dir", str(tmp_path / "state")], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Shared library with base name 'llama' not found" in r.stderr   # the worker's why
    assert "worker exited with 1 before it was ready" in r.stderr
    assert not sock.exists()


def test_broker_gives_up_when_no_worker_comes(tmp_path):
    """--no-spawn-worker and nobody connects on --worker-endpoint: the broker gives up after
    --worker-start-timeout, exits 1 naming the endpoint, and serves nothing."""
    sock, wep = tmp_path / "x.sock", f"ipc://{tmp_path}/w.sock"
    r = subprocess.run([sys.executable, "-m", "lmx.broker.main", "--endpoint", f"ipc://{sock}",
                        "--state-dir", str(tmp_path / "state"), "--no-spawn-worker",
                        "--worker-endpoint", wep, "--worker-start-timeout", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"no worker READY on {wep} within 1 s" in r.stderr
    assert not sock.exists()


def test_a_second_broker_on_the_same_state_dir_is_refused(broker_factory, tmp_path):
    first = broker_factory(name="first")
    state = str(first.dir / "first-state")
    r = subprocess.run([sys.executable, "-m", "lmx.broker.main", "--endpoint",
                        f"ipc://{tmp_path}/second.sock", "--state-dir", state],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"state directory {state} is in use by another lmx broker (pid " \
        f"{first.proc.pid})" in r.stderr
    with open(os.path.join(state, "broker.lock")) as fh:
        assert fh.read().strip() == str(first.proc.pid)      # the lock still names the first
    assert first.status()["worker_state"] == "ready"


def test_a_worker_started_by_hand(tmp_path, broker_factory, smol_path):
    wep = f"ipc://{tmp_path}/w.sock"
    worker = subprocess.Popen([sys.executable, "-m", "lmx.worker.main", "--broker", wep,
                               "--threads", "2", "--vram-total", "3GiB"])
    try:
        broker = broker_factory("--no-spawn-worker", "--worker-endpoint", wep)
        status = broker.status()
        assert status["worker_pid"] == worker.pid
        assert status["device_total_bytes"] == 3 << 30
        with broker.client() as c:
            c.register("h", smol_path)
            assert c.decode("h", "Hello", 3)["generated_tokens"] >= 1
            c.unregister("h")
        broker.stop()
        assert worker.wait(30) == 0      # the broker's SHUTDOWN ends a hand-started worker too
    finally:
        if worker.poll() is None:
            worker.kill()


def test_a_second_broker_on_the_same_socket_is_refused(broker_factory, tmp_path):
    first = broker_factory()
    r = subprocess.run([sys.executable, "-m", "lmx.broker.main", "--endpoint", first.endpoint,
                        "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "another lmx broker" in r.stderr
    assert first.status()["worker_state"] == "ready"


def test_a_hung_worker_is_declared_lost_within_two_heartbeats(broker_factory, table):
    broker = broker_factory("--vram-table", str(table), "--heartbeat", "0.5")
    with broker.client() as c:
        c.register("h", "smol")
    pid = broker.status()["worker_pid"]
    outcome = {}

    def decode():
        with broker.client() as c:
            outcome["reply"] = c.call("DECODE", agent="h", prompt="Once upon a time",
                                      n_predict=2000)
            outcome["at"] = time.monotonic()

    t = threading.Thread(target=decode)
    t.start()
    wait_until(lambda: broker.status()["inflight"], what="decode in flight")
    os.kill(pid, signal.SIGSTOP)                 # alive but silent
    stopped_at = time.monotonic()
    t.join(30)
    assert outcome["reply"]["code"] == "WORKER_LOST"
    # liveness 2 x 0.5 s after the last heartbeat, checked every 0.25 s
    assert outcome["at"] - stopped_at < 2 * 0.5 + 0.5
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
               open(f"/proc/{pid}/stat").read().split()[2] == "Z", 10,
               what="the hung worker to be killed")

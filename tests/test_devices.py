"""Several devices end to end: a broker with two declared CPU devices (two real workers),
placement and pinning, a killed worker that leaves the other device decoding, and a remote
worker over tcp + CURVE on 127.0.0.1 (a wrong key refused)."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq.auth

from conftest import wait_until
from ggufs import write_shaped
from lmx.common.errors import Code, LmxError

N_CTX = 16384        # a 4 MiB seat on the tiny model: two agents fill a 40 MiB device


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_path):
    folder = tmp_path_factory.mktemp("tiny")
    return str(write_shaped(folder / "tiny.gguf", smol_path, n_layer=2, n_embd=64, n_head=4,
                            n_ctx_train=N_CTX))


def _devices_of(broker):
    with broker.client() as c:
        return {a["agent"]: (a["device"], a["device_name"]) for a in c.list_agents()}


def _stream(broker, agent, n, out, flowing):
    """Stream a DECODE; record each token's arrival time, then the final reply or error."""
    out["times"] = []
    with broker.client() as c:
        try:
            for reply in c.decode_stream(agent, "Once upon a time", n):
                if reply["status"] == "partial":
                    out["times"].append(time.monotonic())
                    flowing.set()
                else:
                    out["reply"] = reply
        except LmxError as err:
            out["error"] = err


def test_two_devices_fill_in_turn_pin_and_one_dies_alone(broker_factory, tiny):
    broker = broker_factory("--vram-total", "40MiB", "--vram-total", "40MiB",
                            "--heartbeat", "0.5", "--threads", "1")
    status = broker.status()
    assert [(d["device"], d["name"], d["worker_state"], d["total_bytes"])
            for d in status["devices"]] == [(0, "local:0", "ready", 40 << 20),
                                            (1, "local:1", "ready", 40 << 20)]
    assert status["device_total_bytes"] == 80 << 20          # the sums, at the top
    pids = [d["worker_pid"] for d in status["devices"]]
    assert len(set(pids)) == 2 and status["worker_pid"] == pids[0]
    with broker.client() as c:
        for name in ("a", "b", "c"):
            c.register(name, tiny, n_ctx=N_CTX)
        assert c.register("p", tiny, n_ctx=N_CTX, device=1)["device"] == 1    # pinned
        with pytest.raises(LmxError) as full:
            c.register("x", tiny, n_ctx=N_CTX)
    assert _devices_of(broker) == {"a": (0, "local:0"), "b": (0, "local:0"),
                                   "c": (1, "local:1"), "p": (1, "local:1")}
    err = full.value
    assert err.code == Code.VRAM_LEDGER_DENY and [
        (d["device"], d["reason"]) for d in err.details["devices"]] == [(0, "CAP"), (1, "CAP")]
    before = broker.status()["devices"]
    assert all(f"model:{tiny}" in d["bookings"] for d in before)    # weights on each device

    on0, on1, flowing0, flowing1 = {}, {}, threading.Event(), threading.Event()
    t0 = threading.Thread(target=_stream, args=(broker, "a", 4000, on0, flowing0))
    t1 = threading.Thread(target=_stream, args=(broker, "c", 3000, on1, flowing1))
    t0.start()
    t1.start()
    assert flowing0.wait(60) and flowing1.wait(60), "no tokens came"
    os.kill(pids[0], signal.SIGKILL)
    killed = time.monotonic()
    t0.join(60)
    t1.join(120)
    assert on0["error"].code == Code.WORKER_LOST
    assert on1["reply"]["status"] == "ok" and on1["reply"]["stopped_by"] is None
    assert any(t > killed + 0.2 for t in on1["times"]), "device 1 stopped decoding"
    status = wait_until(lambda: (s := broker.status())["devices"][0]["worker_state"] ==
                        "ready" and s["devices"][0]["worker_pid"] != pids[0] and s,
                        timeout=60, what="device 0's worker to come back")
    d0, d1 = status["devices"]
    assert (d0["worker_restarts"], d1["worker_restarts"]) == (1, 0)
    assert d1["worker_pid"] == pids[1] and d1["live_agents"] == ["c", "p"]
    with broker.client() as c:
        wait_until(lambda: all(a["state"] == "ready" for a in c.list_agents()),
                   what="device 0's agents rebuilt")
        assert c.decode("a", "hi", 2)["context_reset"] is True
        assert _devices_of(broker)["a"] == (0, "local:0")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(endpoint, keys, key, name, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "lmx.worker.main", "--broker", endpoint, "--threads", "1",
         "--vram-total", "40MiB", "--heartbeat", "0.5", "--name", name,
         "--curve-secret-key", str(keys / f"{key}.key_secret"),
         "--curve-server-key", str(keys / "broker.key")], **kw)


def test_a_remote_worker_over_curve_and_a_wrong_key_refused(broker_factory, tmp_path, tiny):
    keys, allowed = tmp_path / "keys", tmp_path / "workers"
    keys.mkdir()
    allowed.mkdir()
    for who in ("broker", "hostb", "stranger"):
        zmq.auth.create_certificates(str(keys), who)
    shutil.copy(keys / "hostb.key", allowed)          # only hostb's public key is allowed
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    broker = broker_factory("--vram-total", "40MiB", "--heartbeat", "0.5",
                            "--remote-workers", endpoint, "--curve-workers", str(allowed),
                            "--curve-secret-key", str(keys / "broker.key_secret"))
    procs = [_worker(endpoint, keys, "hostb", "hostb:cpu")]
    try:
        status = wait_until(lambda: len((s := broker.status())["devices"]) == 2 and
                            s["devices"][1]["worker_state"] == "ready" and s, timeout=60,
                            what="the remote worker's READY")
        remote = status["devices"][1]
        assert (remote["name"], remote["remote"], remote["worker_pid"]) == (
            "hostb:cpu", True, procs[0].pid)
        with broker.client() as c:
            assert c.register("r", tiny, n_ctx=N_CTX, device="hostb:cpu")["device"] == 1
            assert c.decode("r", "Hello", 3)["generated_tokens"] == 3
        procs.append(_worker(endpoint, keys, "stranger", "hostc:cpu", stderr=subprocess.PIPE,
                             text=True))
        wait_until(lambda: "DENIED" in broker.read_log(), timeout=30,
                   what="the stranger's key to be refused and logged")
        _, err = procs[1].communicate(timeout=30)
        assert procs[1].returncode == 1 and "refused this worker's CURVE key" in err
        assert len(broker.status()["devices"]) == 2
        # the remote host drops: device 1 is lost and awaited; the same worker name comes back
        procs[0].kill()
        wait_until(lambda: broker.status()["devices"][1]["worker_state"] == "lost",
                   timeout=30, what="the remote device to be declared lost")
        assert broker.status()["devices"][0]["worker_state"] == "ready"
        procs.append(_worker(endpoint, keys, "hostb", "hostb:cpu"))
        wait_until(lambda: broker.status()["devices"][1]["worker_pid"] == procs[2].pid,
                   timeout=60, what="the remote worker's return")
        with broker.client() as c:
            wait_until(lambda: c.list_agents()[0]["state"] == "ready", what="r rebuilt")
            assert c.decode("r", "again", 2)["context_reset"] is True
        broker.stop()
        assert procs[2].wait(30) == 0          # SHUTDOWN reaches remote workers too
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_worker_for_a_tcp_broker_needs_keys(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmx.worker.main", "--broker",
                        "tcp://127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--curve-server-key" in r.stderr


def test_the_broker_refuses_remote_workers_without_keys(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmx.broker.main", "--endpoint",
                        f"ipc://{tmp_path}/x.sock", "--state-dir", str(tmp_path / "s"),
                        "--remote-workers", "tcp://127.0.0.1:1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--curve-workers" in r.stderr


def test_a_parked_agent_moves_to_the_device_with_room_and_continues_exactly(broker_factory,
                                                                            tiny):
    broker = broker_factory("--vram-total", "40MiB", "--vram-total", "40MiB",
                            "--admit-by-parking", "--threads", "1")
    prompt, more = "Once upon a time there was", " and then"
    with broker.client() as c:
        c.register("m", tiny, n_ctx=N_CTX, device=0)
        c.register("twin", tiny, n_ctx=N_CTX, device=1)       # never parked, never moved
        first = c.decode("m", prompt, 8)
        assert c.decode("twin", prompt, 8)["tokens"] == first["tokens"]
        c.register("b1", tiny, n_ctx=N_CTX, device=0)
        assert c.register("b2", tiny, n_ctx=N_CTX, device=0)["kv_swap_parked"] == ["m"]
    runs = [({}, threading.Event()) for _ in range(2)]
    threads = [threading.Thread(target=_stream, args=(broker, name, 3000, out, flowing))
               for name, (out, flowing) in zip(("b1", "b2"), runs)]
    for t in threads:
        t.start()
    try:
        assert all(flowing.wait(60) for _, flowing in runs)    # nobody on device 0 is idle
        with broker.client() as c:
            moved = c.decode("m", more, 12)
            assert _devices_of(broker)["m"] == (1, "local:1")
            twin = c.decode("twin", more, 12)
    finally:
        for t in threads:
            t.join(120)
    assert twin["tokens"] == moved["tokens"] and twin["n_past"] == moved["n_past"] > 20
    assert moved["kv_swap_restored"] is True and moved["context_reset"] is False
    assert all(out["reply"]["status"] == "ok" for out, _ in runs)
    log = broker.read_log()
    assert "moving parked agent=m from device 0 to 1" in log and "moved agent=m" in log
    d0, d1 = broker.status()["devices"]
    assert sorted(d0["agents"]) == ["b1", "b2"] and sorted(d1["agents"]) == ["m", "twin"]
    assert "agent:m" not in d0["bookings"] and "agent:m" in d1["bookings"]

"""Who may load what, and who may connect: model directories, ipc permissions, CURVE, limits."""
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest
import zmq
import zmq.auth

from conftest import BrokerProc
from lmx.common import protocol
from lmx.common.client import Client, LmxTimeout
from lmx.common.errors import Code, LmxError, Reason
from ggufs import write_shaped


@pytest.fixture
def jail(tmp_path, smol_path):
    """A model dir with one tiny model, and files outside it."""
    inside = tmp_path / "models"
    inside.mkdir()
    write_shaped(inside / "ok.gguf", smol_path, n_layer=1, n_embd=64, n_head=2, n_head_kv=1,
                 n_ff=64)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(inside / "ok.gguf", outside / "secret.gguf")
    os.symlink(outside / "secret.gguf", inside / "link.gguf")
    return inside, outside


def test_only_files_under_model_dirs_load(broker_factory, jail, table):
    inside, outside = jail
    broker = broker_factory("--vram-table", str(table), model_dirs=[str(inside)])
    with broker.client() as c:
        assert c.register("ok", str(inside / "ok.gguf"))["status"] == "ok"
        assert c.register("by-key", "smol")["status"] == "ok"      # table keys need no dir
        for attempt in (str(inside / ".." / "outside" / "secret.gguf"),   # .. escape
                        str(inside / "link.gguf"),                       # symlink out
                        str(outside / "secret.gguf"), "/etc/passwd",      # plain outside
                        str(outside / "missing.gguf")):                   # no existence leak
            with pytest.raises(LmxError) as info:
                c.register("x", attempt)
            assert (info.value.code, info.value.reason) == (Code.FORBIDDEN,
                                                            Reason.OUTSIDE_MODEL_DIRS), attempt
        assert len(c.list_agents()) == 2


def test_without_model_dirs_only_table_keys_load(broker_factory, table, smol_path):
    broker = broker_factory("--vram-table", str(table), model_dirs=[])
    with broker.client() as c:
        with pytest.raises(LmxError) as info:
            c.register("p", smol_path.replace(".gguf", "-copy.gguf"))
        assert info.value.code == Code.FORBIDDEN
        assert c.register("k", "smol")["status"] == "ok"


def test_ipc_socket_is_private(tmp_path):
    folder = tmp_path / "fresh" / "run"
    b = BrokerProc(tmp_path, [], endpoint=f"ipc://{folder}/lmx.sock")
    try:
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(folder / "lmx.sock").st_mode) == 0o600
    finally:
        b.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_needs_curve_and_refuses_the_wrong_key(tmp_path):
    keys, clients = tmp_path / "keys", tmp_path / "clients"
    keys.mkdir()
    clients.mkdir()
    server_pub, server_sec = zmq.auth.create_certificates(str(keys), "server")
    good_pub, good_sec = zmq.auth.create_certificates(str(keys), "good")
    bad_pub, bad_sec = zmq.auth.create_certificates(str(keys), "bad")
    shutil.copy(good_pub, clients)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    r = subprocess.run([sys.executable, "-m", "lmx.broker.main", "--endpoint", endpoint,
                        "--threads", "1", "--state-dir", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "needs --curve-secret-key" in r.stderr
    server = zmq.auth.load_certificate(server_pub)[0]
    good = tuple(zmq.auth.load_certificate(good_sec)) + (server,)
    b = BrokerProc(tmp_path, ["--curve-secret-key", server_sec, "--curve-clients",
                              str(clients)], endpoint=endpoint, curve=good)
    try:
        assert b.status()["worker_state"] == "ready"
        wrong = tuple(zmq.auth.load_certificate(bad_sec)) + (server,)
        for curve in (wrong, None):
            with Client(endpoint, timeout=1.5, curve=curve) as c:
                with pytest.raises(LmxTimeout):
                    c.call("STATUS")
        probe = subprocess.run([sys.executable, "-m", "lmx.common.probe", "--endpoint", endpoint,
                                "--curve-client-key", good_sec, "--curve-server-key",
                                server_pub, "--json", "STATUS"], capture_output=True, text=True)
        assert probe.returncode == 0 and '"status": "ok"' in probe.stdout
    finally:
        b.stop()


def test_limits_each_have_a_code(broker_factory, table):
    broker = broker_factory("--vram-table", str(table), "--max-agents-per-client", "2",
                            "--max-prompt-tokens", "8", "--queue-depth", "1")
    with broker.client() as c:
        c.register("a1", "smol")
        c.register("a2", "smol")
        with pytest.raises(LmxError) as info:
            c.register("a3", "smol")
        assert (info.value.code, info.value.reason) == (Code.LIMIT, Reason.AGENTS_PER_CLIENT)
        with pytest.raises(LmxError) as info:
            c.decode("a1", "one two three four five six seven eight nine ten", 2)
        assert (info.value.code, info.value.reason) == (Code.LIMIT, Reason.PROMPT_TOKENS)
        assert info.value.details["limit"] == 8
    with broker.client() as other:
        assert other.register("b1", "smol")["status"] == "ok"   # the limit is per client
    # Queue depth 1: one DECODE runs, one waits, the next is refused with BUSY.
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.DEALER) for _ in range(3)]
    try:
        for i, s in enumerate(socks):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(broker.endpoint)
            s.send_multipart(protocol.encode_request("DECODE", i, agent="a1", prompt="Hi",
                                                     n_predict=300))
        replies = []
        for s in socks:
            assert s.poll(120000)
            replies.append(protocol.decode_reply(s.recv_multipart()))
        codes = sorted(r.get("code", "ok") for r in replies)
        assert codes == ["BUSY", "ok", "ok"], replies
        busy = next(r for r in replies if r.get("code") == "BUSY")
        assert busy["queue_depth"] == 1 and busy["max_queue_depth"] == 1
    finally:
        for s in socks:
            s.close()
        ctx.term()

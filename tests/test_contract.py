"""What an independent client found, each fixed and held here: through a real broker, its real
worker and real llama.cpp."""
import threading

import msgpack
import pytest
import zmq

from conftest import BrokerProc, wait_until
from lmx.broker.estimate import estimate
from lmx.common import protocol
from lmx.common.config import load_model_table
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, Reason

N_CTX = 512


def raw_dealer(ctx, endpoint, rcvhwm=None):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.connect(endpoint)
    return sock


def test_a_slow_streaming_reader_gets_every_token_and_the_final_reply(shared_broker):
    """More partial replies than the ROUTER's high-water mark (1000) while the client reads
    nothing: none is dropped, they wait for the reader."""
    n = 1100
    ctx = zmq.Context()
    sock = raw_dealer(ctx, shared_broker.endpoint, rcvhwm=4)
    try:
        with shared_broker.client() as c:
            c.register("slow", "smol", n_ctx=2048)
            try:
                _read_slowly(c, sock, n)
            finally:
                c.unregister("slow")
    finally:
        sock.close()
        ctx.term()


def _read_slowly(c, sock, n):
    sock.send_multipart(protocol.encode_request(
        "DECODE", 1, agent="slow", prompt="1, 2, 3, 4, 5, 6, 7, 8,", n_predict=n, stream=True))
    # read nothing until the agent is idle again: generation has ended at the broker
    wait_until(lambda: {a["agent"]: a for a in c.list_agents()}["slow"]["decodes"] == 1,
               timeout=600, what="the stream to end at the broker")
    replies = []
    while not replies or replies[-1]["status"] == "partial":
        assert sock.poll(10_000), f"stream stopped after {len(replies)} replies"
        replies.append(protocol.decode_reply(sock.recv_multipart()))
    final = replies[-1]
    assert final["status"] == "ok", final
    assert [p["index"] for p in replies[:-1]] == list(range(final["generated_tokens"]))
    assert final["generated_tokens"] > 1000 or final["stopped_on_eos"]


def test_pipelined_register_unregister_on_one_socket_apply_in_order(shared_broker):
    with shared_broker.client() as c:
        ids = [c.send("REGISTER", agent="p", model="smol", n_ctx=256) if i % 2 == 0 else
               c.send("UNREGISTER", agent="p") for i in range(10)]
        finals = [list(c.replies(i))[-1] for i in ids]
        assert [f["status"] for f in finals] == ["ok"] * 10, finals
        assert c.request("STATUS")["ledger_allocated_bytes"] == 0


@pytest.mark.parametrize("agent", ["a/b", "x" * 65, "é", "", "-lead"])
def test_one_agent_id_rule_for_every_verb(shared_broker, agent):
    with shared_broker.client() as c:
        for verb, extra in (("REGISTER", {"model": "smol"}), ("UNREGISTER", {}),
                            ("DECODE", {"prompt": "x", "n_predict": 1}),
                            ("CANCEL", {"request": 1})):
            reply = c.call(verb, agent=agent, **extra)
            assert (reply["code"], reply["reason"], reply["field"]) == (
                Code.BAD_REQUEST, Reason.BAD_VALUE, "agent"), (verb, reply)


def test_a_huge_agent_id_is_not_echoed_and_errors_keep_the_id(shared_broker):
    with shared_broker.client() as c:
        reply = c.call("DECODE", agent="a" * 100_000, prompt="x", n_predict=1)
        assert reply["code"] == Code.BAD_REQUEST and len(reply["message"]) < 400
    ctx = zmq.Context()
    sock = raw_dealer(ctx, shared_broker.endpoint)
    try:
        sock.send(msgpack.packb({"v": [1, 0], "id": 41, "agent": "x"}))      # no verb
        reply = msgpack.unpackb(sock.recv() if sock.poll(10_000) else b"\x80")
        assert (reply["id"], reply["code"], reply["reason"], reply["field"]) == (
            41, Code.BAD_REQUEST, Reason.MISSING_FIELD, "verb")
        sock.send(msgpack.packb({"v": [1, 0], "id": 42, "verb": "DECODE",
                                 "prompt": "x" * (2 << 20)}))                # too large
        reply = msgpack.unpackb(sock.recv() if sock.poll(10_000) else b"\x80")
        assert (reply["id"], reply["code"]) == (42, Code.FRAME_TOO_LARGE)
    finally:
        sock.close()
        ctx.term()


def test_no_phantom_overhead_on_cpu_with_simulated_others(broker_factory, table, tmp_path):
    others = tmp_path / "others"
    others.write_text(str(100 << 20))
    broker = broker_factory("--vram-table", str(table), "--simulate-others", str(others))
    with broker.client() as c:
        c.register("a", "smol", n_ctx=256)
        c.decode("a", "Hello", 2)
        c.unregister("a")
        status = c.request("STATUS")
        assert status["ledger_allocated_bytes"] == 0 and status["bookings"] == {}


def test_a_refused_park_under_concurrent_decodes_never_overbooks(tmp_path_factory, table):
    """PARKs that must fail (no state directory to spill to, 1 KiB of host budget) while
    other clients decode: after every reply, allocated <= max; the parked agent's DECODE is
    told why there is no room."""
    est = estimate("smol", ContextSpec(n_ctx=N_CTX, n_gpu_layers=0), load_model_table(table))
    kv = est.estimated["kv"]               # weights, one group's compute and two seats fit
    total = (256 << 20) + int((est.context - kv) * 1.1 + 2.5 * kv)
    broker = BrokerProc(tmp_path_factory.mktemp("overcommit"), [
        "--vram-table", str(table), "--vram-total", str(total), "--admission-percent", "100",
        "--admit-by-parking", "--no-park-to-disk", "--park-ram", "1KiB",
        "--default-n-ctx", str(N_CTX)])
    try:
        _refused_parks(broker)
    finally:
        broker.stop()


def _refused_parks(broker):
    with broker.client() as c:
        for agent in ("a", "b", "c"):           # c's REGISTER parks a (empty: nothing to keep)
            c.register(agent, "smol")
        assert {x["agent"]: x["residence"] for x in c.list_agents()}["a"] == "parked_empty"
        for agent in ("b", "c"):
            c.decode(agent, "Hello there", 8)   # now their states exceed the 1 KiB budget
    seen, errors = [], []

    def client(agent, rounds):
        with broker.client() as cl:
            for _ in range(rounds):
                reply = cl.call("DECODE", agent=agent, prompt=" and", n_predict=3,
                                deadline_ms=60_000)
                status = cl.request("STATUS")
                seen.append((reply, status["ledger_allocated_bytes"],
                             status["ledger_max_bytes"]))
                if reply["status"] == "error":
                    errors.append(reply)

    threads = [threading.Thread(target=client, args=(a, 4)) for a in ("a", "b", "c", "a")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(seen) == 16
    assert all(alloc <= cap for _, alloc, cap in seen)
    assert {(e["code"], e.get("reason")) for e in errors} == {(Code.LIMIT, Reason.PARK_BUDGET)}
    assert all(r["agent"] == "a" for r in errors)              # only the parked one waits
    with broker.client() as c:
        listed = {x["agent"]: x for x in c.list_agents()}
        assert listed["b"]["live"] and listed["c"]["live"] and not listed["a"]["live"]
        assert broker.read_log().count("PARK of") >= 2            # the refusals were logged

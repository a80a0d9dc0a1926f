"""End to end: a real lmx-broker process, its real worker, real llama.cpp on CPU."""
import shutil
import threading

import msgpack
import pytest
import zmq

from conftest import wait_until
from ggufs import write_unknown_arch
from lmx.broker.estimate import estimate
from lmx.common import protocol
from lmx.common.config import load_model_table
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError, Reason

VOLATILE = {"uptime_s", "requests", "errors", "device_used_bytes", "device_free_bytes",
            "worker_process_bytes", "v", "id"}


def snapshot(broker):
    """STATUS and LIST without the fields that change on every call."""
    with broker.client() as c:
        status = {k: v for k, v in c.request("STATUS").items() if k not in VOLATILE}
        agents = c.request("LIST")["agents"]
    return status, agents


def test_the_walk(broker_factory, table):
    """Cold start, gemma evicts smol, smol is restored and continues its own conversation
    (one live context at a time, as the README walk runs it)."""
    broker = broker_factory("--vram-table", str(table), "--max-live-contexts", "1")
    with broker.client() as c:
        c.register("smol", "smol")
        c.register("gemma", "gemma")
        first = c.decode("smol", "Hello, my name is", 24)
        second = c.decode("gemma", "The capital of France is", 24)
        third = c.decode("smol", "The weather today is", 24)
        for r in (first, second, third):
            assert r["status"] == "ok" and r["generated_tokens"] > 0 and r["text"]
            assert r["prompt_tokens"] > 0 and r["elapsed_ms"] > 0
            assert isinstance(r["stopped_on_eos"], bool)
        # every agent parked for a request is listed; kv_swap_evicted is the first of them
        # (gemma, registered but never run, is parked with nothing to keep for smol's first)
        assert (first["kv_swap_parked"], first["kv_swap_restored"]) == (["gemma"], False)
        assert (second["kv_swap_parked"], second["kv_swap_restored"]) == (["smol"], False)
        assert (third["kv_swap_parked"], third["kv_swap_restored"]) == (["gemma"], True)
        assert [r["kv_swap_evicted"] for r in (first, second, third)] == [
            "gemma", "smol", "gemma"]
        assert "Paris" in second["text"] or "France" in second["text"]

        # An uninterrupted run of smol's conversation gives the same greedy tokens.
        c.register("smol-ref", "smol")
        ref1 = c.decode("smol-ref", "Hello, my name is", 24)
        ref2 = c.decode("smol-ref", "The weather today is", 24)
        assert ref1["tokens"] == first["tokens"]
        assert ref2["tokens"] == third["tokens"] and ref2["text"] == third["text"]
        # ...and it is a continuation: a fresh agent answers the same prompt differently.
        c.register("smol-fresh", "smol")
        fresh = c.decode("smol-fresh", "The weather today is", 24)
        assert fresh["tokens"] != third["tokens"]

        status = c.request("STATUS")
        smol_model = next(m for m in status["models"] if m["path"].endswith("Q4_1.gguf"))
        assert smol_model["worker_refs"] == 3 and smol_model["agents"] == 3
        assert status["ledger_allocated_bytes"] == sum(status["bookings"].values())
        assert status["worker_state"] == "ready" and status["worker_pid"] > 0
        listed = {a["agent"]: a for a in c.request("LIST")["agents"]}
        assert listed["smol"]["decodes"] == 2 and listed["gemma"]["parked_bytes"] > 0
        assert listed["gemma"]["residence"] == "parked_ram" and not listed["gemma"]["live"]
        assert [a for a, v in listed.items() if v["live"]] == ["smol-fresh"]
        assert {k for k in status["bookings"] if not k.startswith("group:")} - {
            "worker:overhead"} == {"agent:smol-fresh"} | {
            f"model:{m['path']}" for m in status["models"]}
        # a group keeps its free seats (compute + KV) until the room is needed
        assert {k for k in status["bookings"] if k.startswith("group:")} == {
            f"group:{g['group']}" for g in status["groups"]}
        released = {a: c.unregister(a)["released_bytes"] for a in (
            "smol", "gemma", "smol-ref", "smol-fresh")}
        assert released["smol"] == 0 and released["smol-ref"] == 0     # parked: nothing booked
        assert released["gemma"] > 0 and released["smol-fresh"] > 0     # the models' weights
        status = c.request("STATUS")
        assert status["ledger_allocated_bytes"] == 0 and status["models"] == []


def _register_failure(c, model, **kw):
    with pytest.raises(LmxError) as info:
        c.register("victim", model, **kw)
    return info.value


@pytest.mark.parametrize("case", ["unknown_key", "missing_file", "table_missing_file",
                                  "not_gguf", "corrupt_gguf", "table_truncated",
                                  "unknown_arch", "huge_context", "duplicate_agent"])
def test_register_failures_leave_everything_as_before(shared_broker, tmp_path, case):
    text = tmp_path / "notes.gguf"
    text.write_text("not a model at all")
    odd = write_unknown_arch(tmp_path / "odd.gguf")
    models = {"unknown_key": ("nosuchkey", Code.MODEL_ERROR, Reason.UNKNOWN_KEY),
              "missing_file": (str(tmp_path / "absent.gguf"), Code.MODEL_ERROR,
                               Reason.NOT_FOUND),
              "table_missing_file": ("ghost", Code.MODEL_ERROR, Reason.NOT_FOUND),
              "not_gguf": (str(text), Code.MODEL_ERROR, Reason.NOT_GGUF),
              "corrupt_gguf": (None, Code.MODEL_ERROR, Reason.CORRUPT),
              "table_truncated": ("broken", Code.MODEL_ERROR, Reason.LOAD_FAILED),
              "unknown_arch": (str(odd), Code.MODEL_ERROR, Reason.LOAD_FAILED),
              "huge_context": ("smol", Code.VRAM_LEDGER_DENY, Reason.CAP),
              "duplicate_agent": ("smol", Code.AGENT_EXISTS, "")}
    model, code, reason = models[case]
    if case == "corrupt_gguf":
        broken = tmp_path / "short.gguf"
        with open(_smol(), "rb") as src:
            broken.write_bytes(src.read(1 << 16))
        model = str(broken)
    with shared_broker.client() as c:
        c.register("bystander", "smol")
        if case == "duplicate_agent":
            c.register("victim", "smol")
        before = snapshot(shared_broker)
        kw = {"n_ctx": 1 << 20} if case == "huge_context" else {}
        if case == "huge_context":
            # A copy outside the table is booked by the conservative bound, which grows with n_ctx.
            model = str(tmp_path / "smol-copy.gguf")
            shutil.copyfile(_smol(), model)
        err = _register_failure(c, model, **kw)
        assert (err.code, err.reason) == (code, reason), str(err)
        assert err.message
        assert snapshot(shared_broker) == before
        if case == "huge_context":
            d = err.details
            assert d["requested_bytes"] + d["ledger_allocated_bytes"] > d["ledger_max_bytes"]
        for agent in ("bystander", "victim"):
            try:
                c.unregister(agent)
            except LmxError as e:
                assert e.code == Code.UNKNOWN_AGENT and case != "duplicate_agent"
    assert shared_broker.status()["ledger_allocated_bytes"] == 0


def _smol():
    from conftest import SMOL
    return str(SMOL)


def test_fifty_concurrent_registers_never_overcommit(broker_factory, table, smol_path):
    # 2 GiB x 90 %: room for SmolLM2's weights (256 MiB, from the table), one group's compute
    # buffer and some seats (KV); every REGISTER seats its agent at once.
    broker = broker_factory("--vram-table", str(table), "--vram-total", "2GiB")
    est = estimate("smol", ContextSpec(n_ctx=2048, n_gpu_layers=0), load_model_table(table),
                   "cpu")
    kv = est.estimated["kv"]
    replies, stop = [], threading.Event()
    violations = []

    def watch():
        with broker.client() as c:
            while not stop.is_set():
                s = c.request("STATUS")
                if s["ledger_allocated_bytes"] > s["ledger_max_bytes"] or \
                        s["ledger_allocated_bytes"] != sum(s["bookings"].values()):
                    violations.append(s)

    def agent(i):
        with broker.client() as c:
            replies.append(c.call("REGISTER", agent=f"a{i}", model="smol"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=agent, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert not violations
    assert len(replies) == 50
    ok = [r for r in replies if r["status"] == "ok"]
    denied = [r for r in replies if r["status"] == "error"]
    assert 1 < len(ok) < 50
    for r in replies:
        assert r["ledger_allocated_bytes"] <= r["ledger_max_bytes"]
    for r in ok:
        assert r["booked_bytes"] == kv                  # a seat: the agent's KV
    for r in denied:
        assert (r["code"], r["reason"]) == ("VRAM_LEDGER_DENY", "CAP")
        assert r["requested_bytes"] == kv               # one more seat; weights are booked
        assert r["ledger_allocated_bytes"] + r["requested_bytes"] > r["ledger_max_bytes"]
    status = broker.status()
    with broker.client() as c:
        listed = c.list_agents()
    model = status["models"][0]
    assert model["booked_bytes"] == 256 << 20 and model["worker_refs"] == len(ok)
    (group,) = status["groups"]                         # one context holds them all
    assert group["seats_used"] == len(ok) <= group["seats"]
    assert group["rebuilds"] <= len(ok).bit_length() + 1    # grown geometrically
    assert status["ledger_allocated_bytes"] == model["booked_bytes"] + group["booked_bytes"] + \
        sum(a["booked_bytes"] for a in listed)
    with broker.client() as c:
        for a in listed:
            c.unregister(a["agent"])
    status = broker.status()
    assert status["ledger_allocated_bytes"] == 0 and status["models"] == []


def raw_request(endpoint, frames):
    """Send raw frames on a DEALER and return the decoded reply."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(10000), "no reply to a bad frame"
        return msgpack.unpackb(sock.recv_multipart()[-1])
    finally:
        sock.close()
        ctx.term()


def body(**kw):
    base = {"v": [1, 0], "id": 5, "verb": "DECODE", "agent": "bad", "prompt": "hi",
            "n_predict": 4}
    base.update(kw)
    return [msgpack.packb({k: v for k, v in base.items() if v is not ...})]


@pytest.mark.parametrize("frames,code,reason", [
    ([b"\xc1\xc1"], "BAD_FRAME", ""),
    ([msgpack.packb([1, 2, 3])], "BAD_FRAME", ""),
    ([b"", msgpack.packb({"v": [1, 0]})], "BAD_FRAME", ""),
    (body(verb="EXPLODE"), "UNKNOWN_VERB", ""),
    (body(v=[9, 0]), "BAD_VERSION", ""),
    (body(prompt=...), "BAD_REQUEST", "MISSING_FIELD"),
    (body(n_predict="many"), "BAD_REQUEST", "BAD_TYPE"),
    (body(n_predict=0), "BAD_REQUEST", "BAD_VALUE"),
    (body(n_predict=-3), "BAD_REQUEST", "BAD_VALUE"),
    (body(n_predict=10**9), "BAD_REQUEST", "BAD_VALUE"),
    (body(prompt=""), "BAD_REQUEST", "BAD_VALUE"),
    (body(prompt="x" * (2 << 20)), "FRAME_TOO_LARGE", ""),
    (body(verb="REGISTER", agent="../../etc", model="smol"), "BAD_REQUEST", "BAD_VALUE"),
    (body(verb="REGISTER", agent="ok", model="smol", n_ctx=1), "BAD_REQUEST", "BAD_VALUE"),
    (body(verb="UNREGISTER", agent="nobody"), "UNKNOWN_AGENT", ""),
    (body(agent="nobody"), "UNKNOWN_AGENT", ""),
])
def test_bad_input_gets_a_clear_error_and_the_broker_keeps_serving(shared_broker, frames, code,
                                                                   reason):
    with shared_broker.client() as c:
        c.register("bad", "smol")
        try:
            reply = raw_request(shared_broker.endpoint, frames)
            assert reply["status"] == "error" and reply["code"] == code, reply
            assert reply["reason"] == reason and reply["message"]
            assert reply["v"] == list(protocol.PROTOCOL_VERSION)
            assert c.request("STATUS")["worker_state"] == "ready"
            assert c.decode("bad", "ok", 1)["generated_tokens"] == 1
        finally:
            c.unregister("bad")


def test_context_full_is_a_clear_error(shared_broker):
    with shared_broker.client() as c:
        c.register("tiny", "smol", n_ctx=64)
        try:
            with pytest.raises(LmxError) as info:
                c.decode("tiny", "word " * 50, 32)
            assert info.value.code == Code.CONTEXT_FULL
            assert info.value.details["n_ctx"] == 64
        finally:
            c.unregister("tiny")


def test_requests_on_one_agent_apply_in_the_order_sent(shared_broker):
    """DECODEs of one agent sent back to back continue one conversation in the order sent,
    whether pipelined on one socket or sent by several clients: each reply's n_past grows in
    send order, and the tokens equal those of the same prompts sent one by one to a fresh
    agent (greedy decoding on CPU is deterministic)."""
    prompts = [f" Number {i}:" for i in range(6)]
    with shared_broker.client() as c:
        for agent in ("piped", "multi", "ref"):
            c.register(agent, "smol")
        try:
            ref = [c.decode("ref", p, 3) for p in prompts]           # one at a time
            # One socket: all six sent before any reply is read.
            ids = [c.send("DECODE", agent="piped", prompt=p, n_predict=3) for p in prompts]
            piped = [list(c.replies(i))[-1] for i in ids]
            # Six sockets, one request each. Order across sockets is only defined once the
            # broker has taken a request, so each is sent after the previous one is counted
            # on the agent (done or queued), and no reply is read before all are sent.
            clients = [shared_broker.client() for _ in prompts]
            try:
                sent = []
                for k, (cl, p) in enumerate(zip(clients, prompts), 1):
                    sent.append(cl.send("DECODE", agent="multi", prompt=p, n_predict=3))
                    wait_until(lambda k=k: _accepted(c, "multi") == k,
                               what=f"request {k} taken by the broker")
                multi = [list(cl.replies(i))[-1] for cl, i in zip(clients, sent)]
            finally:
                for cl in clients:
                    cl.close()
            for replies in (ref, piped, multi):
                assert [r["status"] for r in replies] == ["ok"] * len(prompts)
                n_past = [r["n_past"] for r in replies]
                assert n_past == sorted(set(n_past)), n_past      # strictly increasing
            assert [r["tokens"] for r in piped] == [r["tokens"] for r in ref]
            assert [r["tokens"] for r in multi] == [r["tokens"] for r in ref]
            assert [r["n_past"] for r in piped] == [r["n_past"] for r in ref]
            assert [r["n_past"] for r in multi] == [r["n_past"] for r in ref]
        finally:
            for agent in ("piped", "multi", "ref"):
                c.unregister(agent)
    assert shared_broker.status()["queue_depth"] == 0


def _accepted(client, agent):
    """Requests the broker has taken for agent: done plus queued or running."""
    rec = {a["agent"]: a for a in client.list_agents()}[agent]
    return rec["decodes"] + rec["queue_depth"]


def test_two_live_contexts_switch_without_swaps(broker_factory, table):
    broker = broker_factory("--vram-table", str(table), "--max-live-contexts", "2")
    with broker.client() as c:
        c.register("smol", "smol")
        c.register("gemma", "gemma")
        c.decode("smol", "Hello, my name is", 8)
        second = c.decode("gemma", "The capital of France is", 8)
        third = c.decode("smol", "The weather today is", 8)
        assert second["kv_swap_evicted"] is None
        assert (third["kv_swap_evicted"], third["kv_swap_restored"]) == (None, False)
        listed = {a["agent"]: a for a in c.list_agents()}
        assert listed["smol"]["live"] and listed["gemma"]["live"]
        assert sorted(c.request("STATUS")["live_agents"]) == ["gemma", "smol"]

"""Property-based fuzzing of a running broker: random frames, random msgpack and
valid-looking requests. The broker never dies, every message gets exactly one reply, and the
ledger's invariants hold after every reply (checked with STATUS every 100 messages)."""
import msgpack
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmx.common.errors import Code

VERBS = ["HELP", "STATUS", "LIST", "REGISTER", "UNREGISTER", "DECODE"]
CODES = {v for k, v in vars(Code).items() if not k.startswith("_")}

scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | \
    st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20)
anything = st.recursive(scalars, lambda c: st.lists(c, max_size=4) |
                        st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
request = st.fixed_dictionaries(
    {"v": st.sampled_from([[1, 0], [1, 7], [2, 0], [0], "1.0"]),
     "id": st.integers(-5, 10**12) | st.text(max_size=70) | st.none(),
     "verb": st.sampled_from(VERBS) | st.text(max_size=12)},
    optional={"agent": st.sampled_from(["a", "b"]) | st.text(max_size=80),
              "model": st.sampled_from(["smol", "nosuch", "/etc/passwd", "../x.gguf"]) |
              st.text(max_size=30),
              "n_ctx": st.sampled_from([0, 63, 256, 2048, 1 << 21]) | st.integers(-2**63, 2**64 - 1),
              "prompt": st.text(max_size=60),
              "n_predict": st.sampled_from([0, 1, 2, -1, 10**9]) | scalars,
              "flash_attn": scalars, "type_k": st.sampled_from(["f16", "q8_0", "zz"]),
              "extra": anything})
message = (st.lists(st.binary(max_size=64), min_size=1, max_size=3).map(lambda f: ("raw", f))
           | anything.map(lambda o: ("msgpack", [msgpack.packb(o)]))
           | request.map(lambda r: ("request", [msgpack.packb(r)])))


class Fuzzer:
    """One DEALER; sends a message, expects one reply, counts."""

    def __init__(self, endpoint):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.sent = 0

    def exchange(self, frames):
        self.sock.send_multipart(frames)
        self.sent += 1
        assert self.sock.poll(30000), f"no reply to {frames!r:.200}"
        reply = msgpack.unpackb(self.sock.recv_multipart()[-1], raw=False,
                                strict_map_key=False)
        assert self.sock.poll(0) == 0, "more than one reply"
        return reply

    def check_ledger(self):
        s = self.exchange([msgpack.packb({"v": [1, 0], "id": -1, "verb": "STATUS"})])
        assert s["status"] == "ok" and s["worker_state"] == "ready"
        assert s["ledger_allocated_bytes"] == sum(s["bookings"].values())
        return s

    def close(self):
        self.sock.close()
        self.ctx.term()


def test_ten_thousand_hostile_messages(broker_factory, table):
    broker = broker_factory("--vram-table", str(table), "--max-n-predict", "2",
                            "--max-agents-per-client", "1000")
    fz = Fuzzer(broker.endpoint)

    @settings(max_examples=550, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(message, min_size=20, max_size=25))
    def run(messages):
        for kind, frames in messages:
            reply = fz.exchange(frames)
            assert reply.get("status") in ("ok", "error"), reply
            if reply["status"] == "error":
                assert reply["code"] in CODES and isinstance(reply["message"], str)
            if "ledger_allocated_bytes" in reply and reply.get("code") != "VRAM_LEDGER_DENY":
                assert reply["ledger_allocated_bytes"] <= reply["ledger_max_bytes"]
            if fz.sent % 100 == 0:
                fz.check_ledger()

    try:
        run()
        assert fz.sent >= 10_000, fz.sent
        status = fz.check_ledger()
        for agent in fz.exchange([msgpack.packb({"v": [1, 0], "id": 1, "verb": "LIST"})])[
                "agents"]:
            fz.exchange([msgpack.packb({"v": [1, 0], "id": 2, "verb": "UNREGISTER",
                                        "agent": agent["agent"]})])
        status = fz.check_ledger()
        assert status["ledger_allocated_bytes"] == 0 and status["agents"] == 0
        assert broker.proc.poll() is None
    finally:
        fz.close()

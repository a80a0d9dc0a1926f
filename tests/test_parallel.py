"""Agents in parallel: batched steps of a token each, so every agent makes progress at once."""
import threading
import time

import pytest

from lmx.common.client import Client


@pytest.fixture(scope="module")
def parallel_broker(tmp_path_factory, table):
    from conftest import BrokerProc
    b = BrokerProc(tmp_path_factory.mktemp("parallel"),
                   ["--vram-table", str(table), "--quantum", "2"])
    yield b
    b.stop()


def test_four_agents_stream_concurrently(parallel_broker):
    agents = [f"p{i}" for i in range(4)]
    with parallel_broker.client() as c:
        for a in agents:
            c.register(a, "smol")
    firsts, finals, errors = {}, {}, []

    def run(agent):
        try:
            with Client(parallel_broker.endpoint, timeout=120) as c:
                for reply in c.decode_stream(agent, f"Story {agent}: once upon a time", 48):
                    now = time.monotonic()
                    if reply["status"] == "partial":
                        firsts.setdefault(agent, now)
                    else:
                        finals[agent] = (now, reply)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and len(finals) == 4
    assert max(firsts.values()) < min(t for t, _ in finals.values())
    assert all(r["generated_tokens"] >= 1 for _, r in finals.values())
    assert max(r["batch"] for _, r in finals.values()) == 4     # decoded in one batch
    # Every conversation equals the same prompt run alone.
    with parallel_broker.client() as c:
        for a in agents:
            c.register(f"{a}-alone", "smol")
            alone = c.decode(f"{a}-alone", f"Story {a}: once upon a time", 48)
            assert alone["tokens"] == finals[a][1]["tokens"]
            c.unregister(f"{a}-alone")
            c.unregister(a)


def test_a_short_request_is_not_stuck_behind_a_long_one(parallel_broker):
    with parallel_broker.client() as c:
        c.register("long", "smol", n_ctx=4096)
        c.register("short", "smol")
        try:
            long_req = c.send("DECODE", agent="long", prompt="Once upon a time", n_predict=1500)
            short_req = c.send("DECODE", agent="short", prompt="Hi", n_predict=4)
            short = list(c.replies(short_req))[-1]
            t_short = time.monotonic()
            long_reply = list(c.replies(long_req))[-1]
            assert short["status"] == long_reply["status"] == "ok"
            assert long_reply["generated_tokens"] > 4
            assert time.monotonic() - t_short > 0.2      # the long one was still running
        finally:
            c.unregister("long")
            c.unregister("short")

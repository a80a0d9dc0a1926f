"""Token streaming, CANCEL and deadlines through a real broker and worker."""
import subprocess
import sys
import time

import pytest

from conftest import wait_until
from lmx.common.errors import Code, LmxError


def test_tokens_stream_before_the_final_reply(shared_broker):
    with shared_broker.client() as c:
        c.register("s", "smol")
        try:
            replies = list(c.decode_stream("s", "Hello, my name is", 12))
            partials, final = replies[:-1], replies[-1]
            assert final["status"] == "ok" and all(p["status"] == "partial" for p in partials)
            assert [p["index"] for p in partials] == list(range(final["generated_tokens"]))
            assert [p["token"] for p in partials] == final["tokens"]
            assert "".join(p["text"] for p in partials) == final["text"]
            assert 0 < final["ttft_ms"] <= final["elapsed_ms"] and final["queue_ms"] >= 0
            # The same conversation without streaming gives the same tokens.
            c.register("t", "smol")
            assert c.decode("t", "Hello, my name is", 12)["tokens"] == final["tokens"]
        finally:
            c.unregister("s")
            c.unregister("t")


def test_cancel_a_running_decode_at_its_next_token(shared_broker):
    with shared_broker.client() as c, shared_broker.client() as other:
        c.register("r", "smol", n_ctx=4096)
        try:
            req = c.send("DECODE", agent="r", prompt="Once upon a time", n_predict=3000,
                         stream=True)
            stream = c.replies(req)
            first = next(stream)
            assert first["status"] == "partial"
            t0 = time.monotonic()
            assert other.cancel("r", req)["cancelled"] == "sent"
            final = [r for r in stream][-1]
            assert final["status"] == "ok" and final["stopped_by"] == "cancel"
            assert final["generated_tokens"] < 3000 and time.monotonic() - t0 < 5
            # The agent goes on: its context holds what was generated before the cancel.
            after = c.decode("r", "The end.", 2)
            assert after["n_past"] >= final["n_past"] + 2
            with pytest.raises(LmxError) as info:
                other.cancel("r", req)
            assert info.value.code == Code.UNKNOWN_REQUEST
        finally:
            c.unregister("r")


def test_cancel_a_queued_decode(shared_broker):
    with shared_broker.client() as c, shared_broker.client() as other:
        c.register("q1", "smol", n_ctx=4096)
        try:
            running = c.send("DECODE", agent="q1", prompt="Once upon a time", n_predict=400)
            queued = c.send("DECODE", agent="q1", prompt="Never run", n_predict=5)
            # The broker must have both before the CANCEL, which comes on another connection.
            wait_until(lambda: other.request("STATUS")["queue_depth"] == 1, what="queued")
            # The broker holds it (one job per agent at the worker): it is dropped at once,
            # and its CANCELLED comes while the one ahead of it is still running.
            assert other.cancel("q1", queued)["cancelled"] == "queued"
            replies = {queued: list(c.replies(queued))[-1]}
            assert replies[queued]["code"] == "CANCELLED"
            assert other.request("LIST")["agents"][0]["queue_depth"] == 1   # still running
            replies[running] = list(c.replies(running))[-1]
            assert replies[running]["status"] == "ok"
            assert replies[running]["generated_tokens"] >= 1
        finally:
            c.unregister("q1")


def test_deadlines_stop_running_and_drop_queued_requests(shared_broker):
    with shared_broker.client() as c:
        c.register("d", "smol", n_ctx=4096)
        try:
            t0 = time.monotonic()
            r = c.decode("d", "Once upon a time", 3000, deadline_ms=300)
            assert r["stopped_by"] == "deadline" and r["generated_tokens"] < 3000
            assert time.monotonic() - t0 < 3
            # a fresh conversation, so the request ahead runs its 300 tokens (no early
            # end-of-text: the history above depends on how far 300 ms got)
            c.unregister("d")
            c.register("d", "smol", n_ctx=4096)
            long_req = c.send("DECODE", agent="d", prompt="Once upon a time", n_predict=300)
            t0 = time.monotonic()
            late = c.send("DECODE", agent="d", prompt="Late", n_predict=2, deadline_ms=50)
            assert list(c.replies(late))[-1]["code"] == "DEADLINE"
            # at its deadline, not when the 300 tokens ahead of it are done
            waited = time.monotonic() - t0
            ahead = list(c.replies(long_req))[-1]
            assert ahead["status"] == "ok" and ahead["generated_tokens"] == 300
            assert waited < 0.5 * (time.monotonic() - t0), waited
            with pytest.raises(LmxError) as info:
                c.decode("d", "x", 1, deadline_ms=0)
            assert info.value.code == Code.BAD_REQUEST
        finally:
            c.unregister("d")


def test_probe_streams(shared_broker):
    ep = shared_broker.endpoint
    subprocess.run([sys.executable, "-m", "lmx.common.probe", "--endpoint", ep, "REGISTER",
                    "ps", "smol"], check=True, capture_output=True)
    try:
        r = subprocess.run([sys.executable, "-m", "lmx.common.probe", "--endpoint", ep,
                            "DECODE", "--stream", "ps", "8", "Hello, my name is"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0
        streamed, summary = r.stdout.split("\n", 1)
        assert "status: ok" in summary and "stopped_by: none" in summary
        text_line = next(line for line in summary.splitlines() if line.startswith("text: "))
        assert streamed == text_line[len("text: "):]
    finally:
        subprocess.run([sys.executable, "-m", "lmx.common.probe", "--endpoint", ep,
                        "UNREGISTER", "ps"], capture_output=True)

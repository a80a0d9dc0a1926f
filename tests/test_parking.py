"""The ledger books live agents' seats only: a parked agent's seat is taken over by the agent
that needed it, a small host budget spills parked state to disk, and every parked conversation
continues exactly."""
import pytest

from lmx.broker.estimate import estimate
from lmx.common.config import load_model_table
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError
from conftest import wait_until

N_CTX = 512


@pytest.fixture(scope="module")
def room_for_two(tmp_path_factory, table):
    """A broker whose device holds SmolLM2's weights, one group's compute and two seats (KV),
    not three."""
    from conftest import BrokerProc
    est = estimate("smol", ContextSpec(n_ctx=N_CTX, n_gpu_layers=0), load_model_table(table))
    kv = est.estimated["kv"]
    total = (256 << 20) + int((est.context - kv) * 1.1 + 2.5 * kv)
    b = BrokerProc(tmp_path_factory.mktemp("parking"), [
        "--vram-table", str(table), "--vram-total", str(total), "--admission-percent", "100",
        "--admit-by-parking", "--park-ram", "600KiB", "--default-n-ctx", str(N_CTX)])
    yield b
    b.stop()


def views(c):
    return {a["agent"]: a for a in c.list_agents()}


def test_parked_agents_release_their_bytes_and_continue_exactly(room_for_two):
    prompts = {"a": "Hello, my name is", "b": "The capital of France is",
               "c": "Once upon a time", "d": "def fib(n):"}
    first, second = {}, {}
    with room_for_two.client() as c:
        for agent in ("a", "b"):
            c.register(agent, "smol")
            first[agent] = c.decode(agent, prompts[agent], 12)
        c.register("c", "smol")                      # no room: parks a (least recently used)
        listed = views(c)
        assert listed["a"]["residence"] == "parked_ram" and listed["a"]["booked_now_bytes"] == 0
        first["c"] = c.decode("c", prompts["c"], 12)
        c.register("d", "smol")                      # parks b: past the 600 KiB host budget
        first["d"] = c.decode("d", prompts["d"], 12)
        listed = views(c)
        assert listed["b"]["residence"] == "parked_disk" and listed["b"]["parked_bytes"] > 0
        assert sorted(a for a, v in listed.items() if v["live"]) == ["c", "d"]
        status = c.request("STATUS")
        assert sorted(k for k in status["bookings"] if k.startswith("agent:")) == [
            "agent:c", "agent:d"]
        assert status["agent_states"]["b"]["residence"] == "parked_disk"
        assert status["ledger_allocated_bytes"] <= status["ledger_max_bytes"]
        for agent in ("a", "b", "c", "d"):           # each parks the least recently used
            second[agent] = c.decode(agent, " and then", 12)
            assert second[agent]["kv_swap_restored"] is True   # and brings its own state back
            assert c.request("STATUS")["ledger_allocated_bytes"] <= status["ledger_max_bytes"]
        assert views(c)["a"]["generated_tokens"] == 24
        for agent, prompt in prompts.items():        # the same conversations, uninterrupted
            c.register("ref", "smol")
            assert c.decode("ref", prompt, 12)["tokens"] == first[agent]["tokens"]
            assert c.decode("ref", " and then", 12)["tokens"] == second[agent]["tokens"]
            c.unregister("ref")
        for agent in prompts:
            c.unregister(agent)
        assert c.request("STATUS")["ledger_allocated_bytes"] == 0


def test_a_parked_agent_waits_for_a_busy_one_and_can_be_cancelled(room_for_two):
    with room_for_two.client() as c:
        for agent in ("x", "y", "z"):
            c.register(agent, "smol")
            c.decode(agent, "Hi", 2)                 # z's REGISTER parked x
        assert views(c)["x"]["residence"] == "parked_ram"
        long_y = c.send("DECODE", agent="y", prompt="Count: one two", n_predict=300)
        long_z = c.send("DECODE", agent="z", prompt="List: apples", n_predict=300)
        wait_until(lambda: views(c)["z"]["queue_depth"] == 1, what="z running")
        gone = c.send("DECODE", agent="x", prompt="First", n_predict=4)   # nobody idle: waits
        queued = c.send("DECODE", agent="x", prompt="Second", n_predict=4)
        # First waits for room; Second waits behind it in x's own lane (one at a time)
        wait_until(lambda: c.request("STATUS")["waiting_for_room"] == 1, what="x waiting")
        assert views(c)["x"]["queue_depth"] == 2
        behind = c.send("DECODE", agent="y", prompt="Also", n_predict=4)   # behind long_y
        wait_until(lambda: views(c)["y"]["queue_depth"] == 2, what="y's DECODE queued")
        assert c.cancel("x", gone)["cancelled"] == "queued"
        with pytest.raises(LmxError) as info:
            _final(c, gone)
        assert info.value.code == Code.CANCELLED
        late = c.send("DECODE", agent="x", prompt="Late", n_predict=4, deadline_ms=200)
        with pytest.raises(LmxError) as info:
            _final(c, late)                          # y and z still run: it never started
        assert info.value.code == Code.DEADLINE
        later = _final(c, queued)                   # runs once y or z is idle again
        assert later["generated_tokens"] >= 1 and later["kv_swap_restored"] is True
        for req in (long_y, long_z):
            assert _final(c, req)["generated_tokens"] > 4
        assert _final(c, behind)["generated_tokens"] >= 1
        for agent in ("x", "y", "z"):
            c.unregister(agent)


def _final(c, req):
    reply = list(c.replies(req))[-1]
    if reply["status"] == "error":
        raise LmxError(reply["code"], reply["message"])
    return reply


def test_a_parked_copy_is_written_from_its_buffer_unless_restored_first(tmp_path):
    """parkdisk.save_from writes the host buffer's bytes when its turn comes (no copy at the
    PARK); a state restored before then (cancel) is not written at all, and a cancel while
    its write is under way waits for it."""
    import ctypes
    import json
    import threading
    from lmx.worker import parkdisk
    folder = str(tmp_path)
    gate = threading.Event()
    parkdisk._queue(folder, lambda *a: gate.wait(30))        # the writer is busy
    buf = (ctypes.c_uint8 * 5).from_buffer_copy(b"abcde")
    parkdisk.save_from(folder, "kept", ctypes.addressof(buf), 5, {"n_past": 5})
    gone = parkdisk.save_from(folder, "gone", ctypes.addressof(buf), 5, {"n_past": 5})
    gone.cancel()                                       # restored before its turn
    buf[0] = ord("A")                                   # changed before "kept"'s turn
    gate.set()
    parkdisk.flush(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "kept.state"]
    assert (tmp_path / "kept.state").read_bytes() == b"Abcde"   # read at its turn, not before
    assert json.loads((tmp_path / "kept.json").read_text()) == {"n_past": 5}
    slow = threading.Event()
    started = threading.Event()
    parkdisk._queue(folder, lambda *a: (started.set(), slow.wait(30)))
    late = parkdisk.save_from(folder, "late", ctypes.addressof(buf), 5, {})
    late.lock.acquire()                                 # as if its write were under way
    t = threading.Thread(target=late.cancel)
    t.start()
    slow.set()
    t.join(0.2)
    assert t.is_alive()                                 # cancel waits for the write
    late.lock.release()
    t.join(10)
    parkdisk.flush(folder)
    assert not (tmp_path / "late.state").exists()       # cancelled before it could start

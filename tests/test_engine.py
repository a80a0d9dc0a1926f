"""The worker's engine in-process with real llama.cpp on CPU: refcounts, swaps, exactness."""
import pytest

from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError, Reason
from lmx.common.jobs import DecodeResult, ParkResult, UnregisterResult
from lmx.worker import parkdisk
from ggufs import write_unknown_arch

BIG = 1 << 40       # a ram_bytes any parked state fits


@pytest.fixture(scope="module")
def engine():
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False)
    yield eng
    eng.close()


def test_models_are_shared_by_refcount(engine, smol_path):
    first = engine.register("a", smol_path, ContextSpec(n_ctx=512))
    assert first.model_loaded is True and first.model_measured.device_bytes > 0
    again = engine.register("b", smol_path, ContextSpec(n_ctx=512))
    assert again.model_loaded is False and again.model_refs == 2
    assert engine.unregister("a") == UnregisterResult(model_freed=False)
    assert engine.unregister("b") == UnregisterResult(model_freed=True)
    assert engine.models == {} and engine.slots == {}


def test_failed_load_leaves_nothing(engine, tmp_path):
    odd = write_unknown_arch(tmp_path / "odd.gguf")
    with pytest.raises(LmxError) as info:
        engine.register("odd", str(odd), ContextSpec(n_ctx=512))
    assert info.value.reason == Reason.LOAD_FAILED
    assert "nonesuch" in info.value.message or "architecture" in info.value.message
    assert engine.models == {} and engine.slots == {}


def test_swap_and_restore_is_exact(engine, smol_path, gemma_path):
    engine.register("s", smol_path, ContextSpec(n_ctx=1024))
    engine.register("g", gemma_path, ContextSpec(n_ctx=1024))
    engine.register("ref", smol_path, ContextSpec(n_ctx=1024, n_batch=256))  # not s's group
    try:
        first = engine.decode("s", "Hello, my name is", 16)
        assert isinstance(first, DecodeResult) and not first.kv_swap_restored
        assert engine.summary().seats[0].measured.device_bytes > 0     # s's group, built
        assert engine.slot_state("s").n_past == first.n_past and engine.slot_state("s").live
        assert engine.park("s", BIG, False) == ParkResult("ram", engine.slots["s"].parked_bytes)
        state = engine.slot_state("s")
        assert state.parked == "ram" and state.parked_bytes > 0 and not state.live
        assert state.n_past == first.n_past and state.parks == 1
        assert engine.summary().live_agents == []
        assert engine.summary().parked_ram_bytes == state.parked_bytes
        other = engine.decode("g", "The capital of France is", 8)
        assert engine.park("g", BIG, False).parked == "ram"   # Gemma: sliding-window KV too
        resumed = engine.decode("s", "The weather today is", 16)
        assert resumed.kv_swap_restored is True
        again = engine.decode("g", "and the capital of Italy is", 8)
        assert again.kv_swap_restored is True
        # The same conversations with no park in between.
        ref1 = engine.decode("ref", "Hello, my name is", 16)
        ref2 = engine.decode("ref", "The weather today is", 16)
        assert ref1.tokens == first.tokens
        assert ref2.tokens == resumed.tokens and ref2.text == resumed.text
        assert not ref2.kv_swap_restored
        engine.unregister("s")
        assert engine.slot_state("s") is None
        engine.register("s", gemma_path, ContextSpec(n_ctx=1024))
        assert engine.decode("s", "The capital of France is", 8).tokens == other.tokens
        assert engine.decode("s", "and the capital of Italy is", 8).tokens == again.tokens
    finally:
        for agent in ("s", "g", "ref"):
            engine.unregister(agent)
    assert engine.parked_ram == 0 and engine.groups == []     # models freed, their groups too


def test_context_full_is_refused_before_any_work(engine, smol_path):
    engine.register("c", smol_path, ContextSpec(n_ctx=64))
    try:
        with pytest.raises(LmxError) as info:
            engine.decode("c", "Hello " * 40, 40)
        assert info.value.code == Code.CONTEXT_FULL
        assert engine.slots["c"].group is None and engine.slots["c"].pending == []
        assert engine.decode("c", "Hi", 4).generated_tokens >= 1
    finally:
        engine.unregister("c")


PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time",
           "def fib(n):"]


def _run_together(eng, agents, prompts, n):
    return eng.run_all([eng.start(a, p, n) for a, p in zip(agents, prompts)])


def _parked_in(eng):
    return {a: eng.slot_state(a).parked for a in eng.slots}


def test_batched_agents_match_solo_and_park_to_ram_or_disk(smol_path, tmp_path):
    """4 agents in one batch: each equals its solo run; parked to RAM (with a copy on disk) or
    to disk only, as each PARK says, and both kinds of parked state restore exactly."""
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False, park_dir=str(tmp_path))
    agents = ["a0", "a1", "a2", "a3"]
    try:
        for agent in agents + ["ref"]:
            eng.register(agent, smol_path, ContextSpec(n_ctx=512))
        first = _run_together(eng, agents, PROMPTS, 16)
        assert eng.summary().groups == [4]
        assert all(r.batch == 4 for r in first.values())
        assert eng.summary().context_builds == 3      # seats grow 1 -> 2 -> 4, then free
        where = [eng.park("a1", BIG, True).parked, eng.park("a2", 0, True).parked,
                 eng.park("a3", 0, True).parked]
        assert where == ["ram", "disk", "disk"]
        parkdisk.flush()                               # a RAM park's copy follows the PARK
        assert (tmp_path / "a1.state").exists()       # a RAM park keeps a copy for restarts
        assert (tmp_path / "a3.state").exists()
        assert eng.parked_ram == eng.slots["a1"].parked_bytes > 0
        assert [_parked_in(eng)[a] for a in agents] == [None] + where
        second = _run_together(eng, agents, [" and then"] * 4, 8)
        assert [second[a].kv_swap_restored for a in agents] == [False, True, True, True]
        parkdisk.flush()
        assert eng.parked_ram == 0 and not list(tmp_path.glob("a*.state"))
        for agent, prompt in zip(agents, PROMPTS):
            eng.unregister("ref")
            eng.register("ref", smol_path, ContextSpec(n_ctx=512, n_batch=256))
            assert eng.decode("ref", prompt, 16).tokens == first[agent].tokens
            assert eng.decode("ref", " and then", 8).tokens == second[agent].tokens
        for agent in agents + ["ref"]:
            eng.unregister(agent)
        assert eng.groups == [] and eng.models == {}
    finally:
        eng.close()


def test_park_past_the_budget_without_a_state_dir_is_refused(smol_path):
    """disk=True needs a park_dir: without one a state past ram_bytes is refused."""
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False)
    try:
        eng.register("a", smol_path, ContextSpec(n_ctx=512))
        eng.decode("a", "Hello", 4)
        with pytest.raises(LmxError) as info:
            eng.park("a", 1024, True)
        assert info.value.code == Code.LIMIT and info.value.reason == Reason.PARK_BUDGET
        assert info.value.details["ram_bytes"] == 1024 and info.value.details["needed"] > 1024
        assert eng.slots["a"].group is not None             # still live, nothing lost
        assert eng.decode("a", "again", 4).generated_tokens >= 1
    finally:
        eng.close()


def test_park_follows_the_jobs_policy(smol_path, tmp_path):
    """ram_bytes=0 and no disk: refused (LIMIT/PARK_BUDGET), the agent stays live and its
    conversation continues exactly; ram_bytes=0 with disk: a file; a large ram_bytes: RAM."""
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False, park_dir=str(tmp_path))
    try:
        for name in ("a", "ref"):
            eng.register(name, smol_path, ContextSpec(n_ctx=512, n_batch=256 if name == "ref"
                                                      else 512))
        out = [eng.decode("a", PROMPTS[0], 6)]
        before = eng.slot_state("a")
        with pytest.raises(LmxError) as info:
            eng.park("a", 0, False)
        assert (info.value.code, info.value.reason) == (Code.LIMIT, Reason.PARK_BUDGET)
        assert info.value.details["ram_bytes"] == 0 and info.value.details["needed"] > 0
        assert eng.slot_state("a") == before and before.live and before.parked is None
        parkdisk.flush()
        assert eng.parked_ram == 0 and not list(tmp_path.glob("a.*"))
        out.append(eng.decode("a", " and then", 6))
        assert not out[-1].kv_swap_restored                  # never left its context
        assert eng.park("a", 0, True) == ParkResult("disk", eng.slots["a"].parked_bytes)
        assert eng.parked_ram == 0 and (tmp_path / "a.state").exists()
        assert eng.slot_state("a").parked == "disk" and not eng.slot_state("a").live
        out.append(eng.decode("a", " so", 6))
        assert out[-1].kv_swap_restored
        assert eng.park("a", BIG, False).parked == "ram"
        assert eng.parked_ram == eng.slot_state("a").parked_bytes > 0
        parkdisk.flush()
        assert not (tmp_path / "a.state").exists()           # disk=False: no copy
        out.append(eng.decode("a", " then", 6))
        assert out[-1].kv_swap_restored
        for prompt, got in zip([PROMPTS[0], " and then", " so", " then"], out):
            assert eng.decode("ref", prompt, 6).tokens == got.tokens
    finally:
        eng.close()


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_a_group_needs_no_more_than_its_members_alone(which, smol_path, gemma_path):
    """What the broker books for k batched agents (k single contexts) covers their shared
    context: KV equal, one compute buffer instead of k."""
    from lmx.worker.engine import Engine
    path = smol_path if which == "smol" else gemma_path
    eng = Engine(2, gpu=False, pinned=False)
    try:
        for i in range(4):
            eng.register(f"a{i}", path, ContextSpec(n_ctx=1024))
        single = eng.measure("a0").device_bytes
        _run_together(eng, [f"a{i}" for i in range(4)], PROMPTS, 2)
        group = eng.groups[0]
        assert len(group.members) == 4
        shared = group.measured.device_bytes
        kv = sum(v for k, v in group.buffers.items() if k.endswith("KV"))
        assert kv > 0 and shared <= 4 * single, (shared, single)
        assert shared > single
    finally:
        eng.close()


@pytest.mark.parametrize("which", ["smol", "gemma"])
def test_sequences_move_between_groups_of_other_sizes(which, smol_path, gemma_path):
    """A sequence saved from a group of 3 restores into groups of 2 and 3 (one KV stream per
    sequence: seqstate re-addresses the state; Gemma has two caches, SmolLM2 one)."""
    from lmx.worker.engine import Engine
    path = smol_path if which == "smol" else gemma_path
    eng = Engine(2, gpu=False, pinned=False)
    try:
        for name in ("a0", "a1", "a2", "r0", "r1", "r2"):
            eng.register(name, path, ContextSpec(n_ctx=512, n_batch=256 if name[0] == "r"
                                                 else 512))
        a, r = ["a0", "a1", "a2"], ["r0", "r1", "r2"]
        first = _run_together(eng, a, PROMPTS[:3], 8)
        ref1 = _run_together(eng, r, PROMPTS[:3], 8)
        assert eng.park("a1", BIG, False).parked == "ram"   # a0, a2: carried from 3 streams to 2
        middle = _run_together(eng, ["a0", "a2"], [" then", " then"], 6)
        eng.park("a0", BIG, False)                       # a2 alone: 2 streams to 1
        assert eng.summary().groups.count(1) == 1
        last = _run_together(eng, a, [" and", " and", " and"], 6)   # 1 -> 3, a0 and a1 back
        ref_mid = _run_together(eng, ["r0", "r2"], [" then", " then"], 6)
        ref_last = _run_together(eng, r, [" and", " and", " and"], 6)
        for x, y in zip(a, r):
            assert first[x].tokens == ref1[y].tokens
            assert last[x].tokens == ref_last[y].tokens, x
        assert [middle[x].tokens for x in ("a0", "a2")] == [
            ref_mid[y].tokens for y in ("r0", "r2")]
    finally:
        eng.close()


def test_a_foreign_state_is_refused_not_guessed():
    import ctypes
    from lmx.worker import seqstate
    for junk in (b"", b"\x00" * 64, b"\xd8\x3c\x14\xaf" + b"\x00" * 4 + b"\xff" * 40):
        buf = (ctypes.c_uint8 * (len(junk) + seqstate.SPARE)).from_buffer_copy(
            junk + bytes(seqstate.SPARE))
        with pytest.raises(seqstate.StateFormatError):
            seqstate.restream(ctypes.addressof(buf), len(junk), len(buf), 2)


def test_a_context_that_cannot_be_built_keeps_parked_state(smol_path, monkeypatch):
    """llama_init_from_model fails while a parked agent rejoins: its parked state and counters
    stay (it restores exactly later), the live members are reset and told so."""
    import llama_cpp
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False)
    try:
        for name in ("a", "b", "p", "c", "d", "ref"):
            eng.register(name, smol_path, ContextSpec(n_ctx=512, n_batch=256 if name == "ref"
                                                      else 512))
        _run_together(eng, ["a", "b", "p"], PROMPTS[:3], 6)
        eng.park("p", BIG, False)
        eng.make_live([eng.slots["c"], eng.slots["d"]])    # every seat of 4 taken: p's
        assert eng.summary().seats[0].used == 4            # rejoin must grow the context
        kept = (eng.slots["p"].n_past, list(eng.slots["p"].pending), eng.parked_ram)
        real = llama_cpp.llama_init_from_model
        monkeypatch.setattr(llama_cpp, "llama_init_from_model", lambda *a: None)
        run = eng.start("p", " and then", 4)
        with pytest.raises(LmxError) as info:
            eng.prepare([run])
        assert info.value.reason == Reason.CONTEXT_FAILED
        slot = eng.slots["p"]
        slot.pending = run.prior                          # what the scheduler does
        assert (slot.n_past, slot.pending, eng.parked_ram) == kept and slot.parked is not None
        assert eng.slots["a"].n_past == 0 and eng.groups == []     # live ones: reset
        monkeypatch.setattr(llama_cpp, "llama_init_from_model", real)
        resumed = eng.decode("p", " and then", 6)
        assert resumed.kv_swap_restored is True
        eng.decode("ref", PROMPTS[2], 6)
        assert eng.decode("ref", " and then", 6).tokens == resumed.tokens
    finally:
        eng.close()


def test_a_lost_state_is_state_lost_and_the_conversation_restarts(smol_path, tmp_path):
    """A parked state whose file is gone: the DECODE gets STATE_LOST, the agent's
    conversation is reset, and its next DECODE starts afresh."""
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False, park_dir=str(tmp_path))
    try:
        for name in ("a", "ref"):
            eng.register(name, smol_path, ContextSpec(n_ctx=512))
        eng.decode("a", PROMPTS[0], 4)
        assert eng.park("a", 0, True).parked == "disk"
        (tmp_path / "a.json").unlink()
        with pytest.raises(LmxError) as info:
            eng.decode("a", " and then", 4)
        assert info.value.code == Code.STATE_LOST and info.value.details["agent"] == "a"
        state = eng.slot_state("a")
        assert state.n_past == 0 and state.parked is None and eng.lost == {}
        assert eng.decode("a", PROMPTS[1], 6).tokens == eng.decode("ref", PROMPTS[1], 6).tokens
    finally:
        eng.close()


class _Frames:
    """Stands in for the results socket: keeps every message sent."""

    def __init__(self):
        self.sent = []

    def send_multipart(self, frames):
        import msgpack
        self.sent.append(msgpack.unpackb(frames[0]))


class _Watched(_Frames):
    """_Frames that lets the test wait for a message (sent from the scheduler's thread)."""

    def __init__(self):
        super().__init__()
        import threading
        self.cond = threading.Condition()

    def send_multipart(self, frames):
        with self.cond:
            super().send_multipart(frames)
            self.cond.notify_all()

    def wait_for(self, pred, timeout=120):
        with self.cond:
            assert self.cond.wait_for(lambda: any(pred(m) for m in self.sent), timeout)


def test_a_newcomer_joins_the_next_step_not_the_next_quantum(smol_path):
    """With a quantum of 1000 steps, a DECODE arriving while another runs joins its next step:
    the short one (2 tokens) finishes long before the long one (120), batched with it."""
    import queue
    import threading
    import time
    from lmx.common.jobs import DecodeJob, RegisterJob, Result
    from lmx.worker.engine import Engine
    from lmx.worker.scheduler import Incoming, Scheduler
    eng, sock = Engine(2, gpu=False, pinned=False), _Watched()
    sched, jobs = Scheduler(eng, sock, set(), quantum=1000), queue.Queue()
    thread = threading.Thread(target=sched.run, args=(jobs,))
    thread.start()

    def put(i, job):
        jobs.put(Incoming(i, job.VERB, job, time.monotonic()))
    try:
        for i, name in ((1, "long"), (2, "short")):
            put(i, RegisterJob(name, smol_path, ContextSpec(n_ctx=512).as_dict()))
        sock.wait_for(lambda m: m["verb"] == "RESULT" and m["id"] == 2)
        put(3, DecodeJob("long", PROMPTS[0], 120, stream=True))
        sock.wait_for(lambda m: m["verb"] == "TOKENS" and any(t[0] == 3 for t in m["tokens"]))
        put(4, DecodeJob("short", PROMPTS[1], 2))
        sock.wait_for(lambda m: m["verb"] == "RESULT" and m["id"] == 3)
    finally:
        jobs.put(None)
        thread.join(120)
        eng.close()
    order = [m["id"] for m in sock.sent if m["verb"] == "RESULT"]
    assert order.index(4) < order.index(3)
    results = {m["id"]: Result.from_wire(m) for m in sock.sent if m["verb"] == "RESULT"}
    long, short = (DecodeResult.from_wire(results[i].out) for i in (3, 4))
    assert long.generated_tokens == 120 and short.generated_tokens == 2
    assert short.batch == 2


def test_the_scheduler_answers_each_job_with_one_typed_result(smol_path):
    """REGISTER, DECODE, PARK (with a DECODE in flight: INTERNAL), PARK, UNREGISTER: one
    RESULT each, whose fields are jobs.Result's, the verb's record in out."""
    import time
    from lmx.common.jobs import (DecodeJob, ParkJob, RegisterJob, RegisterResult, Result,
                                 UnregisterJob)
    from lmx.worker.engine import Engine
    from lmx.worker.scheduler import Incoming, Scheduler
    eng, sock = Engine(2, gpu=False, pinned=False), _Frames()
    sched, now = Scheduler(eng, sock, set()), time.monotonic()

    def run(*batch):
        for i, job in batch:
            sched._take(Incoming(i, job.VERB, job, now))
        while sched.waiting or sched.running:
            sched._round()
    run((1, RegisterJob("a", smol_path, ContextSpec(n_ctx=512).as_dict())),
        (2, DecodeJob("a", PROMPTS[0], 4)), (3, ParkJob("a", BIG, False)))
    run((4, ParkJob("a", BIG, False)), (5, UnregisterJob("a")))
    try:
        results = {m["id"]: Result.from_wire(m) for m in sock.sent if m["verb"] == "RESULT"}
        assert sorted(results) == [1, 2, 3, 4, 5]
        assert set(sock.sent[0]) == {"v", "id", "verb", "status", "slot", "engine", "error",
                                     "out"}
        reg = results[1]
        assert reg.ok and RegisterResult.from_wire(reg.out).model_loaded
        assert reg.slot.agent == "a" and not reg.slot.live and reg.engine.models
        assert results[3].error["code"] == Code.INTERNAL and "status" not in results[3].error
        dec = DecodeResult.from_wire(results[2].out)
        assert dec.generated_tokens >= 1 and results[2].slot.n_past == dec.n_past
        assert results[4].ok and results[4].out["parked"] == "ram"
        assert results[4].slot.parked == "ram" and results[4].engine.parked_ram_bytes > 0
        assert results[5].ok and results[5].slot is None and results[5].out == {
            "model_freed": True}
    finally:
        eng.close()


def test_runs_that_end_in_one_step_send_the_engine_summary_once(smol_path):
    """Three agents of one group decode 3 tokens together and end in the same step: three
    RESULTs, each with its slot, and the engine's summary only with the last (at 80 agents
    80 copies of it were built and decoded)."""
    import time
    from lmx.common.jobs import DecodeJob, RegisterJob, Result
    from lmx.worker.engine import Engine
    from lmx.worker.scheduler import Incoming, Scheduler
    eng, sock = Engine(2, gpu=False, pinned=False), _Frames()
    sched, now = Scheduler(eng, sock, set()), time.monotonic()
    try:
        for i, name in enumerate("abc"):
            sched._take(Incoming(i + 1, "REGISTER", RegisterJob(
                name, smol_path, ContextSpec(n_ctx=512).as_dict()), now))
        for i, name in enumerate("abc"):
            sched._take(Incoming(i + 4, "DECODE", DecodeJob(name, PROMPTS[0], 3), now))
        while sched.waiting or sched.running:
            sched._round()
        results = [Result.from_wire(m) for m in sock.sent if m["verb"] == "RESULT"]
        runs = [r for m, r in zip([m for m in sock.sent if m["verb"] == "RESULT"], results)
                if m["id"] >= 4]
        assert len(runs) == 3 and all(r.ok and r.slot is not None for r in runs)
        assert [r.engine is not None for r in runs] == [False, False, True]
        assert sorted(runs[-1].engine.live_agents) == ["a", "b", "c"]
    finally:
        eng.close()


def test_a_resize_carries_every_member_and_parking_never_rebuilds(smol_path):
    """Seats as the broker places them: 4 agents in a group of 8; parking and restoring swap
    seats without a build; RESIZE shrinks the group to its members, packed to the first seats,
    and each conversation continues exactly as a never-resized twin's."""
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False)
    agents, twins = ["a0", "a1", "a2", "a3"], ["t0", "t1"]
    try:
        for name in agents:
            eng.register(name, smol_path, ContextSpec(n_ctx=512), seat={"group": 7,
                                                                        "capacity": 8})
        for name in twins:
            eng.register(name, smol_path, ContextSpec(n_ctx=512, n_batch=256))
        group = eng.group(7)
        assert (group.capacity, len(group.members), group.builds) == (8, 4, 1)
        first = _run_together(eng, agents + twins, PROMPTS + PROMPTS[1:4:2], 8)
        builds = eng.context_builds
        eng.park("a0", BIG, False)                       # a free seat: no build
        eng.make_live([eng.slots["a0"]])                 # back into a free seat: no build
        assert group.builds == 1 and eng.context_builds == builds
        eng.reclaim(7, 4)                                # shrink to the members
        assert (group.capacity, group.builds) == (4, 2)
        assert sorted(s.seq for s in group.members) == [0, 1, 2, 3]
        then = _run_together(eng, agents + twins, [" and then"] * 6, 8)
        for name, twin in (("a1", "t0"), ("a3", "t1")):
            assert first[name].tokens == first[twin].tokens
            assert then[name].tokens == then[twin].tokens
        with pytest.raises(LmxError):                    # fewer seats than members: refused
            eng.reclaim(7, 2)
        for name in agents:
            eng.unregister(name)
        eng.reclaim(7, 0)                                # an empty group is freed
        assert eng.group(7) is None
    finally:
        eng.close()


SMALL_BATCH = dict(n_ctx=256, n_batch=32, n_ubatch=32)
LONG = "The quick brown fox jumps over the lazy dog, and then it runs far away into the wood"


def _small_batch_group(smol_path, agents, capacity):
    """An engine with agents a0.. seated in one group of `capacity` seats and a solo "twin",
    all with n_batch 32 (so prompts need several chunks)."""
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False)
    for i in range(agents):
        eng.register(f"a{i}", smol_path, ContextSpec(**SMALL_BATCH),
                     seat={"group": 3, "capacity": capacity})
    eng.register("twin", smol_path, ContextSpec(**SMALL_BATCH))
    return eng


def test_fillers_never_push_a_batch_past_n_batch(smol_path):
    """Two long prompts at the far ends of a group of 8 seats with n_batch 32: the seats between
    them need fillers (a batch must be contiguous in seats), and the prompt chunks leave room
    for them, so no llama_decode gets more than n_batch tokens (llama.cpp aborts the process on
    that); both continue exactly as a solo twin."""
    eng = _small_batch_group(smol_path, 8, 8)
    long = LONG
    try:
        assert len(eng.slots["a0"].model.tokenize(long, True)) > 16
        assert (eng.slots["a0"].seq, eng.slots["a7"].seq) == (0, 7)
        both = eng.run_all([eng.start("a7", long, 6), eng.start("a0", long, 6)])
        solo = eng.run_all([eng.start("twin", long, 6)])["twin"]
        assert both["a7"].tokens == both["a0"].tokens == solo.tokens
    finally:
        eng.close()


def test_a_newcomer_between_running_seats_continues_exactly(smol_path):
    """Agents on seats 0 and 2 are generating when the agent on seat 1 arrives with a long
    prompt: its prompt goes in chunks while the others' rows step around it (fillers for seat
    1 in the rows' batch, for seats between in the prompts' batch), and all three continue
    exactly as solo twins."""
    eng = _small_batch_group(smol_path, 3, 4)
    spec, long = SMALL_BATCH, LONG
    try:
        eng.run_all([eng.start(f"a{i}", PROMPTS[3], 2) for i in range(3)])   # a history each
        first = [eng.start("a0", PROMPTS[0], 12), eng.start("a2", PROMPTS[1], 12)]
        eng.prepare(first)
        for _ in range(3):
            assert not eng.step(first)
        late = eng.start("a1", long, 6)
        eng.prepare([late])
        runs, done = first + [late], {}
        while runs:
            for run in eng.step(runs):
                done[run.agent] = run.result
            runs = [r for r in runs if r.result is None]
        for agent, prompt, n in (("a0", PROMPTS[0], 12), ("a2", PROMPTS[1], 12),
                                 ("a1", long, 6)):
            eng.unregister("twin")
            eng.register("twin", smol_path, ContextSpec(**spec))
            eng.run_all([eng.start("twin", PROMPTS[3], 2)])
            solo = eng.run_all([eng.start("twin", prompt, n)])["twin"]
            assert done[agent].tokens == solo.tokens, agent
    finally:
        eng.close()


def test_parked_files_are_written_behind_in_order_and_reads_wait_for_them(tmp_path):
    """A copy queued while the writer is busy does not hold up its caller; removals and
    rewrites apply in the order asked, and a read sees the last of them."""
    import ctypes
    import threading
    folder, gate = str(tmp_path), threading.Event()
    key = {"model": "m", "spec": {}}
    first, second = (ctypes.create_string_buffer(raw, len(raw)) for raw in (b"first", b"second"))
    parkdisk._queue(folder, lambda *_: gate.wait(30))      # the writer is busy
    parkdisk.save_from(folder, "a", ctypes.addressof(first), 5, dict(key, n=1))
    parkdisk.remove(folder, "a")
    parkdisk.save_from(folder, "a", ctypes.addressof(second), 6, dict(key, n=2))
    assert not (tmp_path / "a.state").exists()             # queued, the caller went on
    gate.set()
    assert parkdisk.load(folder, "a", key) == (b"second", dict(key, n=2))
    parkdisk.remove(folder, "a")
    assert parkdisk.load(folder, "a", key) is None


def test_a_steps_tokens_are_streamed_while_the_next_step_is_computed(smol_path):
    """With on_launch set (the scheduler sets it), a token is streamed by the next step's
    launch (llama_decode has returned; on the GPU it is still computing), not before it; the
    result's text and the streamed text agree once the pending tokens are out."""
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False)
    streamed, launches = [], []
    eng.on_launch = lambda: (launches.append(len(streamed)), eng.emit_pending())
    try:
        eng.register("a", smol_path, ContextSpec(n_ctx=512))
        run = eng.start("a", "Once upon a time", 4,
                        on_token=lambda i, tok, text: streamed.append(text))
        eng.prepare([run])
        eng.step([run])                     # the prompt and the first token
        assert streamed == [] and run.emit.first    # taken (its time noted), not streamed
        eng.step([run])
        assert len(streamed) == 1 and launches[-1] == 0     # streamed at the second launch
        while run.result is None:
            eng.step([run])
        eng.emit_pending()
        assert "".join(streamed) == run.result.text and len(streamed) == 4
    finally:
        eng.close()


def test_freed_park_buffers_are_reused_within_the_pool_limit(monkeypatch):
    """A freed buffer comes back for a state of its power-of-two size class, a grown one
    included (no new allocation: pinned ones cost milliseconds to allocate and free); a much
    smaller state gets a new one; past POOL_BYTES freed buffers are released; above
    CLASS_MAX a buffer is the state's size."""
    from lmx.worker.device import HostBuffer
    HostBuffer.drain()
    monkeypatch.setattr(HostBuffer, "POOL_BYTES", 3 << 20)
    a = HostBuffer.get(600_000, False)
    assert a.size == 1 << 20 and a.nbytes == 600_000
    a.free()
    b = HostBuffer.get((1 << 20) - 1000, False)           # the state grew: same class
    assert b is a and b.nbytes == (1 << 20) - 1000
    small = HostBuffer.get(1 << 10, False)
    assert small is not a and small.size == HostBuffer.CLASS_MIN
    b.free()
    assert HostBuffer.get((1 << 20) + 1, False) is not a   # the next class
    assert HostBuffer.size_class(HostBuffer.CLASS_MAX + 1) == HostBuffer.CLASS_MAX + 1
    HostBuffer.drain()
    big = [HostBuffer.get(2 << 20, False) for _ in range(2)]
    for buf in big:
        buf.free()
    assert len(HostBuffer._pool) == 1 and HostBuffer._pooled == 2 << 20   # the second did not fit
    HostBuffer.drain()
    assert HostBuffer._pool == [] and HostBuffer._pooled == 0


def test_groups_take_turns_fair_by_tokens_a_long_prompt_does_not_hold_the_worker(smol_path):
    """Two groups (two context sizes): one agent decodes token by token, another brings a
    prompt of about 1,500 tokens (512-token chunks). With turns of at most 512 tokens, every
    chunk ends its group's turn and the decoding agent steps in between; with turns of four
    steps the chunks ran back to back."""
    import queue
    import threading
    import time
    from lmx.common.jobs import DecodeJob, RegisterJob
    from lmx.worker.engine import Engine
    from lmx.worker.scheduler import Incoming, Scheduler
    eng, sock = Engine(2, gpu=False, pinned=False), _Watched()
    steps, step = [], eng.step

    def logged(runs):
        out = step(runs)
        steps.append((runs[0].agent if len({r.agent for r in runs}) == 1 else "both",
                      eng.step_tokens))
        return out
    eng.step = logged
    sched, jobs = Scheduler(eng, sock, set(), quantum=4, turn_tokens=512), queue.Queue()
    thread = threading.Thread(target=sched.run, args=(jobs,))
    thread.start()

    def put(i, job):
        jobs.put(Incoming(i, job.VERB, job, time.monotonic()))
    try:
        put(1, RegisterJob("talker", smol_path, ContextSpec(n_ctx=512).as_dict()))
        put(2, RegisterJob("reader", smol_path, ContextSpec(n_ctx=2048).as_dict()))
        sock.wait_for(lambda m: m["verb"] == "RESULT" and m["id"] == 2)
        put(3, DecodeJob("talker", PROMPTS[0], 200, stream=True))
        sock.wait_for(lambda m: m["verb"] == "TOKENS" and any(t[0] == 3 for t in m["tokens"]))
        put(4, DecodeJob("reader", "The history of the sea. " * 250, 2))
        sock.wait_for(lambda m: m["verb"] == "RESULT" and m["id"] == 4)
    finally:
        jobs.put(None)
        thread.join(120)
        eng.close()
    chunks = [i for i, (who, tokens) in enumerate(steps) if who == "reader" and tokens > 100]
    assert len(chunks) >= 2                          # the prompt came in several chunks
    assert all(steps[i + 1][0] == "talker" for i in chunks[:-1]), steps

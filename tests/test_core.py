"""The broker's pure core, event by event: no sockets, no processes, milliseconds each."""
from hypothesis import given, settings
from hypothesis import strategies as st

from core_harness import CONTEXT, WEIGHTS, Harness, MiB
from lmx.broker.core.events import CancelJob, KillWorker, SpawnWorker, WorkerLost, WorkerReady
from lmx.common.errors import Code, Reason
from lmx.common.jobs import DeviceReading, EngineSummary


def test_register_decode_unregister_books_and_releases_everything():
    h = Harness()
    reg = h.send("REGISTER", agent="a", model="small")
    assert h.core.ledger.allocated_bytes == WEIGHTS["small"] + CONTEXT   # booked before built
    assert [j.verb for j in h.jobs()] == ["REGISTER"]
    h.run_jobs()
    assert h.final(reg)["status"] == "ok" and h.final(reg)["booked_bytes"] == CONTEXT
    dec = h.send("DECODE", agent="a", prompt="hi", n_predict=3)
    h.run_jobs()
    assert h.final(dec)["generated_tokens"] == 3 and h.final(dec)["kv_swap_parked"] == []
    unr = h.send("UNREGISTER", agent="a")
    h.run_jobs()
    assert h.final(unr)["released_bytes"] == WEIGHTS["small"] + CONTEXT
    assert h.core.ledger.allocated_bytes == 0 and not h.core.agents and not h.core.lanes


def test_a_register_over_the_cap_is_refused_with_the_numbers_and_books_nothing():
    h = Harness(total=120 * MiB)
    reg = h.send("REGISTER", agent="a", model="small")
    err = h.final(reg)
    assert (err["code"], err["reason"]) == (Code.VRAM_LEDGER_DENY, Reason.CAP)
    assert err["requested_bytes"] == WEIGHTS["small"] + CONTEXT
    assert err["ledger_max_bytes"] == 120 * MiB and err["ledger_allocated_bytes"] == 0
    assert h.core.ledger.allocated_bytes == 0 and not h.jobs()


def test_a_failed_build_unwinds_the_booking():
    h = Harness()
    reg = h.send("REGISTER", agent="a", model="small")
    h.run_jobs(fail=Code.MODEL_ERROR)
    assert h.final(reg)["code"] == Code.MODEL_ERROR
    assert h.core.ledger.allocated_bytes == 0 and not h.core.agents and not h.core.models


def test_pipelined_requests_on_one_agent_apply_in_the_order_sent():
    h = Harness()
    ids = [h.send(verb, agent="p", model="small") if verb == "REGISTER" else
           h.send(verb, agent="p") for verb in ["REGISTER", "UNREGISTER"] * 3]
    assert len(h.jobs()) == 1            # one job per agent at the worker at a time
    h.run_jobs()
    assert [h.final(i)["status"] for i in ids] == ["ok"] * 6
    assert h.core.ledger.allocated_bytes == 0


def test_cancel_of_a_queued_decode_answers_at_once():
    h = Harness()
    h.send("REGISTER", agent="a", model="small")
    h.run_jobs()
    running = h.send("DECODE", agent="a", prompt="x", n_predict=50)
    queued = h.send("DECODE", agent="a", prompt="y", n_predict=5)
    cancel = h.send("CANCEL", agent="a", request=queued)
    assert h.final(cancel)["cancelled"] == "queued"
    assert h.final(queued)["code"] == Code.CANCELLED          # before the running one ends
    assert h.final(running) is None and len(h.jobs("DECODE")) == 1


def test_cancel_of_a_running_decode_goes_to_the_worker():
    h = Harness()
    h.send("REGISTER", agent="a", model="small")
    h.run_jobs()
    running = h.send("DECODE", agent="a", prompt="x", n_predict=50)
    actions = h.core.handle(__import__("lmx.broker.core.events", fromlist=["ClientRequest"])
                            .ClientRequest(b"c1", 99, "CANCEL", {"agent": "a",
                                                                 "request": running}, 1, 1))
    assert any(isinstance(a, CancelJob) and a.job_id == h.jobs("DECODE")[0].job_id
               for a in actions)


def test_a_queued_decode_expires_at_its_deadline_not_when_the_one_ahead_ends():
    h = Harness()
    h.send("REGISTER", agent="a", model="small")
    h.run_jobs()
    h.send("DECODE", agent="a", prompt="x", n_predict=50)
    late = h.send("DECODE", agent="a", prompt="y", n_predict=5, deadline_ms=300)
    h.tick(0.2)
    assert h.final(late) is None
    h.tick(0.2)
    assert h.final(late)["code"] == Code.DEADLINE


def _two_live_then_third(h):
    for name in ("a", "b"):
        h.send("REGISTER", agent=name, model="small")
        h.run_jobs()
        h.send("DECODE", agent=name, prompt="x", n_predict=4)
        h.run_jobs()


def test_parking_is_confirmed_before_the_freed_bytes_are_booked_again():
    # room for the weights and two contexts: the third agent's DECODE must park one
    h = Harness(total=WEIGHTS["small"] + 2 * CONTEXT, admit_by_parking=True)
    _two_live_then_third(h)
    reg = h.send("REGISTER", agent="c", model="small")
    assert [j.verb for j in h.jobs()] == ["PARK"] and h.jobs()[0].fields["agent"] == "a"
    before = h.core.ledger.allocated_bytes
    assert before == WEIGHTS["small"] + 2 * CONTEXT        # nothing released yet
    h.answer()                                              # the worker confirms the PARK
    assert [j.verb for j in h.jobs()] == ["REGISTER"]
    h.run_jobs()
    assert h.final(reg)["status"] == "ok" and h.final(reg)["kv_swap_parked"] == ["a"]
    dec = h.send("DECODE", agent="a", prompt="more", n_predict=2)   # a is parked: park b
    assert [j.verb for j in h.jobs()] == ["PARK"] and h.jobs()[0].fields["agent"] == "b"
    h.run_jobs()                        # (used before c registered: least recently)
    assert h.final(dec)["kv_swap_evicted"] == "b" and h.final(dec)["kv_swap_parked"] == ["b"]
    assert all(alloc <= cap for alloc, cap in h.ledger_trace)


def test_a_refused_park_keeps_the_victim_booked_and_the_waiter_gets_the_reason():
    h = Harness(total=WEIGHTS["small"] + 2 * CONTEXT, park_ram=10, park_to_disk=False)
    _two_live_then_third(h)
    h.send("DECODE", agent="a", prompt="x", n_predict=1)
    h.run_jobs()
    # c registers into the room a leaves... there is none: REGISTER does not park here
    h.core.config.admit_by_parking = True
    reg = h.send("REGISTER", agent="c", model="small")
    assert [j.verb for j in h.jobs()] == ["PARK"]
    h.run_jobs()                    # refused: over the 10-byte budget, no disk
    err = h.final(reg)
    assert err["status"] == "error"
    assert h.core.agents["b"].live and h.core.ledger.booked("agent:b") == CONTEXT
    assert all(alloc <= cap for alloc, cap in h.ledger_trace)


def test_park_budget_is_the_brokers_the_worker_gets_the_room_left():
    h = Harness(total=WEIGHTS["small"] + 2 * CONTEXT, admit_by_parking=True, park_ram=10_000)
    _two_live_then_third(h)
    h.send("REGISTER", agent="c", model="small")
    assert h.jobs("PARK")[0].fields["ram_bytes"] == 10_000
    h.run_jobs()                                          # a parks 5,000 bytes in RAM
    assert h.core.agents["a"].parked == "ram"
    h.send("DECODE", agent="c", prompt="x", n_predict=2)
    h.run_jobs()
    h.send("REGISTER", agent="d", model="small")         # parks b: 5,000 bytes are left
    assert h.jobs("PARK")[0].fields["ram_bytes"] == 10_000 - h.core.agents["a"].parked_bytes


def test_worker_lost_fails_everything_held_keeps_the_weights_and_frees_the_seats():
    h = Harness()
    h.send("REGISTER", agent="a", model="small")
    h.run_jobs()
    running = h.send("DECODE", agent="a", prompt="x", n_predict=50)
    queued = h.send("DECODE", agent="a", prompt="y", n_predict=5)
    actions = h.core.handle(WorkerLost("exited", h.now))
    assert any(isinstance(a, SpawnWorker) for a in actions)
    h.worker.pending.clear()
    h.worker.groups.clear()
    codes = [a.fields["code"] for a in actions if hasattr(a, "fields") and a.fields]
    assert codes.count(Code.WORKER_LOST) == 2
    assert h.core.ledger.allocated_bytes == WEIGHTS["small"] and not h.core.groups
    assert (running, queued) and h.core.agents["a"].state == "restoring"
    h.feed(WorkerReady(2, DeviceReading("cpu", "declared", "cpu", 1000 * MiB), h.now))
    assert [(j.verb, j.fields["resume"]) for j in h.jobs()] == [("REGISTER", True)]
    dec = h.send("DECODE", agent="a", prompt="z", n_predict=1)   # waits behind the restore
    h.run_jobs()
    assert h.final(dec)["context_reset"] is True


def test_a_silent_worker_is_killed_after_liveness_intervals():
    h = Harness(heartbeat_s=1.0, liveness=2)
    actions = h.core.handle(__import__("lmx.broker.core.events", fromlist=["Tick"])
                            .Tick(h.now + 2.5, 0))
    assert any(isinstance(a, KillWorker) for a in actions)
    assert h.core.worker.state == "lost"


def test_no_overhead_is_booked_on_a_cpu_worker_whatever_its_readings():
    h = Harness()
    h.send("REGISTER", agent="a", model="small")
    job = h.worker.pending.pop(0)
    result = h.worker.answer(job)
    result.engine.known_device_bytes, result.engine.process_bytes = 5 * MiB, 0
    h.feed(__import__("lmx.broker.core.events", fromlist=["WorkerResult"])
           .WorkerResult(job.job_id, result, h.now, h.now))
    h.send("UNREGISTER", agent="a")
    h.run_jobs()
    assert h.core.ledger.allocated_bytes == 0 and h.core.ledger.booked("worker:overhead") is None


# -- property: random traffic never overbooks and never leaves a booking without its agent --

OPS = st.lists(st.tuples(st.sampled_from(["register", "decode", "unregister", "cancel",
                                          "answer", "fail", "tick", "lost"]),
                         st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 3)),
               max_size=60)


@settings(max_examples=150, deadline=None)
@given(OPS, st.booleans(), st.sampled_from([0, 2_000, 1 << 30]), st.integers(0, 2),
       st.sampled_from([0, 0.02]))
def test_random_traffic_never_overbooks(ops, by_parking, park_ram, max_live, grace):
    h = Harness(total=WEIGHTS["small"] + WEIGHTS["big"] + 3 * CONTEXT,
                admit_by_parking=by_parking, park_ram=park_ram, park_to_disk=park_ram == 0,
                state_dir="/nonexistent-state" if park_ram == 0 else "",
                max_live_contexts=max_live, swap_grace_s=grace)
    sent = []
    for op, name, k in ops:
        if op == "register":
            h.send("REGISTER", agent=name, model="big" if k == 3 else "small")
        elif op == "decode":
            sent.append((name, h.send("DECODE", agent=name, prompt="p", n_predict=k + 1,
                                      deadline_ms=50 if k == 0 else None)))
        elif op == "unregister":
            h.send("UNREGISTER", agent=name)
        elif op == "cancel" and sent:
            h.send("CANCEL", agent=sent[k % len(sent)][0], request=sent[k % len(sent)][1])
        elif op in ("answer", "fail") and h.worker.pending:
            h.answer(k % len(h.worker.pending), Code.MODEL_ERROR if op == "fail" else None)
        elif op == "tick":
            h.tick(0.03)
        elif op == "lost":
            h.feed(WorkerLost("exited", h.now))
            h.worker.pending.clear()
            h.worker.groups.clear()                  # its contexts died with it
            h.feed(WorkerReady(9, DeviceReading("cpu", "declared", "cpu",
                                                h.core.ledger.total_bytes), h.now))
        _check_invariants(h)
    h.run_jobs()
    h.tick(0.15)                                    # past any swap's grace (five of them)
    h.run_jobs()
    _check_invariants(h)
    assert not h.core.jobs and not h.core.room, "work left behind after every job answered"
    if not any(op == "fail" for op, _, _ in ops):
        # the broker's seats are the worker's: every group's capacity and members
        assert {g.gid: (g.capacity, g.members) for g in h.core.groups.values()} == {
            gid: (cap, members) for gid, (_, cap, members) in h.worker.groups.items()}


def _check_invariants(h):
    core = h.core
    led = core.ledger
    assert led.allocated_bytes <= led.max_bytes
    assert led.allocated_bytes == sum(led.snapshot()["bookings"].values())
    for key in led.snapshot()["bookings"]:
        kind, _, name = key.partition(":")
        if kind == "agent":
            assert name in core.agents and core.agents[name].live, key
        elif kind == "model":
            assert core.models[name].agents, key
        elif kind == "group":
            group = core.groups[int(name)]
            assert led.snapshot()["bookings"][key] == group.booking() and group.capacity > 0
    for rec in core.agents.values():
        assert rec.live == (led.booked(f"agent:{rec.name}") is not None)
        assert rec.live == (rec.gid is not None)
        if rec.live:
            assert rec.name in core.groups[rec.gid].members
    for group in core.groups.values():
        assert len(group.members) <= group.capacity
        assert all(core.agents[n].gid == group.gid for n in group.members)


def test_while_one_waits_for_room_a_live_agents_decode_waits_behind_it():
    h = Harness(total=WEIGHTS["small"] + 2 * CONTEXT, admit_by_parking=True)
    _two_live_then_third(h)
    h.send("REGISTER", agent="c", model="small")            # parks a
    h.run_jobs()
    long_b = h.send("DECODE", agent="b", prompt="x", n_predict=9)
    long_c = h.send("DECODE", agent="c", prompt="x", n_predict=9)
    wait_a = h.send("DECODE", agent="a", prompt="x", n_predict=1)     # nobody idle: waits
    assert h.core.status_fields()["waiting_for_room"] == 1
    assert [j.fields["agent"] for j in h.jobs()] == ["b", "c"]
    h.answer(0)                                              # b done: b is idle, a parks it
    again_b = h.send("DECODE", agent="b", prompt="y", n_predict=1)    # behind a's, FIFO
    assert [j.verb for j in h.jobs()] == ["DECODE", "PARK"]
    h.run_jobs()
    assert [h.final(i)["status"] for i in (long_b, long_c, wait_a, again_b)] == ["ok"] * 4
    assert h.final(wait_a)["kv_swap_parked"] == ["b"]


def test_a_slow_client_has_its_streams_stopped_and_still_gets_the_final_reply():
    h = Harness()
    h.send("REGISTER", agent="a", model="small")
    h.run_jobs()
    dec = h.send("DECODE", agent="a", prompt="x", n_predict=500, stream=True)
    actions = h.core.handle(__import__("lmx.broker.core.events", fromlist=["ClientSlow"])
                            .ClientSlow(b"c1", h.now))
    assert [type(a).__name__ for a in actions] == ["CancelJob", "Log"]
    h.run_jobs()
    assert h.final(dec)["stopped_by"] == "slow_reader"


def test_a_journal_replay_books_again_and_remembers_what_it_cannot():
    from core_harness import MemJournal, MemMeasured, fake_estimate
    from lmx.broker.core import BrokerConfig, Core
    journal = MemJournal({"a": {"model": "small", "path": "/models/small.gguf",
                                "spec": {"n_ctx": 512}},
                          "gone": {"model": "absent", "path": "/x", "spec": {"n_ctx": 512}}})
    core = Core(BrokerConfig(admission_percent=100), fake_estimate, MemMeasured(), journal)
    actions = core.handle(WorkerReady(1, DeviceReading("cpu", "declared", "cpu", 1000 * MiB),
                                      0.0))
    jobs = [a for a in actions if type(a).__name__ == "SendJob"]
    assert [(j.verb, j.fields["agent"], j.fields["resume"]) for j in jobs] == [
        ("REGISTER", "a", True)]
    # the weights are booked again; its seat only when it runs (not live until then)
    assert core.ledger.booked("model:/models/small.gguf") == WEIGHTS["small"]
    assert core.ledger.booked("agent:a") is None and not core.agents["a"].live
    assert "gone" in core.lost
    assert "gone" not in journal.agents


def test_a_chat_is_checked_then_queued_like_a_decode():
    h = Harness(chat_templates={"/models/small.gguf": "{{ messages }}"})
    h.send("REGISTER", agent="a", model="small")
    h.run_jobs()
    bad = h.send("CHAT", agent="a", messages=[{"role": "user", "content": 3}])
    assert (h.final(bad)["code"], h.final(bad)["field"]) == (Code.BAD_REQUEST,
                                                             "messages[0].content")
    bad = h.send("CHAT", agent="a", messages=[{"role": "user", "content": "x"}], top_p=0)
    assert h.final(bad)["field"] == "top_p" and not h.jobs()
    ok = h.send("CHAT", agent="a", messages=[{"role": "user", "content": "x"}], seed=7,
                stop="END", temperature=0)
    job = h.jobs()[0]
    assert job.verb == "CHAT" and job.fields["template"] == "{{ messages }}"
    assert job.fields["stop"] == ["END"] and job.fields["sampling"]["temperature"] == 0
    assert job.fields["max_tokens"] == 256 and job.fields["tool_choice"] == "none"
    h.run_jobs()
    reply = h.final(ok)
    assert (reply["content"], reply["seed"], reply["finish_reason"]) == ("hi", 7, "stop")
    assert h.core.agents["a"].generated_tokens == 2


def test_a_bug_in_the_core_is_logged_and_the_core_keeps_serving(monkeypatch):
    from lmx.broker.core import outcomes
    h = Harness()
    h.send("REGISTER", agent="a", model="small")
    job = h.jobs()[0]
    monkeypatch.setattr(outcomes, "on_result", lambda core, ev: 1 / 0)
    actions = h.core.handle(__import__("lmx.broker.core.events", fromlist=["WorkerResult"])
                            .WorkerResult(job.job_id, h.worker.answer(job), h.now, h.now))
    assert [(a.level, "ZeroDivisionError" in a.text) for a in actions] == [("exception", True)]
    monkeypatch.undo()
    status = h.send("STATUS")
    assert h.replies[(b"c1", status)][0]["worker_state"] == "ready"


def test_the_worker_state_follows_loss_and_restart():
    from lmx.broker.core.events import WorkerStarting
    h = Harness()
    h.feed(WorkerLost("exited", h.now))
    assert h.core.worker.state == "lost" and h.core.worker.restarts == 1
    h.feed(WorkerStarting(h.now))
    assert h.core.worker.state == "starting"
    h.feed(WorkerReady(3, DeviceReading("cpu", "declared", "cpu", 1000 * MiB), h.now))
    assert h.core.worker.state == "ready" and h.core.worker.pid == 3


def test_a_bug_when_a_request_starts_is_answered_and_never_wedges_its_lane(monkeypatch):
    from lmx.broker.core import booking
    h = Harness()
    real = booking.start_register
    monkeypatch.setattr(booking, "start_register", lambda core, op: {}["boom"])
    bad = h.send("REGISTER", agent="a", model="small")
    assert h.final(bad)["code"] == Code.INTERNAL and "a" not in h.core.lanes
    monkeypatch.setattr(booking, "start_register", real)
    ok = h.send("REGISTER", agent="a", model="small")
    h.run_jobs()
    assert h.final(ok)["status"] == "ok"


def test_a_seat_taken_over_is_one_in_the_group_where_agents_are_busy():
    """Two full groups of two seats; a DECODE runs on a (group 2); the least recently used
    idle agent is d (group 1), but the newcomer takes over c's seat beside a, so the agents
    that work together share one batch."""
    h = Harness(total=300 * MiB, admit_by_parking=True)
    h.core.config.worker.max_batch = 2
    for name in "dbac":
        h.send("REGISTER", agent=name, model="small")
        h.run_jobs()
    assert {g.gid: sorted(g.members) for g in h.core.groups.values()} == {
        1: ["b", "d"], 2: ["a", "c"]}
    assert h.core.ledger.allocated_bytes == h.core.ledger.max_bytes   # full
    h.send("DECODE", agent="a", prompt="x", n_predict=4)            # a is busy (job in flight)
    reg = h.send("REGISTER", agent="e", model="small")
    assert [j.fields["agent"] for j in h.jobs("PARK")] == ["c"]     # not d, the LRU
    h.run_jobs()
    assert h.final(reg)["status"] == "ok"
    assert h.core.agents["e"].gid == h.core.agents["a"].gid == 2
    assert all(alloc <= cap for alloc, cap in h.ledger_trace)


def test_parked_agents_are_swapped_in_together_and_live_runs_pass_their_parks():
    """Four seats, all taken; three parked agents' DECODEs arrive: their three PARKs go to the
    worker at once (not one after the other's confirmation), and a live agent's DECODE sent
    meanwhile starts at once; then all three swap in, each into a victim's seat."""
    probe = Harness(admit_by_parking=True)
    for name in "abcg":
        probe.send("REGISTER", agent=name, model="small")
        probe.run_jobs()
    h = Harness(total=probe.core.ledger.allocated_bytes, admit_by_parking=True)
    for name in "abcgdef":                  # d, e, f park a, b, c on the way in
        h.send("REGISTER", agent=name, model="small")
        h.run_jobs()
    assert sorted(n for n, a in h.core.agents.items() if a.live) == ["d", "e", "f", "g"]
    runs = [h.send("DECODE", agent=name, prompt="x", n_predict=2) for name in "abc"]
    assert sorted(j.fields["agent"] for j in h.jobs("PARK")) == ["d", "e", "g"]
    live = h.send("DECODE", agent="f", prompt="x", n_predict=2)
    assert [j.fields["agent"] for j in h.jobs("DECODE")] == ["f"]
    h.run_jobs()
    assert [h.final(i)["status"] for i in runs + [live]] == ["ok"] * 4
    assert sorted(n for n, a in h.core.agents.items() if a.live) == ["a", "b", "c", "f"]
    assert all(alloc <= cap for alloc, cap in h.ledger_trace)


def test_a_parked_agents_run_that_finds_every_seat_being_swapped_waits_for_room():
    """Four seats, all live agents idle; four parked agents' DECODEs take over all four seats
    (PARKs in flight, nothing decoding yet). A fifth parked agent's DECODE finds no idle agent
    to park: room comes when those runs end, so it waits and is served, not refused with
    VRAM_LEDGER_DENY (100 agents' first round on the GPU was refused this way)."""
    probe = Harness(admit_by_parking=True)
    for name in "defg":
        probe.send("REGISTER", agent=name, model="small")
        probe.run_jobs()
    h = Harness(total=probe.core.ledger.allocated_bytes, admit_by_parking=True)
    for name in "abchidefg":                # d, e, f, g park a, b, c, h, i on the way in
        h.send("REGISTER", agent=name, model="small")
        h.run_jobs()
    assert sorted(n for n, a in h.core.agents.items() if a.live) == ["d", "e", "f", "g"]
    runs = [h.send("DECODE", agent=name, prompt="x", n_predict=2) for name in "abch"]
    assert sorted(j.fields["agent"] for j in h.jobs("PARK")) == ["d", "e", "f", "g"]
    late = h.send("DECODE", agent="i", prompt="x", n_predict=2)
    assert h.final(late) is None                        # waiting, not answered
    h.run_jobs()
    assert [h.final(i)["status"] for i in runs + [late]] == ["ok"] * 5
    assert all(alloc <= cap for alloc, cap in h.ledger_trace)


def test_an_overhead_the_cap_cannot_hold_is_logged_once_not_at_every_reading():
    """A CUDA worker's measured overhead does not fit (the seats filled the cap): the refusal
    is logged once, not at every job's reading (100 agents logged it hundreds of times)."""
    h = Harness()
    h.feed(WorkerReady(1, DeviceReading("cuda", "nvml", "gpu", 1000 * MiB), h.now))
    logged = []
    log = h.core.log
    h.core.log = lambda level, text: (logged.append(text), log(level, text))
    for name in ("a", "b", "c"):
        h.send("REGISTER", agent=name, model="small")
        job = h.worker.pending.pop(0)
        result = h.worker.answer(job)
        result.engine.known_device_bytes = 10 * MiB
        result.engine.process_bytes = 10 * MiB + 2000 * MiB      # more than the card
        h.feed(__import__("lmx.broker.core.events", fromlist=["WorkerResult"])
               .WorkerResult(job.job_id, result, h.now, h.now))
    refusals = [t for t in logged if "worker:overhead needs" in t]
    assert len(refusals) == 1, logged


def test_a_refusal_says_what_parking_the_idle_agents_would_free():
    """Parking the idle agent would free its context, but not enough: the weights stay. The
    refusal says how much parking could free, not that nothing can be parked."""
    probe = Harness(admit_by_parking=True)
    probe.send("REGISTER", agent="a", model="small")
    probe.run_jobs()
    h = Harness(total=probe.core.ledger.allocated_bytes + CONTEXT // 2, admit_by_parking=True)
    h.send("REGISTER", agent="a", model="small")
    h.run_jobs()
    big = h.send("REGISTER", agent="b", model="big")
    h.run_jobs()
    reply = h.final(big)
    assert reply["code"] == "VRAM_LEDGER_DENY" and not h.jobs("PARK")
    assert reply["freeable_bytes"] == h.core.groups[h.core.agents["a"].gid].booking() + \
        h.core.agents["a"].booked_bytes
    assert "parking every idle agent would free" in reply["message"]


def _four_seats_two_parked(**config):
    """Four seats, d e f g live and idle, a b parked (they registered first)."""
    probe = Harness(admit_by_parking=True)
    for name in "defg":
        probe.send("REGISTER", agent=name, model="small")
        probe.run_jobs()
    h = Harness(total=probe.core.ledger.allocated_bytes, admit_by_parking=True, **config)
    for name in "abdefg":
        h.send("REGISTER", agent=name, model="small")
        h.run_jobs()
    assert sorted(n for n, a in h.core.agents.items() if a.live) == ["d", "e", "f", "g"]
    return h


def test_a_burst_of_requests_does_not_park_its_own_agents_for_each_other():
    """All six agents' DECODEs arrive 1 ms apart, a and b (parked) first. Without the grace a
    and b would park d and e, whose own DECODEs come next and must park others in turn; with
    it a and b wait out the burst, d e f g run at once, and a and b then take over two of
    them once they are idle: two parks, not four."""
    h = _four_seats_two_parked(swap_grace_s=0.02)
    runs = [h.send("DECODE", agent=name, prompt="x", n_predict=2) for name in "abdefg"]
    assert not h.jobs("PARK") and sorted(j.fields["agent"] for j in h.jobs("DECODE")) == \
        ["d", "e", "f", "g"]                    # held, and the live ones were not held back
    assert [op.agent for op in h.core.room] == ["a", "b"]     # waiting for d e f g to end
    h.run_jobs()                                # d e f g finish: idle, but the burst is recent
    h.tick(0.05)                                # the burst is over
    h.run_jobs()
    assert [h.final(i)["status"] for i in runs] == ["ok"] * 6
    assert sum(a.parks for a in h.core.agents.values()) == 2 + 2       # 2 at REGISTER
    assert all(alloc <= cap for alloc, cap in h.ledger_trace)


def test_a_lone_parked_agents_request_waits_one_grace_and_a_burst_at_most_five():
    h = _four_seats_two_parked(swap_grace_s=0.02)
    h.send("DECODE", agent="a", prompt="x", n_predict=2)
    assert not h.jobs("PARK")
    h.tick(0.019)
    assert not h.jobs("PARK")
    h.tick(0.002)
    assert [j.fields["agent"] for j in h.jobs("PARK")] == ["d"]        # one grace later
    h.run_jobs()
    g = _four_seats_two_parked(swap_grace_s=0.02)
    late = g.send("DECODE", agent="b", prompt="x", n_predict=2)
    for _ in range(12):                         # requests keep coming 9 ms apart
        g.now += 0.009
        g.send("DECODE", agent="d", prompt="x", n_predict=1)
        g.run_jobs() if g.jobs("PARK") else None
        for job in g.jobs("DECODE"):
            g.answer(g.worker.pending.index(job))
    assert g.final(late) is not None and g.final(late)["status"] == "ok"   # not starved


def test_a_streamed_token_relays_its_partial_and_plans_no_room(monkeypatch):
    """d e f g decode (streaming) while a and b wait for a seat: each streamed token is
    relayed, and the room queue is not planned again for it (a token frees no room; at 100
    agents planning the waiting ones at each of a step's 79 tokens put the broker 100 ms
    behind the worker). When the runs end, a and b are served."""
    from lmx.broker.core import room
    from lmx.broker.core.events import WorkerToken
    h = _four_seats_two_parked()
    runs = [h.send("DECODE", agent=name, prompt="x", n_predict=2, stream=True)
            for name in "defg"]
    waiting = [h.send("DECODE", agent=name, prompt="x", n_predict=2) for name in "ab"]
    assert [op.agent for op in h.core.room] == ["a", "b"] and not h.jobs("PARK")
    plans = []
    plan = room.plan
    monkeypatch.setattr(room, "plan", lambda *a: (plans.append(a[1].agent), plan(*a))[1])
    for job in h.jobs("DECODE"):
        h.feed(WorkerToken(job.job_id, 0, 7, "x", h.now))
    assert plans == []
    partials = [r for i in runs for r in h.replies[(b"c1", i)] if r["status"] == "partial"]
    assert len(partials) == 4
    h.run_jobs()
    assert plans and [h.final(i)["status"] for i in runs + waiting] == ["ok"] * 6

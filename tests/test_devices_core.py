"""Several devices in the pure core: placement, pinning, per-device refusal, faults that stay
on their device, and random traffic over two ledgers (no sockets, milliseconds)."""
from hypothesis import example, given, settings
from hypothesis import strategies as st

from core_harness import CONTEXT, WEIGHTS, Harness, MemJournal, MiB
from lmx.broker.core.events import KillWorker, SpawnWorker, Tick, WorkerLost
from lmx.common.errors import Code, Reason

SMALL = "/models/small.gguf"


def _register(h, name, model="small", **fields):
    msg = h.send("REGISTER", agent=name, model=model, **fields)
    h.run_jobs()
    return h.final(msg)


def _devices(h):
    return {a["agent"]: a["device"] for a in h.final(h.send("LIST"))["agents"]}


def test_placement_fills_the_device_with_the_weights_then_the_one_with_most_free_bytes():
    # each device: the weights and three contexts
    h = Harness(totals=[WEIGHTS["small"] + 3 * CONTEXT] * 2)
    for name in "abcdef":
        assert _register(h, name)["status"] == "ok"
    assert _devices(h) == {"a": 0, "b": 0, "c": 0, "d": 1, "e": 1, "f": 1}
    ledgers = [d.ledger for d in h.core.devices]
    # weights booked once per device the model is on; each ledger holds only its own agents
    assert [led.booked(f"model:{SMALL}") for led in ledgers] == [WEIGHTS["small"]] * 2
    assert {k for k in ledgers[1].snapshot()["bookings"] if k.startswith("agent:")} == {
        "agent:d", "agent:e", "agent:f"}
    full = h.final(h.send("REGISTER", agent="g", model="small"))
    assert (full["code"], full["reason"]) == (Code.VRAM_LEDGER_DENY, Reason.CAP)
    assert [(d["device"], d["reason"], d["requested_bytes"], d["weights_loaded"])
            for d in full["devices"]] == [(0, Reason.CAP, CONTEXT, True),
                                          (1, Reason.CAP, CONTEXT, True)]
    assert "fits no device" in full["message"] and "device 1 (local:1)" in full["message"]
    status = h.final(h.send("STATUS"))
    assert [d["agents"] for d in status["devices"]] == [["a", "b", "c"], ["d", "e", "f"]]
    assert status["ledger_allocated_bytes"] == sum(led.allocated_bytes for led in ledgers)
    assert f"1/model:{SMALL}" in status["bookings"]
    assert status["agent_states"]["e"]["device"] == 1


def test_a_new_model_goes_where_most_bytes_are_free():
    h = Harness(totals=[1000 * MiB, 600 * MiB])
    assert _register(h, "a")["device"] == 0              # 1000 free against 600
    reply = _register(h, "b", "big")                      # 850 free against 600
    assert (reply["device"], reply["device_name"]) == (0, "local:0")
    assert _register(h, "c", "big")["device"] == 0       # its weights are there: 50 MiB more
    assert h.core.devices[0].ledger.try_reserve("other", 410 * MiB) is None   # 40 MiB left
    assert _register(h, "d", "big")["device"] == 1       # weights and context fit only on 1
    assert [d.ledger.booked("model:/models/big.gguf") for d in h.core.devices] == [
        WEIGHTS["big"], WEIGHTS["big"]]


def test_a_pinned_agent_goes_where_it_is_told_or_is_refused_there():
    h = Harness(totals=[1000 * MiB, 1000 * MiB])
    assert _register(h, "a", device=1)["device"] == 1
    assert _register(h, "b", device="local:1")["device"] == 1     # by name
    assert _register(h, "c")["device"] == 1                        # its weights are on 1
    bad = h.final(h.send("REGISTER", agent="d", model="small", device=7))
    assert (bad["code"], bad["field"]) == (Code.BAD_REQUEST, "device")
    assert "local:0" in bad["message"]
    h.core.devices[0].ledger.try_reserve("other", 990 * MiB)
    refused = h.final(h.send("REGISTER", agent="e", model="small", device=0))
    assert refused["code"] == Code.VRAM_LEDGER_DENY and refused["device"] == 0
    assert [d["device"] for d in refused["devices"]] == [0]       # only the pinned one
    assert "e" not in h.core.agents


def test_losing_one_device_fails_only_its_agents_and_the_other_keeps_decoding():
    h = Harness(totals=[WEIGHTS["small"] + CONTEXT] * 2)
    _register(h, "a")
    _register(h, "b")
    assert _devices(h) == {"a": 0, "b": 1}
    on_a = h.send("DECODE", agent="a", prompt="x", n_predict=5)
    on_b = h.send("DECODE", agent="b", prompt="x", n_predict=5)
    queued_b = h.send("DECODE", agent="b", prompt="y", n_predict=2)
    h.feed(WorkerLost("exited", h.now, dev=0))
    assert h.final(on_a)["code"] == Code.WORKER_LOST
    assert h.final(on_b) is None and h.final(queued_b) is None       # untouched
    assert [j.fields["agent"] for j in h.jobs()] == ["a", "b"]       # a's job died with it
    h.worker.pending[:] = [j for j in h.jobs() if j.dev == 1]
    h.run_jobs()
    assert h.final(on_b)["generated_tokens"] == 5 and h.final(queued_b)["status"] == "ok"
    dev0, dev1 = h.core.devices
    assert (dev0.state, dev1.state) == ("lost", "ready")
    assert dev0.ledger.booked("agent:a") is None and dev0.ledger.booked(f"model:{SMALL}")
    assert dev1.ledger.booked("agent:b") == CONTEXT
    assert h.core.agents["a"].state == "restoring" and h.core.agents["b"].state == "ready"
    refused = h.final(h.send("DECODE", agent="a", prompt="x", n_predict=1))
    assert refused["code"] == Code.WORKER_UNAVAILABLE and "device 0" in refused["message"]
    full = _register(h, "c")                    # only device 1 is asked; it is full
    assert [(d["device"], d["reason"]) for d in full["devices"]] == [
        (0, Reason.NOT_READY), (1, Reason.CAP)]
    h.ready(0, WEIGHTS["small"] + CONTEXT, pid=9)
    assert [(j.verb, j.fields["agent"], j.dev) for j in h.jobs()] == [("REGISTER", "a", 0)]
    h.run_jobs()
    again = h.send("DECODE", agent="a", prompt="x", n_predict=1)
    h.run_jobs()
    assert h.final(again)["status"] == "ok" and h.final(again)["context_reset"] is True


def test_a_silent_device_is_killed_and_respawned_alone():
    h = Harness(totals=[1000 * MiB] * 2, heartbeat_s=1.0, liveness=2)
    h.core.devices[1].last_seen = 100.0
    h.now = 2.5
    actions = h.core.handle(Tick(h.now, h.now))
    kinds = [(type(a).__name__, getattr(a, "dev", None)) for a in actions
             if isinstance(a, (KillWorker, SpawnWorker))]
    assert kinds == [("KillWorker", 0), ("SpawnWorker", 0)]
    assert [d.state for d in h.core.devices] == ["lost", "ready"]


def test_a_remote_device_is_added_at_its_first_ready_and_awaited_when_lost():
    h = Harness(totals=[1000 * MiB])
    from lmx.broker.core.events import WorkerReady
    from lmx.common.jobs import DeviceReading
    h.feed(WorkerReady(5, DeviceReading("cpu", "declared", "cpu", 500 * MiB), h.now, dev=1,
                       name="hostb:cpu", remote=True))
    assert [(d.name, d.remote, d.state) for d in h.core.devices] == [
        ("local:0", False, "ready"), ("hostb:cpu", True, "ready")]
    h.workers.append(type(h.worker)(h.worker.pending))
    assert _register(h, "r", device="hostb:cpu")["device"] == 1
    actions = h.core.handle(WorkerLost("heartbeats stopped", h.now, dev=1))
    assert not [a for a in actions if isinstance(a, SpawnWorker)]    # awaited, not spawned
    assert h.core.devices[1].restarts == 0


def test_the_journal_remembers_each_agents_device():
    journal = MemJournal()
    h = Harness(totals=[1000 * MiB] * 2, journal=journal)
    _register(h, "a", device=1)
    assert journal.agents["a"]["device"] == "local:1"
    again = Harness(totals=[1000 * MiB] * 2, journal=journal)
    assert again.core.agents["a"].dev == 1
    assert again.core.devices[1].ledger.booked(f"model:{SMALL}") == WEIGHTS["small"]
    assert again.core.devices[0].ledger.allocated_bytes == 0


# -- property: two devices, random traffic: no ledger ever goes over its cap ---------------

OPS = st.lists(st.tuples(st.sampled_from(["register", "pin", "decode", "unregister", "answer",
                                          "fail", "tick", "lost"]),
                         st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(0, 3)),
               max_size=50)


MOVING = [("pin", "a", 0), ("answer", "a", 0), ("pin", "b", 0)] + [("answer", "a", 0)] * 2 + [
    ("decode", "b", 0), ("decode", "a", 0)] + [("answer", "a", 1)] * 3 + [("answer", "a", 0)] * 3


@settings(max_examples=80, deadline=None)
@given(OPS, st.booleans(), st.integers(0, 2))
@example(MOVING, False, 1)          # a parked agent moves to device 1 while b keeps device 0
def test_random_traffic_on_two_devices_never_overbooks(ops, by_parking, max_live):
    total = WEIGHTS["small"] + WEIGHTS["big"] + 2 * CONTEXT
    h = Harness(totals=[WEIGHTS["small"] + 2 * CONTEXT, total], admit_by_parking=by_parking,
                max_live_contexts=max_live)
    for op, name, k in ops:
        if op in ("register", "pin"):
            extra = {"device": int(k == 3)} if op == "pin" else {}    # mostly device 0
            h.send("REGISTER", agent=name, model="big" if k == 3 else "small", **extra)
        elif op == "decode":
            h.send("DECODE", agent=name, prompt="p", n_predict=k + 1)
        elif op == "unregister":
            h.send("UNREGISTER", agent=name)
        elif op in ("answer", "fail") and h.worker.pending:
            h.answer(k % len(h.worker.pending), Code.MODEL_ERROR if op == "fail" else None)
        elif op == "tick":
            h.tick(0.03)
        elif op == "lost":
            dev = k % 2
            h.feed(WorkerLost("exited", h.now, dev=dev))
            h.worker.pending[:] = [j for j in h.worker.pending if j.dev != dev]
            h.ready(dev, h.core.devices[dev].ledger.total_bytes)
        _check(h)
    h.run_jobs()
    _check(h)
    assert not h.core.jobs and not h.core.room


def _check(h):
    core = h.core
    for dev in core.devices:
        led = dev.ledger
        assert led.allocated_bytes <= led.max_bytes
        assert led.allocated_bytes == sum(led.snapshot()["bookings"].values())
        for key in led.snapshot()["bookings"]:
            kind, _, name = key.partition(":")
            if kind == "agent":
                assert core.agents[name].live and core.agents[name].dev == dev.index, key
            elif kind == "model":
                assert dev.models[name].agents, key
                moving = {op.agent for op in core.jobs.values() if op.verb == "MOVE"}
                assert all(core.agents[a].dev == dev.index or a in moving
                           for a in dev.models[name].agents)
            elif kind == "group":
                assert core.groups[int(name)].dev == dev.index
    for rec in core.agents.values():
        if rec.live:
            assert core.groups[rec.gid].dev == rec.dev


def test_a_parked_agent_with_no_room_on_its_device_moves_its_state_to_another():
    from core_harness import STATE_BYTES_PER_TOKEN
    h = Harness(totals=[WEIGHTS["small"] + CONTEXT] * 2, admit_by_parking=True)
    _register(h, "a", device=0)
    h.send("DECODE", agent="a", prompt="p", n_predict=9)
    h.run_jobs()
    assert _register(h, "b", device=0)["kv_swap_parked"] == ["a"]    # a parked in RAM
    busy = h.send("DECODE", agent="b", prompt="p", n_predict=50)     # b is not idle
    wanted = h.send("DECODE", agent="a", prompt="q", n_predict=3)
    state = h.core.agents["a"].parked_bytes
    assert state == 10 * STATE_BYTES_PER_TOKEN
    steps = []
    while [j for j in h.jobs() if j.fields.get("agent") == "a"]:
        index = next(i for i, j in enumerate(h.jobs()) if j.fields.get("agent") == "a")
        job = h.answer(index)
        steps.append((job.verb, job.dev))
    assert steps == [("EXPORT", 0), ("IMPORT", 1), ("UNREGISTER", 0), ("DECODE", 1)]
    assert h.final(wanted)["status"] == "ok" and h.final(busy) is None
    dev0, dev1 = h.core.devices
    assert h.core.agents["a"].dev == 1 and h.core.agents["a"].live
    assert dev0.ledger.booked("agent:a") is None and "a" not in dev0.models[SMALL].agents
    assert dev1.ledger.booked("agent:a") == CONTEXT and dev1.models[SMALL].agents == {"a"}
    assert h.core.journal.agents["a"]["device"] == "local:1"      # a restart finds it there
    h.run_jobs()
    assert h.final(busy)["status"] == "ok"
    _check(h)


def test_metrics_sum_the_ledgers_of_every_device():
    from lmx.broker.metrics import Metrics
    h = Harness(totals=[WEIGHTS["small"] + CONTEXT] * 2)
    _register(h, "a")
    _register(h, "b")
    metrics = Metrics(h.core)
    value = metrics.registry.get_sample_value
    assert value("lmx_ledger_allocated_bytes") == 2 * (WEIGHTS["small"] + CONTEXT)
    assert value("lmx_ledger_cap_bytes") == 2 * (WEIGHTS["small"] + CONTEXT)
    assert value("lmx_model_booked_bytes", {"model": "small.gguf", "kind": "weights"}) == \
        2 * WEIGHTS["small"]
    assert value("lmx_agent_booked_bytes", {"agent": "b"}) == CONTEXT


def test_metrics_have_a_series_per_device():
    """lmx_devices_*: each device's worker readiness, ledger and agents, labelled."""
    from lmx.broker.metrics import StateCollector
    h = Harness(totals=[1000 * MiB, 600 * MiB])
    h.send("REGISTER", agent="a", model="small", device=1)
    h.run_jobs()
    h.feed(WorkerLost("exited", h.now, dev=0))
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in StateCollector(h.core).collect() for s in fam.samples
           if s.name.startswith("lmx_devices_")}
    d0, d1 = (("device", "0"), ("name", "local:0")), (("device", "1"), ("name", "local:1"))
    assert got[("lmx_devices_worker_ready", d0)] == 0 and got[("lmx_devices_worker_ready", d1)] == 1
    assert got[("lmx_devices_ledger_cap_bytes", d1)] == h.core.devices[1].ledger.max_bytes
    assert got[("lmx_devices_ledger_allocated_bytes", d1)] == \
        h.core.devices[1].ledger.allocated_bytes > 0
    assert got[("lmx_devices_agents", d1 + (("state", "live"),))] == 1
    assert got[("lmx_devices_agents", d0 + (("state", "live"),))] == 0

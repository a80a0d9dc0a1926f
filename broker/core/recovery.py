"""Each device's worker as the core sees it: READY, heartbeats, loss, restarts, journal replay.

A lost worker fails every request of its own device's agents, in flight or held, with
WORKER_LOST (no caller hangs); the other devices go on serving. Its device keeps every
registered agent and its model's weights (the seats are released: each agent is seated again
at its next DECODE or CHAT); a local worker is started again after a back-off (1 s doubling to
32 s), a remote one is awaited. On the new worker's READY every agent of the device is rebuilt
(RESTORE), resuming from parked state on disk where there is one. After a broker restart the
journal's agents are booked again on their device (by name) and rebuilt the same way; one that
cannot be is remembered as lost, never silently forgotten.
"""
from lmx.broker.core import booking, moves, seats
from lmx.broker.core.events import KillWorker, SpawnWorker
from lmx.broker.core.devices import DeviceView
from lmx.broker.core.state import Lane, Op
from lmx.broker.estimator import CUDA_OVERHEAD
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError
from lmx.common.jobs import RegisterJob
from lmx.common.quotas import DEFAULT_CLIENT
from lmx.common.replies import UnregisterReply


def is_alive(last_seen, now, interval, liveness):
    """MDP liveness: a peer is alive while it spoke within `liveness` intervals."""
    return now - last_seen <= interval * liveness


def on_ready(core, ev):
    """A worker is ready: size its device's ledger from it, then rebuild (or replay) the
    device's agents. A READY for a device the core does not know yet adds it (a remote
    worker's first)."""
    if ev.dev == len(core.devices):
        core.devices.append(DeviceView(ev.dev, ev.name or f"worker:{ev.dev}",
                                       core.config.admission_percent, remote=ev.remote))
        core.log("info", f"devices: device {ev.dev} is {ev.name} (remote: {ev.remote})")
    wk = core.devices[ev.dev]
    wk.state, wk.pid, wk.device, wk.last_seen, wk.backoff = "ready", ev.pid, ev.device, \
        ev.now, 1.0
    wk.streaming = ev.streaming
    adopt_device(core, wk)
    if not wk.replayed:
        wk.replayed = True
        _replay_journal(core, wk)
    for rec in [r for r in core.agents.values() if r.state == "restoring" and r.dev == ev.dev]:
        op = Op("RESTORE", rec.name, {}, ev.now, dev=ev.dev)
        core.lanes.setdefault(rec.name, Lane()).active = op
        core.send(op, RegisterJob(rec.name, rec.path, rec.spec, resume=True))


def adopt_device(core, wk):
    """The device's ledger total from its worker (NVML, or the declared size on CPU), the
    worker's own overhead on CUDA, and the memory other processes hold."""
    dev, cfg, led = wk.device, core.config, wk.ledger
    led.set_total(dev.total_bytes)
    overhead = cfg.worker_overhead
    if overhead is None and dev.kind == "cuda":
        # The worker creates its CUDA context before READY, so its NVML reading is the
        # overhead; cuBLAS and pools grow later and are reconciled upwards.
        overhead = max(dev.process_bytes or 0, CUDA_OVERHEAD)
    if overhead:
        booking.book_fixed(core, led, "worker:overhead", overhead)
    read_external(wk, dev, cfg.others_margin)


def read_external(wk, dev, margin):
    """Memory other processes hold on the device lowers its cap (never evicts anyone)."""
    if dev is not None and dev.used_bytes is not None:
        wk.ledger.set_external(dev.used_bytes - (dev.process_bytes or 0), margin)


def on_heartbeat(core, ev):
    if ev.dev >= len(core.devices):
        return
    wk = core.devices[ev.dev]
    wk.last_seen = ev.now
    if ev.device is not None:
        wk.device = ev.device
        read_external(wk, ev.device, core.config.others_margin)


def check_liveness(core, now):
    """A ready worker silent for `liveness` intervals is hung: kill it and recover."""
    cfg = core.config
    for wk in core.devices:
        if wk.state == "ready" and not is_alive(wk.last_seen, now, cfg.heartbeat_s,
                                                cfg.liveness):
            core.emit(KillWorker("heartbeats stopped", wk.index))
            lose(core, wk, "heartbeats stopped")


def on_starting(core, ev):
    """A new worker process is on its way: say so until its READY."""
    if core.devices[ev.dev].state == "lost":
        core.devices[ev.dev].state = "starting"


def on_lost(core, ev):
    if ev.dev < len(core.devices) and core.devices[ev.dev].state != "lost":
        lose(core, core.devices[ev.dev], ev.why)


def _on_device(core, op, index):
    """Whether op belongs to device index (its job, its agent, or the room it waits in)."""
    if op.job_id is not None or op in core.devices[op.dev].room:
        return op.dev == index
    rec = core.agents.get(op.agent)
    return rec.dev == index if rec is not None else op.dev == index and op.estimate is not None


def lose(core, wk, why):
    """Fail every request of the device's agents, in flight or held here; keep the agents,
    to be rebuilt. Other devices are untouched."""
    err = LmxError(Code.WORKER_LOST, f"the worker died ({why}) with this request in flight")
    mine = [op for op in core.jobs.values() if op.dev == wk.index]
    where = f" (device {wk.index}, {wk.name})" if len(core.devices) > 1 else ""
    core.log("error", f"worker: lost ({why}){where}; failing {len(mine)} job(s) in flight")
    for op in mine:
        _fail_job(core, op, err)
        core.jobs.pop(op.job_id, None)
    for name, lane in list(core.lanes.items()):
        ops = ([lane.active] if lane.active else []) + list(lane.queue)
        if not any(_on_device(core, op, wk.index) for op in ops):
            continue
        for op in ops:
            core.reply(op.identity, op.msg_id, err.fields())
        del core.lanes[name]
    wk.room.clear()
    seats.drop_all(core, wk.index, "the worker was lost")   # seated again when they run
    for rec in core.agents.values():
        if rec.dev == wk.index:
            rec.state = "restoring"
    wk.builds_before += wk.engine.context_builds if wk.engine is not None else 0
    wk.state, wk.engine = "lost", None
    if not wk.remote and core.config.spawn_worker:
        core.emit(SpawnWorker(wk.backoff, wk.index))
        wk.restarts += 1
        wk.backoff = min(wk.backoff * 2, 32.0)


def _fail_job(core, op, err):
    """A job the dead worker took with it."""
    lane = core.lanes.get(op.agent)
    if lane is not None and lane.active is op:
        lane.active = None
    if op.verb == "MOVE":
        moves.fail(core, op, err)
    elif op.verb == "REGISTER":
        booking.unbook(core, op.agent, "the worker died while building it")
    elif op.verb == "UNREGISTER":               # the slot died with the worker
        freed = booking.unbook(core, op.agent, "unregistered (worker lost)")
        core.reply(op.identity, op.msg_id, UnregisterReply(
            op.agent, freed, False, **core.ledger_numbers(op.dev)).to_wire())
        return
    core.reply(op.identity, op.msg_id, err.fields())


def _replay_journal(core, wk):
    """After a broker restart: book every agent the journal remembers on this device (by its
    name; entries without one belong to the first device), to be rebuilt."""
    first = core.devices[0].name
    for name, entry in list(core.journal.agents.items()):
        if name in core.agents or entry.get("device", first) != wk.name:
            continue
        try:
            spec = ContextSpec(**entry["spec"])
            op = Op("REGISTER", name, {"model": entry["model"], "spec": spec,
                                       "client": _client(core, entry.get("client"))}, core.now,
                    dev=wk.index)
            op.estimate = core.estimate(entry["model"], spec, wk.kind)
            denial = booking.book_register(core, op, owner=b"", state="restoring", seat=False)
            if denial is not None:
                raise denial.error(f"agent {name!r}")
        except (LmxError, TypeError, KeyError) as exc:
            mark_lost(core, name, f"journal replay: {exc}")


def _client(core, name):
    """A journaled agent's quotas client: kept while the quotas file still names it."""
    config = core.quotas.config
    return name if config is not None and name in config.clients else DEFAULT_CLIENT


def mark_lost(core, name, why):
    """An agent that was registered and cannot be restored: say so, never silently."""
    if name in core.agents:
        booking.unbook(core, name, f"lost: {why}")
    core.journal.drop(name)
    core.lost[name] = why
    core.log("error", f"recovery: agent={name} lost: {why}")

"""The worker's life as the core sees it: READY, heartbeats, loss, restarts, journal replay.

A lost worker fails every request it or the broker held with WORKER_LOST (no caller hangs),
keeps every registered agent and its model's weights (its seat is released: each agent is
seated again at its next DECODE or CHAT), and asks for a new worker after a back-off
(1 s doubling to 32 s). On the new worker's READY every agent is rebuilt (RESTORE), resuming
from parked state on disk where there is one. After a broker restart the journal's agents are
booked again and rebuilt the same way; one that cannot be is remembered as lost, never
silently forgotten.
"""
from lmx.broker.core import booking, seats
from lmx.broker.core.events import KillWorker, SpawnWorker
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
    """A worker is ready: size the ledger from it, then rebuild (or replay) the agents."""
    wk = core.worker
    wk.state, wk.pid, wk.device, wk.last_seen, wk.backoff = "ready", ev.pid, ev.device, \
        ev.now, 1.0
    wk.streaming = ev.streaming
    adopt_device(core)
    if not wk.replayed:
        wk.replayed = True
        _replay_journal(core)
    for rec in [r for r in core.agents.values() if r.state == "restoring"]:
        op = Op("RESTORE", rec.name, {}, ev.now)
        core.lanes.setdefault(rec.name, Lane()).active = op
        core.send(op, RegisterJob(rec.name, rec.path, rec.spec, resume=True))


def adopt_device(core):
    """The ledger's total from the worker (NVML, or the declared size on CPU), the worker's
    own overhead on CUDA, and the memory other processes hold."""
    dev, cfg = core.worker.device, core.config
    core.ledger.set_total(dev.total_bytes)
    overhead = cfg.worker_overhead
    if overhead is None and dev.kind == "cuda":
        # The worker creates its CUDA context before READY, so its NVML reading is the
        # overhead; cuBLAS and pools grow later and are reconciled upwards.
        overhead = max(dev.process_bytes or 0, CUDA_OVERHEAD)
    if overhead:
        booking.book_fixed(core, "worker:overhead", overhead)
    read_external(core, dev)


def read_external(core, dev):
    """Memory other processes hold on the device lowers the cap (never evicts anyone)."""
    if dev is not None and dev.used_bytes is not None:
        core.ledger.set_external(dev.used_bytes - (dev.process_bytes or 0),
                                 core.config.others_margin)


def on_heartbeat(core, ev):
    core.worker.last_seen = ev.now
    if ev.device is not None:
        core.worker.device = ev.device
        read_external(core, ev.device)


def check_liveness(core, now):
    """A ready worker silent for `liveness` intervals is hung: kill it and recover."""
    wk, cfg = core.worker, core.config
    if wk.state == "ready" and not is_alive(wk.last_seen, now, cfg.heartbeat_s, cfg.liveness):
        core.emit(KillWorker("heartbeats stopped"))
        lose(core, "heartbeats stopped")


def on_starting(core, ev):
    """A new worker process is on its way: say so until its READY."""
    if core.worker.state == "lost":
        core.worker.state = "starting"


def on_lost(core, ev):
    if core.worker.state != "lost":
        lose(core, ev.why)


def lose(core, why):
    """Fail every request in flight or held here; keep the agents, to be rebuilt."""
    err = LmxError(Code.WORKER_LOST, f"the worker died ({why}) with this request in flight")
    core.log("error", f"worker: lost ({why}); failing {len(core.jobs)} job(s) in flight")
    for op in list(core.jobs.values()):
        _fail_job(core, op, err)
    core.jobs.clear()
    for lane in core.lanes.values():
        for op in ([lane.active] if lane.active else []) + list(lane.queue):
            core.reply(op.identity, op.msg_id, err.fields())
    core.lanes.clear()
    core.room.clear()
    seats.drop_all(core, "the worker was lost")     # no agent is live: seated when it runs
    for rec in core.agents.values():
        rec.state = "restoring"
    wk = core.worker
    wk.builds_before += wk.engine.context_builds if wk.engine is not None else 0
    wk.state, wk.engine = "lost", None
    if core.config.spawn_worker:
        core.emit(SpawnWorker(wk.backoff))
        wk.restarts += 1
        wk.backoff = min(wk.backoff * 2, 32.0)


def _fail_job(core, op, err):
    """A job the dead worker took with it."""
    lane = core.lanes.get(op.agent)
    if lane is not None and lane.active is op:
        lane.active = None
    if op.verb == "REGISTER":
        booking.unbook(core, op.agent, "the worker died while building it")
    elif op.verb == "UNREGISTER":               # the slot died with the worker
        freed = booking.unbook(core, op.agent, "unregistered (worker lost)")
        core.reply(op.identity, op.msg_id, UnregisterReply(op.agent, freed, False,
                                                           **core.ledger_numbers()).to_wire())
        return
    core.reply(op.identity, op.msg_id, err.fields())


def _replay_journal(core):
    """After a broker restart: book every agent the journal remembers, to be rebuilt."""
    for name, entry in list(core.journal.agents.items()):
        if name in core.agents:
            continue
        try:
            spec = ContextSpec(**entry["spec"])
            op = Op("REGISTER", name, {"model": entry["model"], "spec": spec,
                                       "client": _client(core, entry.get("client"))}, core.now)
            op.estimate = core.estimate(entry["model"], spec, core.worker.kind)
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

"""Book before build, unwind on failure, reconcile to measured (pure; the core's ledger).

A REGISTER looks up the estimate, books the agent's seat (seats.py; and its model's weights
when the model is not booked yet) in one atomic step, asks the worker to build, and is
committed only when the worker says so; any failure releases exactly what it booked. Reconciliation
rebooks measured + margin, but only through the ledger's check: when the margin does not fit,
the measured bytes alone; when even they do not, the booking stays and the shortfall is logged.
"""
from lmx.broker.core import seats
from lmx.broker.core.state import Agent, ModelBooking
from lmx.broker.measured import with_margin
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError, Reason
from lmx.common.jobs import RegisterJob, UnregisterJob
from lmx.common.quotas import DEFAULT_CLIENT
from lmx.common.replies import LoadProgress


def start_register(core, op):
    """REGISTER at the head of its lane: check, estimate, then book (or make room)."""
    name, cfg = op.agent, core.config
    if name in core.agents:
        raise LmxError(Code.AGENT_EXISTS, f"agent {name!r} is already registered")
    owned = sum(1 for a in core.agents.values() if a.owner == op.identity)
    if owned >= cfg.max_agents_per_client:
        raise LmxError(Code.LIMIT, f"this client already has {owned} agents (the limit)",
                       Reason.AGENTS_PER_CLIENT, limit=cfg.max_agents_per_client)
    core.need_worker()
    spec = op.fields["spec"]
    op.estimate = core.estimate(op.fields["model"], spec, core.worker.kind)
    core.quotas.check_register(core, op.fields.get("client", DEFAULT_CLIENT), spec.n_ctx,
                               seats.split(op.estimate)[0])
    limit = cfg.max_live_contexts
    if limit and sum(1 for a in core.agents.values() if a.live) >= limit:
        core.room.append(op)    # --max-live-contexts: room.pump parks an idle agent first
        return
    denial = book_register(core, op)
    if denial is None:
        send_register(core, op)
        return
    if not (cfg.admit_by_parking and not core.room and
            denial.reason in (Reason.CAP, Reason.OTHER_PROCESSES)):
        raise _deny(core, op, denial)
    core.room.append(op)        # room.pump plans the parking, then books and sends it


def _deny(core, op, denial):
    core.log("info", f"admission: denied agent={op.agent} requested={denial.requested_bytes} "
             f"allocated={denial.ledger_allocated_bytes} max={denial.ledger_max_bytes} "
             f"reason={denial.reason}")
    return denial.error(f"agent {op.agent!r} on {op.fields['model']}")


def book_register(core, op, owner=None, state="registering", seat=True):
    """Record the agent and book, in one step, its seat (seats.take) and the weights if its
    model is new; return None, or the Denial. seat False (journal replay): the weights only,
    the agent not live (it is seated at its first DECODE)."""
    est, name = op.estimate, op.agent
    mrec = core.models.get(est.path)
    spec = op.fields["spec"]
    seat_bytes, compute = seats.split(est)
    rec = Agent(name, op.fields["model"], est.path, spec.n_ctx, spec.as_dict(),
                op.identity if owner is None else owner, seat_bytes,
                est.estimated.get("context_device", est.context), est.context_source,
                core.wall, state=state, live=False, compute_bytes=compute,
                last_used=core.now,     # a new agent is not the least recently used
                client=op.fields.get("client", DEFAULT_CLIENT))
    weights = {} if mrec is not None else {f"model:{est.path}": est.weights}
    if seat:
        got = seats.take(core, rec, weights)
        if not isinstance(got, dict):
            return got
        op.seat = got
    elif weights:
        denial = core.ledger.try_apply(weights)
        if denial is not None:
            return denial
    if mrec is None:
        mrec = core.models[est.path] = ModelBooking(
            est.path, est.fingerprint, est.weights,
            est.estimated.get("weights_device", est.weights), est.weights_source)
    mrec.agents.add(name)
    core.agents[name] = rec
    core.log("info", f"admission: reserved agent={name} seat={rec.booked_bytes if seat else 0} "
             f"({est.context_source}) weights={est.weights if weights else 'shared'} "
             f"({est.weights_source}) group={rec.gid}")
    return None


def send_register(core, op):
    rec = core.agents[op.agent]
    core.send(op, RegisterJob(op.agent, rec.path, rec.spec, seat=op.seat,
                              progress=bool(op.fields.get("progress"))))


def on_progress(core, ev):
    """The worker is loading a REGISTER's model: tell the client that asked for progress
    (a partial reply; the final reply is unchanged)."""
    core.worker.last_seen = ev.now
    op = core.jobs.get(ev.job_id)
    if op is not None and op.verb == "REGISTER" and op.fields.get("progress"):
        core.reply(op.identity, op.msg_id, dict(LoadProgress(op.agent, ev.fraction).to_wire(),
                                                status="partial"))


def register_done(core, op, result):
    """The worker built (or failed to build) a REGISTER's slot."""
    rec, est = core.agents.get(op.agent), op.estimate
    if not result.ok or rec is None:
        unbook(core, op.agent, "register failed")
        core.end(op, dict(result.error or {}, status="error", **core.ledger_numbers()))
        return
    out = result.out
    rec.state = "ready"
    core.journal.put(op.agent, {"model": rec.model, "path": rec.path, "spec": rec.spec,
                                "client": rec.client})
    core.lost.pop(op.agent, None)
    mrec = core.models[rec.path]
    if out.model_loaded and out.model_measured is not None:
        reconcile_model(core, mrec, out.model_measured.nbytes, ContextSpec(**rec.spec))
    from lmx.common.replies import RegisterReply
    reply = RegisterReply(op.agent, rec.path, rec.n_ctx, rec.booked_bytes, rec.source,
                          mrec.booked_bytes, mrec.source, est.estimated, out.model_loaded,
                          out.model_refs, out.load_ms, list(op.parked), **core.ledger_numbers())
    core.end(op, reply.to_wire())


def start_unregister(core, op):
    rec = core.agent(op.agent)
    core.need_worker()
    rec.state = "leaving"
    core.send(op, UnregisterJob(op.agent))


def unregister_done(core, op, result):
    rec = core.agents.get(op.agent)
    code = (result.error or {}).get("code")
    if result.ok or code in (Code.UNKNOWN_AGENT, Code.WORKER_LOST):
        freed = unbook(core, op.agent, "unregistered")
        from lmx.common.replies import UnregisterReply
        freed_model = bool(result.out and result.out.model_freed)
        core.end(op, UnregisterReply(op.agent, freed, freed_model,
                                     **core.ledger_numbers()).to_wire())
        return
    if rec is not None:
        rec.state = "ready"
    core.end(op, dict(result.error, status="error", **core.ledger_numbers()))


def unbook(core, name, why):
    """Free an agent's seat (its bytes stay with the group as a free seat), and drop its
    model's weights and groups when it was the model's last agent; the bytes released."""
    rec = core.agents.pop(name, None)
    before = core.ledger.allocated_bytes
    if rec is not None and rec.live:
        seats.leave(core, rec)
    core.ledger.release(f"agent:{name}")
    mrec = core.models.get(rec.path) if rec else None
    if mrec is not None:
        mrec.agents.discard(name)
        if not mrec.agents:         # the worker frees the model and every group on it
            core.ledger.release(f"model:{mrec.path}")
            for group in seats.groups_of_path(core, mrec.path):
                seats.drop(core, group, "its model was freed")
            del core.models[mrec.path]
    freed = before - core.ledger.allocated_bytes
    core.journal.drop(name)
    core.log("info", f"admission: released agent={name} bytes={freed} ({why})")
    return freed


# -- reconciliation --------------------------------------------------------------------------

def rebook(core, key, rec, measured, keep=False):
    """Book measured + margin for key if the ledger allows; the measured bytes if only they
    fit; else keep the booking and say by how much it is short."""
    est = rec.estimated_bytes or 0
    margin = with_margin(measured, core.config.measure_margin_percent)
    core.log("info", f"reconcile: {key} estimated={est} measured={measured} "
             f"({100.0 * (est - measured) / measured:+.1f}%) booked="
             f"{rec.booked_bytes if keep else margin}{' (operator table kept)' if keep else ''}")
    if keep or core.ledger.booked(key) is None:
        return
    for nbytes in (margin, measured):
        if core.ledger.try_resize(key, nbytes) is None:
            rec.booked_bytes = nbytes
            return
    core.log("error", f"reconcile: {key} measured {measured} bytes but only "
             f"{core.ledger.booked(key)} are booked and the cap leaves no more")


def reconcile_model(core, mrec, nbytes, spec):
    """Book the model's measured weights (+ margin), unless the operator table set them."""
    if not nbytes:
        return
    mrec.measured_bytes = nbytes
    core.measured.store_weights(mrec.fingerprint, core.worker.kind, ContextSpec(
        n_gpu_layers=spec.n_gpu_layers), with_margin(nbytes, core.config.measure_margin_percent))
    rebook(core, f"model:{mrec.path}", mrec, nbytes, keep=mrec.source == "table")


def reconcile_overhead(core, engine):
    """The worker's own device bytes on CUDA (context, cuBLAS, pools): NVML's reading of the
    process minus llama.cpp's buffers. Raised when it grows, never lowered after measuring.
    Nothing on CPU: there is no such overhead (a CPU reading would be noise)."""
    if core.worker.kind != "cuda" or core.config.worker_overhead is not None or engine is None:
        return
    process, known = engine.process_bytes, engine.known_device_bytes
    if process is None or known is None:
        return
    want = with_margin(max(process - known, 0), core.config.measure_margin_percent)
    current = core.ledger.booked("worker:overhead") or 0
    if want > current or not core.worker.overhead_measured:
        core.log("info", f"reconcile: worker:overhead booked={want} measured={process - known} "
                 f"(process {process} - buffers {known})")
        book_fixed(core, "worker:overhead", want)
        core.worker.overhead_measured = True


def book_fixed(core, key, nbytes):
    """Book (or resize) a fixed cost through the ledger's check; log when it does not fit."""
    denial = (core.ledger.try_reserve(key, nbytes) if core.ledger.booked(key) is None
              else core.ledger.try_resize(key, nbytes))
    if denial is not None:
        core.log("error", f"admission: {key} needs {nbytes} bytes but the cap leaves "
                 f"{denial.ledger_max_bytes - denial.ledger_allocated_bytes}; not booked")

"""Book before build, unwind on failure, reconcile to measured (pure; the core's ledger).

A REGISTER looks up the estimate, books the agent's seat (seats.py; and its model's weights
when the model is not booked yet) in one atomic step, asks the worker to build, and is
committed only when the worker says so; any failure releases exactly what it booked. Reconciliation
rebooks measured + margin, but only through the ledger's check: when the margin does not fit,
the measured bytes alone; when even they do not, the booking stays and the shortfall is logged.
"""
from lmx.broker.core import devices, seats
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
    rows = devices.candidates(core, op)
    spec = op.fields["spec"]
    core.quotas.check_register(core, op.fields.get("client", DEFAULT_CLIENT), spec.n_ctx,
                               max(seats.split(est)[0] for _, est, _ in rows))
    row = devices.choose(core, rows)
    if row is not None:
        _place(op, row)
        denial = book_register(core, op)
        if denial is None:
            send_register(core, op)
            return
    row = _waitable(core, rows)
    if row is None:
        raise _deny(core, op, rows)
    _place(op, row)             # room.pump parks idle agents there, then books and sends it
    core.devices[op.dev].room.append(op)


def _place(op, row):
    dev, est, _ = row
    op.dev, op.estimate = dev.index, est


def _waitable(core, rows):
    """The device where a REGISTER that fits nowhere now may wait for parking to make room:
    at --max-live-contexts (parking is how it gets in), or with --admit-by-parking where the
    cap refuses it; weights already loaded first, then the most free bytes."""
    cfg = core.config
    ok = []
    for dev, est, need in rows:
        denial = dev.ledger.check(need)
        at_limit = cfg.max_live_contexts and sum(
            1 for a in core.agents.values() if a.live and a.dev == dev.index) >= \
            cfg.max_live_contexts
        if dev.room and not at_limit:
            continue                # admit_by_parking joins an empty queue only
        if at_limit or (cfg.admit_by_parking and denial is not None and
                        denial.reason in (Reason.CAP, Reason.OTHER_PROCESSES)):
            ok.append((dev, est, need))
    if not ok:
        return None
    return max(ok, key=lambda r: (r[1].path in r[0].models, r[0].free_bytes, -r[0].index))


def _deny(core, op, rows):
    err = devices.refusal(core, op, rows)
    d = err.details
    core.log("info", f"admission: denied agent={op.agent} requested={d['requested_bytes']} "
             f"allocated={d['ledger_allocated_bytes']} max={d['ledger_max_bytes']} "
             f"reason={err.reason} devices={len(d['devices'])}")
    return err


def book_register(core, op, owner=None, state="registering", seat=True):
    """Record the agent and book, in one step, its seat (seats.take) and the weights if its
    model is new; return None, or the Denial. seat False (journal replay): the weights only,
    the agent not live (it is seated at its first DECODE)."""
    est, name, dev = op.estimate, op.agent, core.devices[op.dev]
    mrec = dev.models.get(est.path)
    spec = op.fields["spec"]
    seat_bytes, compute = seats.split(est)
    rec = Agent(name, op.fields["model"], est.path, spec.n_ctx, spec.as_dict(),
                op.identity if owner is None else owner, seat_bytes,
                est.estimated.get("context_device", est.context), est.context_source,
                core.wall, state=state, live=False, compute_bytes=compute,
                last_used=core.now, dev=op.dev,  # a new agent is not the least recently used
                client=op.fields.get("client", DEFAULT_CLIENT))
    weights = {} if mrec is not None else {f"model:{est.path}": est.weights}
    if seat:
        got = seats.take(core, rec, weights)
        if not isinstance(got, dict):
            return got
        op.seat = got
    elif weights:
        denial = dev.ledger.try_apply(weights)
        if denial is not None:
            return denial
    if mrec is None:
        mrec = dev.models[est.path] = ModelBooking(
            est.path, est.fingerprint, est.weights,
            est.estimated.get("weights_device", est.weights), est.weights_source)
    mrec.agents.add(name)
    core.agents[name] = rec
    core.log("info", f"admission: reserved agent={name} seat={rec.booked_bytes if seat else 0} "
             f"({est.context_source}) weights={est.weights if weights else 'shared'} "
             f"({est.weights_source}) group={rec.gid} device={op.dev}")
    return None


def send_register(core, op):
    rec = core.agents[op.agent]
    core.send(op, RegisterJob(op.agent, rec.path, rec.spec, seat=op.seat,
                              progress=bool(op.fields.get("progress"))))


def on_progress(core, ev):
    """The worker is loading a REGISTER's model: tell the client that asked for progress
    (a partial reply; the final reply is unchanged)."""
    op = core.jobs.get(ev.job_id)
    if op is not None:
        core.devices[op.dev].last_seen = ev.now
    if op is not None and op.verb == "REGISTER" and op.fields.get("progress"):
        core.reply(op.identity, op.msg_id, dict(LoadProgress(op.agent, ev.fraction).to_wire(),
                                                status="partial"))


def register_done(core, op, result):
    """The worker built (or failed to build) a REGISTER's slot."""
    rec, est = core.agents.get(op.agent), op.estimate
    if not result.ok or rec is None:
        unbook(core, op.agent, "register failed")
        core.end(op, dict(result.error or {}, status="error", **core.ledger_numbers(op.dev)))
        return
    out, dev = result.out, core.devices[rec.dev]
    rec.state = "ready"
    core.journal.put(op.agent, {"model": rec.model, "path": rec.path, "spec": rec.spec,
                                "client": rec.client, "device": dev.name})
    core.lost.pop(op.agent, None)
    mrec = dev.models[rec.path]
    if out.model_loaded and out.model_measured is not None:
        reconcile_model(core, dev, mrec, out.model_measured.nbytes, ContextSpec(**rec.spec))
    from lmx.common.replies import RegisterReply
    reply = RegisterReply(op.agent, rec.path, rec.n_ctx, rec.booked_bytes, rec.source,
                          mrec.booked_bytes, mrec.source, est.estimated, out.model_loaded,
                          out.model_refs, out.load_ms, list(op.parked),
                          **core.ledger_numbers(rec.dev), device=rec.dev, device_name=dev.name)
    core.end(op, reply.to_wire())


def start_unregister(core, op):
    rec = core.agent(op.agent)
    core.need_device(rec.dev)
    op.dev = rec.dev
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
                                     **core.ledger_numbers(op.dev)).to_wire())
        return
    if rec is not None:
        rec.state = "ready"
    core.end(op, dict(result.error, status="error", **core.ledger_numbers(op.dev)))


def unbook(core, name, why):
    """Free an agent's seat (its bytes stay with the group as a free seat), and drop its
    model's weights and groups when it was the model's last agent; the bytes released."""
    rec = core.agents.pop(name, None)
    if rec is None:
        core.journal.drop(name)
        return 0
    dev = core.devices[rec.dev]
    before = dev.ledger.allocated_bytes
    if rec.live:
        seats.leave(core, rec)
    dev.ledger.release(f"agent:{name}")
    mrec = dev.models.get(rec.path)
    if mrec is not None:
        mrec.agents.discard(name)
        if not mrec.agents:         # the worker frees the model and every group on it
            dev.ledger.release(f"model:{mrec.path}")
            for group in seats.groups_of_path(core, rec.dev, mrec.path):
                seats.drop(core, group, "its model was freed")
            del dev.models[mrec.path]
    freed = before - dev.ledger.allocated_bytes
    core.journal.drop(name)
    core.log("info", f"admission: released agent={name} bytes={freed} ({why})")
    return freed


# -- reconciliation --------------------------------------------------------------------------

def rebook(core, led, key, rec, measured, keep=False):
    """Book measured + margin for key in ledger led if it allows; the measured bytes if only
    they fit; else keep the booking and say by how much it is short."""
    est = rec.estimated_bytes or 0
    margin = with_margin(measured, core.config.measure_margin_percent)
    core.log("info", f"reconcile: {key} estimated={est} measured={measured} "
             f"({100.0 * (est - measured) / measured:+.1f}%) booked="
             f"{rec.booked_bytes if keep else margin}{' (operator table kept)' if keep else ''}")
    if keep or led.booked(key) is None:
        return
    for nbytes in (margin, measured):
        if led.try_resize(key, nbytes) is None:
            rec.booked_bytes = nbytes
            return
    core.log("error", f"reconcile: {key} measured {measured} bytes but only "
             f"{led.booked(key)} are booked and the cap leaves no more")


def reconcile_model(core, dev, mrec, nbytes, spec):
    """Book the model's measured weights (+ margin) on dev, unless the operator table set
    them."""
    if not nbytes:
        return
    mrec.measured_bytes = nbytes
    core.measured.store_weights(mrec.fingerprint, dev.kind, ContextSpec(
        n_gpu_layers=spec.n_gpu_layers), with_margin(nbytes, core.config.measure_margin_percent))
    rebook(core, dev.ledger, f"model:{mrec.path}", mrec, nbytes, keep=mrec.source == "table")


def reconcile_overhead(core, dev):
    """A worker's own device bytes on CUDA (context, cuBLAS, pools): NVML's reading of the
    process minus llama.cpp's buffers. Raised when it grows, never lowered after measuring.
    Nothing on CPU: there is no such overhead (a CPU reading would be noise)."""
    engine = dev.engine
    if dev.kind != "cuda" or core.config.worker_overhead is not None or engine is None:
        return
    process, known = engine.process_bytes, engine.known_device_bytes
    if process is None or known is None:
        return
    want = with_margin(max(process - known, 0), core.config.measure_margin_percent)
    current = dev.ledger.booked("worker:overhead") or 0
    if (want > current or not dev.overhead_measured) and want != dev.overhead_refused:
        core.log("info", f"reconcile: worker:overhead booked={want} measured={process - known} "
                 f"(process {process} - buffers {known}) device={dev.index}")
        refused = book_fixed(core, dev.ledger, "worker:overhead", want)
        dev.overhead_measured = True
        dev.overhead_refused = want if refused else None    # said once, not at every reading


def book_fixed(core, led, key, nbytes):
    """Book (or resize) a fixed cost through ledger led's check; log when it does not fit (and
    return the Denial)."""
    denial = (led.try_reserve(key, nbytes) if led.booked(key) is None
              else led.try_resize(key, nbytes))
    if denial is not None:
        core.log("error", f"admission: {key} needs {nbytes} bytes but the cap leaves "
                 f"{denial.ledger_max_bytes - denial.ledger_allocated_bytes}; not booked")
    return denial

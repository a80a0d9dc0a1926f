"""Moving a parked agent to another device (pure): its saved state travels through the
broker, so it continues exactly, with no re-prefill.

When a parked agent must run (its DECODE or CHAT heads its device's room queue), no set of
parks can make room on its own device, and another ready device has room now for its seat
(and its model's weights when they are not loaded there), the broker moves it: EXPORT the
state from the old worker in chunks of CHUNK bytes, book the weights on the new device if
they are not there, IMPORT the chunks into the new worker (the agent is parked there now, in
host memory), then UNREGISTER it at the old worker, whose bytes are released only when it
confirms. The waiting op then seats the agent on the new device as any parked agent, and the
new worker restores the state into the seat. A step that fails undoes what the new device
got, and the op is answered with the reason.
"""
from lmx.broker.core import seats
from lmx.broker.core.state import ModelBooking, Op
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError
from lmx.common.jobs import ExportJob, ImportJob, UnregisterJob

CHUNK = 8 << 20          # bytes of state per EXPORT or IMPORT (frames stay far below limits)


def target(core, rec):
    """The ready device with room now for this parked agent (the most free bytes), with the
    weights it needs booked there (0 when loaded); None when none has room."""
    if rec is None or rec.live or rec.state != "ready" or len(core.devices) < 2:
        return None
    best = None
    for dev in core.devices:
        if dev.index == rec.dev or dev.state != "ready" or dev.room:
            continue
        weights = 0
        if rec.path not in dev.models:
            try:
                weights = core.estimate(rec.model, ContextSpec(**rec.spec), dev.kind).weights
            except LmxError:
                continue
        need = seats.cheapest(core, dev.index, rec.path, rec.spec, rec.booked_bytes,
                              rec.compute_bytes) + weights
        limit = core.config.max_live_contexts
        full = limit and sum(1 for a in core.agents.values()
                             if a.live and a.dev == dev.index) >= limit
        if need <= dev.free_bytes and not full and (best is None or dev.free_bytes >
                                                    best[0].free_bytes):
            best = (dev, weights)
    return best


def start(core, op, rec, dev, weights):
    """Begin moving rec (parked on its device) to dev for op, which waits in its room."""
    from lmx.broker.core.room import Step
    step = Step("move", rec.name)
    step.op = Op("MOVE", rec.name, {"to": dev.index, "from": rec.dev, "weights": weights,
                                    "data": bytearray(), "total": None, "job": "EXPORT"},
                 core.now, for_op=op, step=step, dev=rec.dev)
    op.victims = [step]
    core.log("info", f"devices: moving parked agent={rec.name} from device {rec.dev} to "
             f"{dev.index} ({dev.name}): no room for it on its own")
    _export(core, step.op)


def _export(core, mop):
    mop.fields["job"] = "EXPORT"
    core.send(mop, ExportJob(mop.agent, len(mop.fields["data"]), CHUNK))


def move_done(core, mop, result):
    """A MOVE's job finished: go on to its next chunk or step, or undo it."""
    f, rec = mop.fields, core.agents.get(mop.agent)
    if rec is None:
        return _abort(core, mop, "the agent is gone")
    if not result.ok:
        return _abort(core, mop, (result.error or {}).get("message", "failed"))
    if f["job"] == "UNDO":
        return None
    if f["job"] == "EXPORT":
        out = result.out
        if f["total"] is None:
            f["total"], f["tokens"], f["pending"] = out.total, out.tokens, out.pending
        f["data"] += out.data
        if len(f["data"]) < f["total"]:
            return _export(core, mop)
        return _begin_import(core, mop, rec)
    if f["job"] == "IMPORT":
        if result.out.model_loaded and result.out.model_measured is not None:
            from lmx.broker.core import booking
            dev = core.devices[f["to"]]
            booking.reconcile_model(core, dev, dev.models[rec.path],
                                    result.out.model_measured.nbytes, ContextSpec(**rec.spec))
        if not result.out.done:
            return _import(core, mop, rec)
        if core.devices[f["from"]].state != "ready":
            return _finish(core, mop, rec, False)    # its old slot died with its worker
        f["job"], mop.dev = "UNREGISTER", f["from"]
        return core.send(mop, UnregisterJob(mop.agent))
    _finish(core, mop, rec, bool(result.out and result.out.model_freed))


def _begin_import(core, mop, rec):
    """The whole state is here: book the weights on the new device, then send it over."""
    f = mop.fields
    dev = core.devices[f["to"]]
    if rec.path not in dev.models:
        denial = dev.ledger.try_apply({f"model:{rec.path}": f["weights"]})
        if denial is not None:
            return _abort(core, mop, f"its weights no longer fit device {dev.index}")
        old = core.devices[rec.dev].models[rec.path]
        dev.models[rec.path] = ModelBooking(rec.path, old.fingerprint, f["weights"],
                                            f["weights"], old.source)
    dev.models[rec.path].agents.add(rec.name)
    rec.dev = dev.index                 # it lives there from now on (its old slot goes next)
    f["sent"] = 0
    _import(core, mop, rec)


def _import(core, mop, rec):
    f = mop.fields
    offset = f["sent"]
    chunk = bytes(f["data"][offset:offset + CHUNK])
    f["sent"], f["job"], mop.dev = offset + len(chunk), "IMPORT", f["to"]
    core.send(mop, ImportJob(rec.name, rec.path, rec.spec, offset, f["total"], chunk,
                             f["tokens"] if offset == 0 else None,
                             f["pending"] if offset == 0 else None))


def _finish(core, mop, rec, model_freed):
    """The old worker let the agent go: release its side, and seat the op on the new device."""
    f = mop.fields
    _leave(core, f["from"], rec.path, rec.name)
    core.journal.put(rec.name, {"model": rec.model, "path": rec.path, "spec": rec.spec,
                                "device": core.devices[f["to"]].name})
    core.log("info", f"devices: moved agent={rec.name} to device {f['to']} "
             f"({f['total']} bytes of state)")
    op = mop.for_op
    old_room = core.devices[f["from"]].room
    if op in old_room:
        old_room.remove(op)
        op.victims, op.dev = [], f["to"]
        core.devices[f["to"]].room.appendleft(op)


def _leave(core, index, path, name):
    """The agent's model reference on device index is gone (its last: the weights too)."""
    dev = core.devices[index]
    mrec = dev.models.get(path)
    if mrec is None:
        return
    mrec.agents.discard(name)
    if not mrec.agents:
        dev.ledger.release(f"model:{path}")
        for group in seats.groups_of_path(core, index, path):
            seats.drop(core, group, "its model was freed")
        del dev.models[path]


def _abort(core, mop, why, err=None):
    """Undo what the new device got; answer the waiting op with the reason (or err)."""
    f, rec = mop.fields, core.agents.get(mop.agent)
    core.log("error", f"devices: moving agent={mop.agent} to device {f['to']} failed: {why}")
    if rec is not None and rec.dev == f["to"]:
        rec.dev = f["from"]
        _leave(core, f["to"], rec.path, rec.name)
        if core.devices[f["to"]].state == "ready" and (err is None or mop.dev != f["to"]):
            undo = Op("MOVE", mop.agent, {"job": "UNDO", "to": f["to"], "from": f["from"]},
                      core.now, dev=f["to"])
            core.send(undo, UnregisterJob(mop.agent))
    op = mop.for_op
    room = core.devices[f["from"]].room
    if op is not None and op in room and op.victims and op.victims[0] is mop.step:
        room.remove(op)
        op.victims = []
        core.end(op, (err or LmxError(
            Code.VRAM_LEDGER_DENY, f"no room for {mop.agent!r} on its device, and moving it "
            f"to device {f['to']} failed: {why}", agent=mop.agent)).fields())


def fail(core, mop, err):
    """The worker running a MOVE's job died: the old one while it let the agent go (the
    move is done), else the move is undone."""
    job, rec = mop.fields.get("job"), core.agents.get(mop.agent)
    if job == "UNREGISTER" and rec is not None:
        _finish(core, mop, rec, False)
    elif job != "UNDO":
        _abort(core, mop, err.message, err)

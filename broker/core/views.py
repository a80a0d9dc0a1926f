"""STATUS and LIST: documented records built from the core's state (pure)."""
from lmx.broker.core import room
from lmx.broker.core.state import VERSION
from lmx.common import protocol
from lmx.common.jobs import DeviceReading, EngineSummary
from lmx.common.replies import (AgentRecord, AgentState, GroupRecord, ListReply, ModelRecord,
                               StatusReply)


def residence(rec):
    """live (its context booked), parking, parked_ram, parked_disk, or parked_empty (parked
    before it had any state)."""
    if rec.live:
        return "live"
    return f"parked_{rec.parked}" if rec.parked else "parked_empty"


def queue_depth(core, name):
    """The agent's requests queued, waiting for room, or running."""
    lane = core.lanes.get(name)
    if lane is None:
        return 0
    active = lane.active is not None and not lane.active.internal
    return len(lane.queue) + int(active)


def agent_record(core, rec):
    """One agent as LIST shows it."""
    return AgentRecord(
        rec.name, rec.model, rec.path, rec.n_ctx, rec.spec, rec.state, residence(rec), rec.live,
        rec.booked_bytes, core.ledger.booked(f"agent:{rec.name}") or 0, rec.estimated_bytes,
        rec.measured_bytes, rec.source, rec.parked_bytes, rec.parked_pinned,
        rec.parked == "disk", rec.batch if rec.live else 0, rec.n_past,
        queue_depth(core, rec.name), rec.decodes, rec.generated_tokens, rec.parks,
        rec.owner.hex(), rec.registered_at, rec.last_active, rec.client)


def list_reply(core):
    return ListReply([agent_record(core, a) for a in core.agents.values()])


def _models(core, engine):
    out = []
    for path, m in sorted(core.models.items()):
        ctx = [core.agents[a] for a in m.agents if a in core.agents]
        refs = engine.models.get(path)
        out.append(ModelRecord(path, len(m.agents), m.booked_bytes, m.estimated_bytes,
                               m.measured_bytes, m.source, sum(a.booked_bytes for a in ctx),
                               refs.refs if refs else 0))
    for path, info in engine.models.items():
        if path not in core.models:      # held by the worker but booked by nobody: a bug
            out.append(ModelRecord(path, 0, 0, worker_refs=info.refs))
    return out


def status_reply(core):
    """STATUS: ledger, device, worker, agents, models and queues."""
    dev = core.worker.device or DeviceReading()
    engine = core.worker.engine or EngineSummary()
    streaming = getattr(core.worker, "streaming", None)
    states = {a.name: AgentState(residence(a), core.ledger.booked(f"agent:{a.name}") or 0,
                                 a.parked_bytes, queue_depth(core, a.name), a.generated_tokens,
                                 a.last_active) for a in core.agents.values()}
    led = core.ledger
    return StatusReply(
        VERSION, list(protocol.PROTOCOL_VERSION), core.config.endpoint, led.max_bytes,
        led.allocated_bytes, led.admission_percent, led.percent_cap, led.external_bytes,
        led.snapshot()["bookings"], dev.kind if core.worker.device else None,
        dev.name or None, dev.source if core.worker.device else None,
        dev.total_bytes or None, dev.used_bytes, dev.free_bytes, core.worker.pid,
        core.worker.state, core.worker.restarts, dev.process_bytes,
        bool(streaming and streaming.available), streaming.reason if streaming else None,
        [a.name for a in core.agents.values() if a.live], list(engine.groups),
        room.parked_ram(core), core.config.park_ram,
        sum(1 for op in core.room if not op.internal), states, _models(core, engine),
        len(core.agents), core.queue_depth(), len(core.jobs), _groups(core, engine),
        core.worker.builds_before + engine.context_builds)


def _groups(core, engine):
    builds = {s.group: s.builds for s in engine.seats}
    return [GroupRecord(g.gid, g.path, g.capacity, len(g.members),
                        max(builds.get(g.gid, 1) - 1, 0), g.seat_bytes,
                        core.ledger.booked(g.key) or 0, sorted(g.members))
            for g in sorted(core.groups.values(), key=lambda g: g.gid)]

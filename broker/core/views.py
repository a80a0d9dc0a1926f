"""STATUS and LIST: documented records built from the core's state (pure).

STATUS's top-level ledger and device byte figures are the sums over every device (with one
device, that device's); its worker fields are the first device's; ``devices`` has each device
with its own ledger. With more than one device, the top-level ``bookings`` keys carry their
device's index (``1/agent:x``)."""
from lmx.broker.core import room
from lmx.broker.core.state import VERSION
from lmx.common import protocol
from lmx.common.jobs import DeviceReading, EngineSummary
from lmx.common.replies import (AgentRecord, AgentState, DeviceRecord, GroupRecord, ListReply,
                               ModelRecord, StatusReply)


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


def _booked(core, rec):
    return core.devices[rec.dev].ledger.booked(f"agent:{rec.name}") or 0


def agent_record(core, rec):
    """One agent as LIST shows it."""
    return AgentRecord(
        rec.name, rec.model, rec.path, rec.n_ctx, rec.spec, rec.state, residence(rec), rec.live,
        rec.booked_bytes, _booked(core, rec), rec.estimated_bytes,
        rec.measured_bytes, rec.source, rec.parked_bytes, rec.parked_pinned,
        rec.parked == "disk", rec.batch if rec.live else 0, rec.n_past,
        queue_depth(core, rec.name), rec.decodes, rec.generated_tokens, rec.parks,
        rec.owner.hex(), rec.registered_at, rec.last_active, rec.client, rec.dev,
        core.devices[rec.dev].name)


def list_reply(core):
    return ListReply([agent_record(core, a) for a in core.agents.values()])


def _models(core, dev):
    out = []
    engine = dev.engine or EngineSummary()
    for path, m in sorted(dev.models.items()):
        ctx = [core.agents[a] for a in m.agents if a in core.agents]
        refs = engine.models.get(path)
        out.append(ModelRecord(path, len(m.agents), m.booked_bytes, m.estimated_bytes,
                               m.measured_bytes, m.source, sum(a.booked_bytes for a in ctx),
                               refs.refs if refs else 0, dev.index))
    for path, info in engine.models.items():
        if path not in dev.models:      # held by the worker but booked by nobody: a bug
            out.append(ModelRecord(path, 0, 0, worker_refs=info.refs, device=dev.index))
    return out


def _sum(values):
    """The sum, or None when any is unknown."""
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _bookings(core):
    if len(core.devices) == 1:
        return core.devices[0].ledger.snapshot()["bookings"]
    return {f"{d.index}/{k}": v for d in core.devices
            for k, v in d.ledger.snapshot()["bookings"].items()}


def status_reply(core):
    """STATUS: ledgers, devices, workers, agents, models and queues."""
    first = core.devices[0]
    dev = first.device or DeviceReading()
    streaming = first.streaming
    readings = [d.device or DeviceReading() for d in core.devices]
    leds = [d.ledger for d in core.devices]
    states = {a.name: AgentState(residence(a), _booked(core, a), a.parked_bytes,
                                 queue_depth(core, a.name), a.generated_tokens, a.last_active,
                                 a.dev) for a in core.agents.values()}
    engines = [d.engine or EngineSummary() for d in core.devices]
    return StatusReply(
        VERSION, list(protocol.PROTOCOL_VERSION), core.config.endpoint,
        sum(led.max_bytes for led in leds), sum(led.allocated_bytes for led in leds),
        first.ledger.admission_percent, sum(led.percent_cap for led in leds),
        _sum(led.external_bytes for led in leds), _bookings(core),
        dev.kind if first.device else None, dev.name or None,
        dev.source if first.device else None, sum(r.total_bytes for r in readings) or None,
        _sum(r.used_bytes for r in readings), _sum(r.free_bytes for r in readings),
        first.pid, first.state, first.restarts, dev.process_bytes,
        bool(streaming and streaming.available), streaming.reason if streaming else None,
        [a.name for a in core.agents.values() if a.live],
        [n for e in engines for n in e.groups], room.parked_ram(core), core.config.park_ram,
        sum(1 for op in core.room if not op.internal), states,
        [m for d in core.devices for m in _models(core, d)],
        len(core.agents), core.queue_depth(), len(core.jobs), _groups(core),
        sum(d.builds_before + e.context_builds for d, e in zip(core.devices, engines)),
        [_device(core, d) for d in core.devices])


def _device(core, d):
    """One device's record."""
    r = d.device or DeviceReading()
    led = d.ledger
    mine = [a for a in core.agents.values() if a.dev == d.index]
    return DeviceRecord(
        d.index, d.name, d.remote, d.state, d.pid, d.restarts,
        r.kind if d.device else None, r.name or None, r.source if d.device else None,
        r.index, r.total_bytes or None, r.used_bytes, r.free_bytes, r.process_bytes,
        led.max_bytes, led.allocated_bytes, led.percent_cap, led.external_bytes,
        led.snapshot()["bookings"], [a.name for a in mine], [a.name for a in mine if a.live],
        sorted(d.models), sum(1 for op in d.room if not op.internal),
        d.builds_before + (d.engine.context_builds if d.engine else 0))


def _groups(core):
    builds = {s.group: s.builds for d in core.devices for s in (
        d.engine.seats if d.engine else ())}
    return [GroupRecord(g.gid, g.path, g.capacity, len(g.members),
                        max(builds.get(g.gid, 1) - 1, 0), g.seat_bytes,
                        core.devices[g.dev].ledger.booked(g.key) or 0, sorted(g.members), g.dev)
            for g in sorted(core.groups.values(), key=lambda g: g.gid)]

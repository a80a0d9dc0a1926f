"""Making room: which agents are live, which idle ones to park, and who waits (pure).

The ledger books an agent's context only while it is live. An op that must make a context
live (a parked agent's DECODE, a REGISTER with --admit-by-parking that does not fit, or any
DECODE while --max-live-contexts is exceeded) joins the room queue. Its head plans: the least
recently used *idle* live agents (nothing queued or running for them, their last PARK not
refused) whose bookings free enough. Parking is two-phase: the victims' lanes are held, their
PARKs go to the worker one at a time (each with the RAM it may use: the budget minus every
parked byte the broker knows of), and a victim's booking is released only when the worker
confirms its PARK. A refused PARK leaves the victim live and booked. Only then is the op's
context booked, so the ledger never books what is still allocated.

While one op waits, every later DECODE waits behind it (first come, first served), so busy
agents go idle in turn and the waiting one cannot starve. When nothing is running that could
free room, the head is answered at once instead of waiting forever.
"""
import collections

RUNS = ("DECODE", "CHAT")

from lmx.broker.core import booking
from lmx.broker.core.state import Lane, Op
from lmx.common.errors import Code, LmxError, Reason
from lmx.common.jobs import ParkJob


class RoomQueue(collections.deque):
    """Ops waiting for room to make their agent live, in arrival order."""


def parked_ram(core):
    """Host bytes of every parked state the worker holds in RAM (the park budget's use)."""
    return sum(a.parked_bytes for a in core.agents.values() if a.parked == "ram")


def live_count(core):
    return sum(1 for a in core.agents.values() if a.live)


def over_live_limit(core):
    limit = core.config.max_live_contexts
    return bool(limit) and live_count(core) > limit


def plan(core, rec, nbytes):
    """The idle live agents (least recently used first) to park so that nbytes more fit for
    rec (None: an agent not registered yet) and the live count stays within
    --max-live-contexts; [] when nothing needs parking, None when no such set exists."""
    ledger = core.ledger
    free = ledger.max_bytes - ledger.allocated_bytes
    live = live_count(core) + (0 if rec is not None and rec.live else 1)
    limit = core.config.max_live_contexts
    extra = max(live - limit, 0) if limit else 0
    idle = sorted((a for a in core.agents.values() if a.live and a is not rec and
                   a.state == "ready" and not a.unparkable and core.lane_idle(a.name)),
                  key=lambda a: a.last_used)
    victims = []
    for victim in idle:
        if free >= nbytes and len(victims) >= extra:
            break
        victims.append(victim.name)
        free += ledger.booked(f"agent:{victim.name}") or 0
    return victims if free >= nbytes and len(victims) >= extra else None


def pump(core):
    """Serve the room queue's head while it can be served."""
    while core.room:
        op = core.room[0]
        if op.victims:
            return                          # its PARKs are not all confirmed yet
        outcome = _try(core, op)
        if outcome == "parking":
            return
        if outcome == "ready":
            core.room.popleft()
            _launch(core, op)
            continue
        if op.verb in RUNS and _room_may_come(core):
            return                          # a running request will leave idle agents
        core.room.popleft()
        core.end(op, _no_room(core, op).fields())


def _try(core, op):
    """ready (its context is booked), parking (PARKs sent) or wait."""
    rec = core.agents.get(op.agent) if op.verb in RUNS else None
    if rec is not None and rec.live:
        victims = plan(core, rec, 0) or []   # the live-count limit only
    else:
        victims = plan(core, rec, rec.booked_bytes if rec else _register_need(core, op))
        if victims is None:
            return "wait"
    if victims:
        _reserve(core, op, victims)
        return "parking"
    if rec is None:
        return "ready" if booking.book_register(core, op) is None else "wait"
    if not rec.live:
        if core.ledger.try_reserve(f"agent:{rec.name}", rec.booked_bytes) is not None:
            return "wait"
        rec.live = True
    return "ready"


def _register_need(core, op):
    est = op.estimate
    return est.context + (0 if est.path in core.models else est.weights)


def _launch(core, op):
    if op.verb in RUNS:
        core.launch_run(op)
    else:
        booking.send_register(core, op)


def _room_may_come(core):
    """True while a job runs whose end can leave an agent idle or free bytes."""
    return any(o.verb in ("DECODE", "CHAT", "REGISTER", "UNREGISTER", "RESTORE")
               for o in core.jobs.values())


def _no_room(core, op):
    """The answer for an op that cannot get room: the ledger's numbers, or the park budget."""
    rec = core.agents.get(op.agent) if op.verb in RUNS else None
    need = rec.booked_bytes if rec else _register_need(core, op)
    stuck = [a.name for a in core.agents.values() if a.live and a.unparkable]
    if stuck:
        return LmxError(Code.LIMIT, f"no room for {op.agent!r}: parking {', '.join(stuck)} "
                        f"does not fit the {core.config.park_ram}-byte host budget for parked "
                        "state and there is no state directory to spill to", Reason.PARK_BUDGET,
                        agent=op.agent, park_ram=core.config.park_ram,
                        parked_ram_bytes=parked_ram(core), requested_bytes=need,
                        **core.ledger_numbers())
    free = core.ledger.max_bytes - core.ledger.allocated_bytes
    return LmxError(Code.VRAM_LEDGER_DENY, f"agent {op.agent!r} needs {need} bytes but only "
                    f"{max(free, 0)} of the {core.ledger.max_bytes}-byte cap are free and no "
                    "idle agent can be parked", Reason.CAP, agent=op.agent,
                    requested_bytes=need, **core.ledger_numbers())


def _reserve(core, op, victims):
    """Hold every victim's lane for a PARK (so nothing starts on it), then send the first."""
    op.victims = list(victims)
    for name in victims:
        core.lanes.setdefault(name, Lane()).active = Op("PARK", name, {}, core.now, for_op=op)
    _send_next(core, op)


def _send_next(core, op):
    name = op.victims[0]
    park = core.lanes[name].active
    room = max(core.config.park_ram - parked_ram(core), 0)
    disk = core.config.park_to_disk and bool(core.config.state_dir)
    core.log("info", f"liveset: parking agent={name} for {op.agent} (host room {room} bytes, "
             f"disk {'yes' if disk else 'no'})")
    core.send(park, ParkJob(name, room, disk))


def park_done(core, park, result):
    """A PARK's result: release the victim's booking if it parked; go on with its op."""
    victim = core.agents.get(park.agent)
    op = park.for_op
    if result.ok and victim is not None:
        freed = core.ledger.release(f"agent:{victim.name}")
        victim.live = False
        victim.parks += 1
        core.log("info", f"liveset: parked agent={victim.name} released={freed}")
        op.parked.append(victim.name)
    elif victim is not None:
        err = result.error or {}
        victim.unparkable = True      # until parked RAM frees or it decodes again
        core.log("error", f"liveset: PARK of {victim.name} refused ({err.get('message')}); "
                 "it stays live and booked")
    core.end(park, None)
    if op.victims and op.victims[0] == park.agent:
        op.victims.pop(0)
    if not result.ok:
        _release(core, op)
    elif op.victims and op in core.room:
        _send_next(core, op)


def _release(core, op):
    """Give back the lanes held for op's PARKs that were not sent."""
    for name in op.victims:
        lane = core.lanes.get(name)
        if lane is not None and lane.active is not None and lane.active.job_id is None:
            lane.active = None
            core.advance(name)
    op.victims = []


def abandon(core, op):
    """op leaves the room queue before it got room (CANCEL, deadline)."""
    if op in core.room:
        core.room.remove(op)
        in_flight = [n for n in op.victims if core.lanes.get(n) and
                     core.lanes[n].active is not None and core.lanes[n].active.job_id]
        op.victims = [n for n in op.victims if n not in in_flight]
        _release(core, op)

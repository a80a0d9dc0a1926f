"""Making room: which agents are live, which idle ones to park, and who waits (pure).

The ledger books an agent's seat only while it is live (seats.py). An op that must seat an
agent (a parked agent's DECODE or CHAT, a REGISTER with --admit-by-parking that does not fit,
or any run while --max-live-contexts is exceeded) joins the room queue. Its head plans Steps
(plan()): when an idle agent of the same model and spec is live, parking it frees a seat the
op takes over (no bytes move, no context is rebuilt); otherwise free seats of other groups are
reclaimed (RESIZE), then the least recently used *idle* live agents (nothing queued or running
for them, their last PARK not refused) are parked, the last one of each group shrinking it.
Steps are two-phase: the victims' lanes are held, the steps go to the worker one at a time
(each PARK with the RAM it may use: the budget minus every parked byte the broker knows of),
and bytes are released only when the worker confirms. A refused PARK leaves the victim live
and booked. Only then is the op's seat booked, so the ledger never books what is still
allocated.

While one op waits with no room found, every later DECODE on its device waits behind it
(first come, first served), so busy agents go idle in turn and the waiting one cannot starve;
ops whose victims are being parked do not hold back live agents' runs, and while every op
ahead of it takes over a seat as is, the next op plans too (many agents are swapped in at
once). When nothing is running that could free room, the op is answered at once instead of
waiting forever. Each device has its own queue and plans with its own agents and ledger only.

A parked agent's run that would park idle agents waits out a burst first: --swap-grace-ms
after it arrived, and then while other DECODEs or CHATs keep reaching its device less than
that apart (at most five graces), it is held, without holding back live agents' runs. In a
burst the idle agents are often those whose own requests are about to arrive: parking them
made each of them park another when it came (100 agents sent at once parked 40 for 20
missing seats).
"""
from dataclasses import dataclass
from typing import Optional

from lmx.broker.core import booking, moves, seats
from lmx.broker.core.state import Lane, Op
from lmx.common.errors import Code, LmxError, Reason
from lmx.common.jobs import ParkJob, ResizeJob

RUNS = ("DECODE", "CHAT")
HOLD_GRACES = 5                 # the longest a burst holds a swap, in --swap-grace-ms


def parked_ram(core):
    """Host bytes of every parked state the worker holds in RAM (the park budget's use)."""
    return sum(a.parked_bytes for a in core.agents.values() if a.parked == "ram")


def live_count(core, dev):
    return sum(1 for a in core.agents.values() if a.live and a.dev == dev.index)


def over_live_limit(core, dev):
    """--max-live-contexts counts the live agents of each device."""
    limit = core.config.max_live_contexts
    return bool(limit) and live_count(core, dev) > limit


@dataclass
class Step:
    """One thing to do before a waiting op fits: park an idle agent (then shrink its group to
    `shrink` seats, None: keep the free seat), or resize a group to `shrink` seats."""

    kind: str                       # "park" or "resize"
    agent: Optional[str] = None     # park: the victim
    group: Optional[int] = None     # resize: the group
    shrink: Optional[int] = None
    op: Optional[Op] = None         # the internal PARK or RESIZE op carrying it out
    takeover: bool = False          # park: its seat is taken over as is (no bytes move)


def _need(core, op, rec):
    """(path, spec, seat bytes, compute bytes, new weights) of the agent op must seat."""
    if rec is not None:
        return rec.path, rec.spec, rec.booked_bytes, rec.compute_bytes, 0
    est = op.estimate
    seat, compute = seats.split(est)
    return (est.path, op.fields["spec"].as_dict(), seat, compute,
            0 if est.path in core.devices[op.dev].models else est.weights)


def need_bytes(core, op, rec):
    path, spec, seat, compute, weights = _need(core, op, rec)
    return seats.cheapest(core, op.dev, path, spec, seat, compute) + weights


def _total(group, capacity):
    """Everything a group costs at a capacity: its seats (taken or free) and compute."""
    return (group.compute_bytes if capacity else 0) + capacity * group.seat_bytes


def plan(core, op, rec):
    """The Steps that make room for op's agent (rec; None: a REGISTER): [] when it fits now,
    None when no such set exists. A same-model idle agent's seat is taken over (no bytes
    move, nothing is rebuilt); else free seats of other groups are reclaimed, then the least
    recently used idle agents are parked and their groups shrunk. --max-live-contexts may ask
    for more parks."""
    dev = core.devices[op.dev]
    live = live_count(core, dev) + (0 if rec is not None and rec.live else 1)
    limit = core.config.max_live_contexts
    extra = max(live - limit, 0) if limit else 0
    idle = sorted(_idle(core, dev, rec), key=lambda a: a.last_used)
    if rec is not None and rec.live:
        return [Step("park", v.name) for v in idle[:extra]] if len(idle) >= extra else None
    path, spec, seat, compute, weights = _need(core, op, rec)
    need = seats.cheapest(core, dev.index, path, spec, seat, compute) + weights
    free = dev.free_bytes
    if free >= need and not extra:
        return []
    same = _by_busy_group(core, [a for a in idle if a.path == path and a.spec == spec])
    if same:        # its seat is ours once it parks: no bytes needed
        others = [a for a in idle if a is not same[0]][:max(extra - 1, 0)]
        if len(others) < extra - 1:
            return None
        return [Step("park", same[0].name, takeover=True)] + [Step("park", v.name)
                                                               for v in others]
    return _plan_bytes(core, dev, idle, need - free, extra, (path, spec))


def _idle(core, dev, rec):
    """The live agents of dev (not rec) that may be parked now: nothing queued or running for
    them, their last PARK not refused."""
    return [a for a in core.agents.values() if a.live and a is not rec and a.dev == dev.index
            and a.state == "ready" and not a.unparkable and core.lane_idle(a.name)]


def _by_busy_group(core, idle):
    """Idle agents whose groups have the most busy members first (least recently used first
    among equals): a seat taken over there joins the running agents' batch, so the agents
    that work together gather in one group (one llama_decode a step) instead of spreading."""
    busy = {}
    for agent in core.agents.values():
        if agent.live and not core.lane_idle(agent.name):
            busy[agent.gid] = busy.get(agent.gid, 0) + 1
    return sorted(idle, key=lambda a: -busy.get(a.gid, 0))


def _plan_bytes(core, dev, idle, short, extra, key):
    """Resizes of other groups' free seats, then parks (the last of a group shrinks it)."""
    steps, freed = [], 0
    for group in sorted(core.groups.values(), key=lambda g: (len(g.members), g.gid)):
        if freed >= short:
            break
        if group.dev != dev.index:
            continue
        if group.free > 0 and (group.path, group.spec) != key:
            steps.append(Step("resize", group=group.gid, shrink=len(group.members)))
            freed += _total(group, group.capacity) - _total(group, len(group.members))
    left = {}                                   # gid -> members left after the parks
    parks = []
    for victim in idle:
        if freed >= short and len(parks) >= extra:
            break
        group = core.groups.get(victim.gid)
        if group is None:
            continue
        before = left.get(group.gid, len(group.members))
        left[group.gid] = before - 1
        freed += _total(group, before) - _total(group, before - 1)
        parks.append(Step("park", victim.name))
    if freed < short or len(parks) < extra:
        return None
    for gid, members in left.items():           # the group's last park shrinks it
        last = [p for p in parks if core.agents[p.agent].gid == gid][-1]
        last.shrink = members
    return steps + parks


def pump(core):
    """Serve each device's room queue (_pump)."""
    for dev in core.devices:
        _pump(core, dev)


def _pump(core, dev):
    """Serve dev's room queue in arrival order. An op whose PARKs are under way is passed
    over, so many agents are made live at once (their PARKs reach the worker together), but
    only while every op before it takes over a seat as is: bytes freed for one op are never
    counted for another. The first op that must wait stops the rest (first come, first
    served)."""
    at = 0
    while at < len(dev.room):
        op = dev.room[at]
        if op.victims:                      # its PARKs (or its move) are not confirmed yet
            if not all(getattr(step, "takeover", False) for step in op.victims):
                return
            at += 1
            continue
        outcome = _try(core, op)
        op.held = outcome == "held"
        if op.held:                         # those behind it wait out the burst with it
            for later in list(dev.room)[at + 1:]:
                later.held = later.held or not later.victims
            return                          # the next event or tick looks again
        if outcome == "parking":
            at += 1
            continue
        if outcome == "ready":
            del dev.room[at]
            _launch(core, op)
            continue
        if op.verb in RUNS and _room_may_come(core, dev):
            return                          # a running request will leave idle agents
        del dev.room[at]
        core.end(op, _no_room(core, op).fields())


def blocks(dev):
    """True while an op waits for room on dev with none found yet: a live agent's new run
    there waits behind it (so busy agents go idle in turn and it cannot starve). Ops whose
    PARKs are under way hold their seats already, and ops waiting out a burst have not
    chosen; runs of live agents pass them."""
    return any(not op.victims and not op.held for op in dev.room)


def in_burst(core, dev, op):
    """True for the grace after op arrived (the first request of a burst cannot tell it is
    one), then while other runs keep reaching dev less than the grace apart, for at most
    HOLD_GRACES graces in all (requests that never stop coming must not starve it)."""
    grace = core.config.swap_grace_s
    waited = core.now - op.t0
    if not grace or waited >= HOLD_GRACES * grace:
        return False
    return waited < grace or any(other is not op and core.now - at < grace
                                 for at, other in dev.last_runs)


def holding(core):
    """True while some op waits out a burst (the server then ticks often)."""
    return any(op.held for dev in core.devices for op in dev.room)


def _try(core, op):
    """ready (its seat is booked), parking (Steps under way), held (a burst of requests is
    arriving: wait before parking anyone) or wait."""
    rec = core.agents.get(op.agent) if op.verb in RUNS else None
    steps = plan(core, op, rec)
    if steps is None:
        there = moves.target(core, rec) if op.verb in RUNS else None
        if there is None:
            return "wait"
        moves.start(core, op, rec, *there)      # no room here; another device has some
        return "parking"
    if steps:
        if rec is not None and any(s.kind == "park" for s in steps) and \
                in_burst(core, core.devices[op.dev], op):
            return "held"
        _reserve(core, op, steps)
        return "parking"
    if rec is None:
        return "ready" if booking.book_register(core, op) is None else "wait"
    if not rec.live:
        got = seats.take(core, rec)
        if not isinstance(got, dict):
            return "wait"
        op.seat = got
    return "ready"


def _launch(core, op):
    if op.verb in RUNS:
        core.launch_run(op)
    else:
        booking.send_register(core, op)


def _room_may_come(core, dev):
    """True while a job runs on dev whose end can leave an agent idle or free bytes, or an op
    ahead in the room queue has its PARKs under way (its run or REGISTER follows and leaves an
    idle agent: every seat may be being swapped at once, with nothing decoding yet)."""
    return any(o.verb in ("DECODE", "CHAT", "REGISTER", "UNREGISTER", "RESTORE", "RESIZE")
               and o.dev == dev.index for o in core.jobs.values()) or \
        any(op.victims for op in dev.room)


def _no_room(core, op):
    """The answer for an op that cannot get room: the ledger's numbers, or the park budget."""
    rec = core.agents.get(op.agent) if op.verb in RUNS else None
    need = need_bytes(core, op, rec)
    stuck = [a.name for a in core.agents.values() if a.live and a.unparkable and
             a.dev == op.dev]
    if stuck:
        return LmxError(Code.LIMIT, f"no room for {op.agent!r}: parking {', '.join(stuck)} "
                        f"does not fit the {core.config.park_ram}-byte host budget for parked "
                        "state and there is no state directory to spill to", Reason.PARK_BUDGET,
                        agent=op.agent, park_ram=core.config.park_ram,
                        parked_ram_bytes=parked_ram(core), requested_bytes=need,
                        **core.ledger_numbers(op.dev))
    led = core.devices[op.dev].ledger
    free = led.max_bytes - led.allocated_bytes
    where = f" on device {op.dev}" if len(core.devices) > 1 else ""
    freeable = _freeable(core, core.devices[op.dev], rec)
    why = (f"parking every idle agent would free {freeable} more (weights stay loaded while "
           "their agents are registered)" if freeable else "no idle agent can be parked")
    return LmxError(Code.VRAM_LEDGER_DENY, f"agent {op.agent!r} needs {need} bytes but only "
                    f"{max(free, 0)} of the {led.max_bytes}-byte cap{where} are free and "
                    f"{why}", Reason.CAP, agent=op.agent, requested_bytes=need,
                    device=op.dev, freeable_bytes=freeable, **core.ledger_numbers(op.dev))


def _freeable(core, dev, rec):
    """The most bytes parking every idle agent of dev (not rec) could give back: a group they
    would leave empty goes whole (compute and seats), another shrinks to its other members."""
    idle = _idle(core, dev, rec)
    total = 0
    for gid in {a.gid for a in idle}:
        group = core.groups.get(gid)
        if group is None:
            continue
        stay = len(group.members) - sum(1 for a in idle if a.gid == gid)
        total += _total(group, group.capacity) - _total(group, stay)
    return total


def _reserve(core, op, steps):
    """Hold every victim's lane for its PARK (so nothing starts on it), then send the first
    step."""
    op.victims = list(steps)
    for step in steps:
        if step.kind == "park":
            step.op = Op("PARK", step.agent, {}, core.now, for_op=op, step=step, dev=op.dev)
            core.lanes.setdefault(step.agent, Lane()).active = step.op
        else:
            step.op = Op("RESIZE", f"group:{step.group}", {}, core.now, for_op=op, step=step,
                         dev=op.dev)
    _send_next(core, op)


def _send_next(core, op):
    step = op.victims[0]
    if step.kind == "resize":
        core.log("info", f"seats: shrinking group {step.group} to {step.shrink} seats for "
                 f"{op.agent}")
        core.send(step.op, ResizeJob(step.group, step.shrink))
        return
    room = max(core.config.park_ram - parked_ram(core), 0)
    disk = core.config.park_to_disk and bool(core.config.state_dir)
    core.log("info", f"liveset: parking agent={step.agent} for {op.agent} (host room {room} "
             f"bytes, disk {'yes' if disk else 'no'}, seats after "
             f"{'kept' if step.shrink is None else step.shrink})")
    core.send(step.op, ParkJob(step.agent, room, disk, step.shrink))


def park_done(core, park, result):
    """A PARK's result: the victim's seat is free (or its group shrunk); go on with its op."""
    victim = core.agents.get(park.agent)
    op, step = park.for_op, park.step
    if result.ok and victim is not None:
        freed = seats.leave(core, victim, step.shrink)
        victim.parks += 1
        core.log("info", f"liveset: parked agent={victim.name} released={freed}")
        op.parked.append(victim.name)
    elif victim is not None:
        err = result.error or {}
        victim.unparkable = True      # until parked RAM frees or it decodes again
        core.log("error", f"liveset: PARK of {victim.name} refused ({err.get('message')}); "
                 "it stays live and booked")
    core.end(park, None)
    _next(core, op, step, result.ok)


def resize_done(core, rop, result):
    """A RESIZE's result: the group's free seats are released; go on with its op."""
    op, step = rop.for_op, rop.step
    group = core.groups.get(step.group)
    if result.ok and group is not None:
        group.capacity = result.out.seats
        seats.resize(core, group)
    elif not result.ok:
        core.log("error", f"seats: RESIZE of group {step.group} failed "
                 f"({(result.error or {}).get('message')})")
    _next(core, op, step, result.ok)


def _next(core, op, step, ok):
    if op.victims and op.victims[0] is step:
        op.victims.pop(0)
    if not ok:
        _release(core, op)
    elif op.victims and op in core.devices[op.dev].room:
        _send_next(core, op)


def _release(core, op):
    """Give back the lanes held for op's PARKs that were not sent."""
    for step in op.victims:
        lane = core.lanes.get(step.agent) if step.kind == "park" else None
        if lane is not None and lane.active is step.op and step.op.job_id is None:
            lane.active = None
            core.advance(step.agent)
    op.victims = []


def abandon(core, op):
    """op leaves the room queue before it got room (CANCEL, deadline); a step already at the
    worker finishes (its result is applied), the others are dropped."""
    room = core.devices[op.dev].room
    if op in room:
        room.remove(op)
        op.victims = [s for s in op.victims if s.op is None or s.op.job_id is None]
        _release(core, op)

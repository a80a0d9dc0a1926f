"""Seats: where live agents sit in the worker's group contexts, and what the ledger books for
them (pure).

The worker builds one llama_context per group of agents of one model and context spec, with a
capacity of seats (one KV stream each). The broker decides every group's capacity and every
agent's group, so the ledger books exactly what the worker allocates:

- ``agent:NAME``: the seat a live agent holds (its KV, ``seat_bytes``);
- ``group:GID``: the group's compute buffer plus its free seats.

Taking a free seat moves bytes from the group to the agent, and parking or unregistering moves
them back: neither allocates nor frees device memory, and neither rebuilds the context. A
group grows geometrically (1, 2, 4, ... up to --max-batch seats) when no seat is free, to as
many seats as fit when doubling does not, and a new group starts when the last one is at
--max-batch; so a group of N agents is built O(log N) times. It shrinks only when the room is
needed (room.py): a PARK with ``shrink``, or a RESIZE of a group's free seats.

The estimator splits an agent's context into the seat (KV) and the group's compute buffer; a
table or measured figure without that split books a whole context per seat (more than the
truth, never less). Each build's measured bytes reconcile the group's compute booking
(reconcile()).
"""
from dataclasses import dataclass, field

from lmx.broker.measured import with_margin
from lmx.common.ctxspec import ContextSpec

MAX_SEATS = 256                  # llama.cpp's LLAMA_MAX_SEQ


@dataclass
class SeatGroup:
    """One group as the broker books it."""

    gid: int
    path: str
    spec: dict
    capacity: int
    seat_bytes: int
    compute_bytes: int
    members: set = field(default_factory=set)
    builds: int = 0                 # the worker's count, from its last report
    dev: int = 0                    # the device whose worker holds the context

    @property
    def key(self):
        return f"group:{self.gid}"

    @property
    def free(self):
        return self.capacity - len(self.members)

    def booking(self, capacity=None, members=None):
        """What group:GID books: compute plus the free seats (at capacity and members)."""
        capacity = self.capacity if capacity is None else capacity
        members = len(self.members) if members is None else members
        return self.compute_bytes + (capacity - members) * self.seat_bytes if capacity else 0


def split(est):
    """(seat bytes, compute bytes) of an Estimate: the estimator's KV is the seat and the
    rest of the context the group's compute; without a breakdown, a whole context per seat."""
    kv = (est.estimated or {}).get("kv")
    if kv and 0 < kv <= est.context:
        return kv, est.context - kv
    return est.context, 0


def most_seats(core, spec):
    """The most seats a group of this spec may have (1 when it cannot be batched)."""
    if spec.get("n_seq", 1) != 1:
        return 1
    return max(1, min(core.config.worker.max_batch, spec.get("n_batch", 512), MAX_SEATS))


def groups_of(core, dev, path, spec):
    return sorted((g for g in core.groups.values() if g.path == path and g.spec == spec and
                   g.dev == dev), key=lambda g: g.gid)


def _ledger(core, dev):
    return core.devices[dev].ledger


def options(core, dev, path, spec, seat, compute):
    """Ways to seat one more agent on device dev, best first: [(group or None for a new one,
    capacity, bytes it adds to the ledger)]. A free seat adds nothing."""
    mine = groups_of(core, dev, path, spec)
    for g in mine:
        if g.free > 0:
            return [(g, g.capacity, 0)]
    most = most_seats(core, spec)
    led = _ledger(core, dev)
    free = led.max_bytes - led.allocated_bytes
    for g in mine:
        if g.capacity < most:
            double = min(2 * g.capacity, most)
            fits = g.capacity + min(max(free // max(g.seat_bytes, 1), 1), double - g.capacity)
            sizes = sorted({double, fits, g.capacity + 1}, reverse=True)
            return [(g, c, (c - g.capacity) * g.seat_bytes) for c in sizes]
    return [(None, 1, compute + seat)]


def cheapest(core, dev, path, spec, seat, compute):
    """The fewest bytes seating one more agent on device dev can add."""
    return min(cost for _, _, cost in options(core, dev, path, spec, seat, compute))


def take(core, rec, extra=None):
    """Seat rec (an Agent not live) on its device: book its seat (and extra {key: bytes}, e.g.
    a new model's weights) in one step, the best option that fits. Return the job's seat
    map, or the Denial of the cheapest option."""
    denial = None
    for group, capacity, _ in options(core, rec.dev, rec.path, rec.spec, rec.booked_bytes,
                                      rec.compute_bytes):
        if group is None:
            group = SeatGroup(core.next_gid(), rec.path, rec.spec, 0, rec.booked_bytes,
                              rec.compute_bytes, dev=rec.dev)
        changes = dict(extra or {})
        changes[group.key] = group.booking(capacity, len(group.members) + 1)
        changes[f"agent:{rec.name}"] = group.seat_bytes
        denial = _ledger(core, rec.dev).try_apply(changes)
        if denial is None:
            core.groups[group.gid] = group
            group.capacity = capacity
            group.members.add(rec.name)
            rec.gid, rec.live, rec.booked_bytes = group.gid, True, group.seat_bytes
            return {"group": group.gid, "capacity": capacity}
    return denial


def leave(core, rec, shrink=None):
    """rec's seat is free at the worker (parked or gone): its bytes go back to the group, or,
    with shrink, the group has that many seats now (0: freed) and the rest is released.
    Returns the bytes the ledger released."""
    group = core.groups.get(rec.gid)
    rec.gid, rec.live = None, False
    led = _ledger(core, rec.dev)
    before = led.allocated_bytes
    led.release(f"agent:{rec.name}")
    if group is not None:
        group.members.discard(rec.name)
        if shrink is not None:
            group.capacity = shrink
        resize(core, group)
    return before - led.allocated_bytes


def resize(core, group):
    """Book group:GID for its capacity and members now (drop it when it has no seats)."""
    led = _ledger(core, group.dev)
    if group.capacity == 0:
        led.release(group.key)
        core.groups.pop(group.gid, None)
        return
    want = group.booking()
    if led.booked(group.key) is None:
        denial = led.try_reserve(group.key, want)
    else:
        denial = led.try_resize(group.key, want)
    if denial is not None:     # only growth can be refused, and growth is booked before
        core.log("error", f"seats: {group.key} needs {want} bytes; the cap refused it")


def groups_of_path(core, dev, path):
    return [g for g in core.groups.values() if g.path == path and g.dev == dev]


def sync(core, dev, engine):
    """Drop every group of device dev its worker does not report and no job in flight is
    building (a build failed there: its members' sequences were reset)."""
    if engine is None:
        return
    have = {s.group for s in engine.seats}
    coming = {op.seat["group"] for op in core.jobs.values() if op.seat}
    for group in list(core.groups.values()):
        if group.dev == dev and group.gid not in have and group.gid not in coming:
            drop(core, group, "the worker does not hold it")


def drop(core, group, why):
    """The worker no longer has this group: release it and its members' seats (they are not
    live any more; their conversations were reset by the worker)."""
    led = _ledger(core, group.dev)
    for name in list(group.members):
        rec = core.agents.get(name)
        if rec is not None:
            rec.gid, rec.live = None, False
            led.release(f"agent:{name}")
    led.release(group.key)
    core.groups.pop(group.gid, None)
    core.log("info", f"seats: dropped {group.key} ({why})")


def drop_all(core, dev, why):
    for group in list(core.groups.values()):
        if group.dev == dev:
            drop(core, group, why)


def reconcile(core, dev, engine):
    """Each group device dev's worker (re)built since its last report: its seats stay booked
    as estimated (the KV is exact), and the rest of what it measured (compute) is booked with
    the margin, through the ledger's check."""
    for state in engine.seats if engine is not None else ():
        group = core.groups.get(state.group)
        if group is None or group.dev != dev or state.builds == group.builds or \
                state.measured is None:
            continue
        group.builds = state.builds
        if state.seats != group.capacity:
            continue                # a resize is on its way; the next report settles it
        measured = state.measured.nbytes
        compute = with_margin(max(measured - group.capacity * group.seat_bytes, 0),
                              core.config.measure_margin_percent)
        old = group.compute_bytes
        group.compute_bytes = compute
        if _ledger(core, dev).try_resize(group.key, group.booking()) is not None:
            group.compute_bytes = old
            core.log("error", f"reconcile: {group.key} measured {measured} bytes for "
                     f"{group.capacity} seats; the cap leaves no room to book it")
            continue
        core.log("info", f"reconcile: {group.key} seats={group.capacity} measured={measured} "
                 f"compute booked {old} -> {compute}")
        if group.capacity == 1 and group.members:
            rec = core.agents.get(next(iter(group.members)))
            if rec is not None:
                rec.measured_bytes = measured
                mrec = core.devices[dev].models.get(rec.path)  # the next REGISTER's estimate
                core.measured.store_context(mrec.fingerprint if mrec else "",
                                            core.devices[dev].kind, ContextSpec(**rec.spec),
                                            group.seat_bytes + compute)

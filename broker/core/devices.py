"""Devices: one worker and one honest ledger per device, and where a new agent goes (pure).

The broker drives one or more devices. Each has its own worker (a local subprocess, or a
remote one that connected over tcp+CURVE), its own ledger (cap, bookings: ``model:PATH`` once
per device the model is loaded on, ``agent:NAME``, ``group:GID``, ``worker:overhead``), its own
loaded models and its own queue of ops waiting for room. An agent lives on one device: its
slot, seat and parked state are that device's worker's. Devices are numbered in the order the
broker knows them: its local workers first (``--gpus``, or one per ``--vram-total``), then
remote workers as each first says READY (a worker that comes back with the same name gets its
device back).

Placement (REGISTER): a pinned ``device`` must be ready; otherwise, among ready devices, one
where the model's weights already sit if its context fits there (most free bytes first), else
the device with the most free bytes where weights and context fit (the lowest index on a tie).
When none fits, the refusal lists every device and why.
"""
import collections

from lmx.broker.core import seats
from lmx.broker.ledger import Ledger
from lmx.common.errors import Code, LmxError, Reason


class DeviceView:
    """One device as the core knows it: its worker's state and readings, its ledger, its
    loaded models and the ops waiting for room on it."""

    def __init__(self, index, name, admission_percent, remote=False):
        self.index, self.name, self.remote = index, name, remote
        self.ledger = Ledger(None, admission_percent)
        self.models = {}                  # path -> state.ModelBooking (weights on this device)
        self.room = collections.deque()   # ops waiting for room here, in arrival order
        self.state = "starting"           # starting -> ready -> lost -> starting ...
        self.pid = None
        self.device = None                # DeviceReading
        self.engine = None                # EngineSummary of its worker's last result
        self.streaming = None             # StreamingInfo from READY
        self.last_seen = 0.0
        self.restarts = 0
        self.backoff = 1.0
        self.replayed = False             # the journal's agents of this device were replayed
        self.overhead_measured = False
        self.overhead_refused = None      # the overhead the cap last refused (logged once)
        self.last_runs = collections.deque(maxlen=64)   # (time, op) of recent DECODEs/CHATs
        self.builds_before = 0            # context builds of this device's earlier workers

    @property
    def kind(self):
        return self.device.kind if self.device is not None else "cpu"

    @property
    def free_bytes(self):
        return self.ledger.max_bytes - self.ledger.allocated_bytes


def resolve(core, wanted):
    """The device a REGISTER's ``device`` field names (an index or a name), or BAD_REQUEST."""
    for dev in core.devices:
        if wanted == dev.index if isinstance(wanted, int) else wanted == dev.name:
            return dev
    names = ", ".join(f"{d.index} ({d.name})" for d in core.devices)
    raise LmxError(Code.BAD_REQUEST, f"no device {wanted!r}; devices: {names}",
                   Reason.BAD_VALUE, field="device")


def _need(core, dev, est, spec):
    """Bytes seating one more agent of this estimate adds on dev (weights when not loaded)."""
    seat, compute = seats.split(est)
    return seats.cheapest(core, dev.index, est.path, spec.as_dict(), seat, compute) + (
        0 if est.path in dev.models else est.weights)


def _below_limit(core, dev):
    limit = core.config.max_live_contexts
    return not limit or sum(1 for a in core.agents.values()
                            if a.live and a.dev == dev.index) < limit


def candidates(core, op):
    """[(device, estimate, bytes needed)] for a REGISTER: its pinned device, or every ready
    one. WORKER_UNAVAILABLE when none is ready; the estimator's errors as they are."""
    pinned = op.fields.get("device")
    devs = [resolve(core, pinned)] if pinned is not None else core.devices
    ready = [d for d in devs if d.state == "ready"]
    if not ready:
        what = f"device {devs[0].index} ({devs[0].name}) has no ready worker" \
            if pinned is not None else "no device has a ready worker"
        raise LmxError(Code.WORKER_UNAVAILABLE, f"{what}; try again", devices=states(core))
    estimates, out = {}, []
    for dev in ready:
        if dev.kind not in estimates:
            estimates[dev.kind] = core.estimate(op.fields["model"], op.fields["spec"], dev.kind)
        est = estimates[dev.kind]
        out.append((dev, est, _need(core, dev, est, op.fields["spec"])))
    return out


def choose(core, rows):
    """The row to book now: weights already there and it fits, else the most free bytes
    among those that fit; None when nothing fits."""
    fits = [r for r in rows if r[2] <= r[0].free_bytes and _below_limit(core, r[0])]
    loaded = [r for r in fits if r[1].path in r[0].models]
    pool = loaded or fits
    if not pool:
        return None
    return max(pool, key=lambda r: (r[0].free_bytes, -r[0].index))


def states(core):
    """Each device's worker state, for WORKER_UNAVAILABLE."""
    return [{"device": d.index, "name": d.name, "worker_state": d.state} for d in core.devices]


def refusal(core, op, rows):
    """VRAM_LEDGER_DENY for a REGISTER no device can take: the numbers of the device with the
    most free bytes at the top, and every device with why it did not fit."""
    shown = {r[0].index: r for r in rows}
    detail = []
    for dev in core.devices:
        if op.fields.get("device") is not None and dev.index not in shown:
            continue
        row = {"device": dev.index, "name": dev.name, "worker_state": dev.state,
               "ledger_max_bytes": dev.ledger.max_bytes,
               "ledger_allocated_bytes": dev.ledger.allocated_bytes}
        if dev.index in shown:
            _, est, need = shown[dev.index]
            denial = dev.ledger.check(need)
            row.update(requested_bytes=need, weights_loaded=est.path in dev.models,
                       reason=denial.reason if denial else Reason.LIVE_LIMIT)
        else:
            row.update(reason=Reason.NOT_READY)
        detail.append(row)
    dev, est, need = max(rows, key=lambda r: (r[0].free_bytes, -r[0].index))
    free = max(dev.free_bytes, 0)
    what = f"agent {op.agent!r} on {op.fields['model']}"
    message = (f"{what} needs {need} bytes but only {free} of the {dev.ledger.max_bytes}-byte "
               "cap are free")
    if len(core.devices) > 1:
        message = f"{what} fits no device: " + "; ".join(_why(r) for r in detail)
    denial = dev.ledger.check(need)
    return LmxError(Code.VRAM_LEDGER_DENY, message, denial.reason if denial else Reason.CAP,
                    ledger_max_bytes=dev.ledger.max_bytes,
                    ledger_allocated_bytes=dev.ledger.allocated_bytes, requested_bytes=need,
                    device=dev.index, devices=detail)


def _why(row):
    """One device's part of a refusal's message."""
    head = f"device {row['device']} ({row['name']}): "
    if "requested_bytes" not in row:
        return head + f"worker {row['worker_state']}"
    free = max(row["ledger_max_bytes"] - row["ledger_allocated_bytes"], 0)
    return head + f"needs {row['requested_bytes']}, {free} free ({row['reason']})"

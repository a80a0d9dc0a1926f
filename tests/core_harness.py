"""A pure harness for the broker's core: fake estimates, an in-memory journal, and a fake
worker that answers the jobs the core sends (no sockets, no processes, no clock)."""
from dataclasses import dataclass, field

from lmx.broker.core import BrokerConfig, Core
from lmx.broker.core.events import (ClientRequest, Reply, SendJob, Tick, WorkerReady,
                                    WorkerResult)
from lmx.common.config import WorkerConfig
from lmx.common.errors import Code, LmxError, Reason
from lmx.common.jobs import (ChatResult, DecodeResult, DeviceReading, EngineSummary,
                             ExportResult, GroupState, ImportResult, ParkResult,
                             RegisterResult, ResizeResult, Result, SlotState, UnregisterResult)

MiB = 1 << 20
WEIGHTS = {"small": 100 * MiB, "big": 300 * MiB}
CONTEXT = 50 * MiB
STATE_BYTES_PER_TOKEN = 1000


@dataclass
class FakeEstimate:
    path: str
    weights: int
    context: int
    weights_source: str = "estimator"
    context_source: str = "estimator"
    fingerprint: str = "fp"
    estimated: dict = field(default_factory=dict)


def fake_estimate(model, spec, kind):
    if model not in WEIGHTS:
        raise LmxError(Code.MODEL_ERROR, f"unknown model key {model!r}", Reason.UNKNOWN_KEY)
    return FakeEstimate(f"/models/{model}.gguf", WEIGHTS[model], CONTEXT)


class MemJournal:
    def __init__(self, agents=None):
        self.agents = dict(agents or {})

    def put(self, agent, entry):
        self.agents[agent] = entry

    def drop(self, agent):
        self.agents.pop(agent, None)


class MemMeasured:
    def store_weights(self, *args):
        pass

    def store_context(self, *args):
        pass


class FakeWorker:
    """Holds slots like the real worker would and answers jobs; park refusals follow the
    budget the broker sends (ram_bytes, disk) exactly as the engine does."""

    def __init__(self, pending=None):
        self.slots = {}           # agent -> SlotState
        self.pending = [] if pending is None else pending   # SendJobs not answered yet
        self.groups = {}          # gid -> [path, capacity, set of agents], as the engine seats
        self.builds = 0

    def summary(self):
        return EngineSummary(seats=[GroupState(gid, path, cap, len(members), 1)
                                    for gid, (path, cap, members) in self.groups.items()],
                             context_builds=self.builds)

    def _seat(self, agent, path, seat):
        if seat is None:
            return
        group = self.groups.setdefault(seat["group"], [path, 0, set()])
        if len(group[2]) == group[1]:
            assert seat["capacity"] > group[1], f"no free seat for {agent}: {seat}"
            group[1] = seat["capacity"]
            self.builds += 1
        group[2].add(agent)

    def _unseat(self, agent, shrink=None):
        for gid, group in list(self.groups.items()):
            if agent in group[2]:
                group[2].discard(agent)
                if shrink is not None:
                    group[1] = shrink
                    self.builds += bool(shrink)
                    if not shrink:
                        del self.groups[gid]

    def answer(self, job, fail=None):
        f, verb = job.fields, job.verb
        slot = self.slots.get(f.get("agent"))
        if fail is not None:
            return Result("error", slot, self.summary(), dict(code=fail, reason="",
                                                               message="injected"))
        if verb == "REGISTER":
            self.slots[f["agent"]] = SlotState(f["agent"], f["path"])
            self._seat(f["agent"], f["path"], f.get("seat"))
            return self._ok(f["agent"], RegisterResult(model_loaded=True, model_refs=1))
        if verb == "UNREGISTER":
            gone = self.slots.pop(f["agent"], None)
            self._unseat(f["agent"])
            if gone is not None and not any(s.model == gone.model for s in self.slots.values()):
                self.groups = {g: v for g, v in self.groups.items() if v[0] != gone.model}
            return self._ok(f["agent"], UnregisterResult(model_freed=False))
        if verb == "RESIZE":
            group = self.groups.get(f["group"])
            if group is not None:
                group[1] = f["capacity"]
                if not f["capacity"]:
                    del self.groups[f["group"]]
            return self._ok(None, ResizeResult(f["capacity"]))
        if verb == "PARK":
            return self._park(slot, f)
        if verb == "EXPORT":
            data = b"s" * max(min(f["size"], slot.parked_bytes - f["offset"]), 0)
            return self._ok(slot.agent, ExportResult(data, slot.parked_bytes, [], []))
        if verb == "IMPORT":
            if f["offset"] == 0:
                self.slots[f["agent"]] = SlotState(f["agent"], f["path"])
            slot = self.slots[f["agent"]]
            done = f["offset"] + len(f["data"]) >= f["total"]
            if done:
                slot.parked = "ram" if f["total"] else None
                slot.parked_bytes = f["total"]
                slot.n_past = f["total"] // STATE_BYTES_PER_TOKEN
            return self._ok(slot.agent, ImportResult(done=done))
        self._seat(f["agent"], slot.model, f.get("seat"))
        if verb == "CHAT":
            slot.live, slot.parked, slot.parked_bytes = True, None, 0
            slot.n_past += f["max_tokens"] + 5
            return self._ok(f["agent"], ChatResult(content="hi", completion_tokens=2,
                                                   prompt_tokens=5, seed=f["sampling"]["seed"]))
        if verb == "DECODE":
            slot.live, slot.parked, slot.parked_bytes = True, None, 0
            slot.n_past += f["n_predict"] + 1
            return self._ok(f["agent"], DecodeResult(prompt_tokens=1,
                                                     generated_tokens=f["n_predict"],
                                                     text="x" * f["n_predict"]))
        raise AssertionError(f"unexpected job {verb}")

    def _park(self, slot, f):
        size = slot.n_past * STATE_BYTES_PER_TOKEN
        if size and size > f["ram_bytes"] and not f["disk"]:
            err = LmxError(Code.LIMIT, "no room", Reason.PARK_BUDGET, needed=size).fields()
            err.pop("status")
            return Result("error", slot, self.summary(), err)
        where = None if not size else "ram" if size <= f["ram_bytes"] else "disk"
        slot.live, slot.parked, slot.parked_bytes = False, where, size
        self._unseat(slot.agent, f.get("shrink"))
        return self._ok(slot.agent, ParkResult(where, size))

    def _ok(self, agent, out):
        return Result("ok", self.slots.get(agent), self.summary(), out=out.to_wire())


class Harness:
    """A core, a fake worker per device, a fake clock; every reply collected per (identity,
    id). devices > 1: that many local devices of `total` bytes each (or totals, one each);
    jobs of every device wait in one list and each is answered by its device's worker."""

    def __init__(self, total=1000 * MiB, devices=1, totals=None, journal=None, **config):
        config.setdefault("admission_percent", 100)
        config.setdefault("swap_grace_s", 0)          # tests of the burst grace set it
        totals = list(totals or [total] * devices)
        if len(totals) > 1:
            config.setdefault("workers", [WorkerConfig(name=f"local:{i}")
                                          for i in range(len(totals))])
        self.core = Core(BrokerConfig(**config), fake_estimate, MemMeasured(),
                         journal or MemJournal())
        self.workers = []
        for _ in totals:
            self.workers.append(FakeWorker(self.workers[0].pending if self.workers else None))
        self.worker = self.workers[0]
        self.now = 0.0
        self.ids = iter(range(1, 1 << 30))
        self.replies = {}
        self.ledger_trace = []
        for i, size in enumerate(totals):
            self.ready(i, size)

    def ready(self, dev, total, pid=None):
        """Device dev's (new) worker says READY."""
        self.workers[dev].groups.clear()
        return self.feed(WorkerReady(pid or dev + 1, DeviceReading("cpu", "declared", "cpu",
                                                                   total), self.now, dev=dev,
                                     name=f"local:{dev}" if len(self.workers) > 1 else None))

    def feed(self, event):
        for action in self.core.handle(event):
            if isinstance(action, Reply):
                self.replies.setdefault((action.identity, action.msg_id), []).append(
                    action.fields if action.fields is not None else self.core.status_fields())
            elif isinstance(action, SendJob):
                self.worker.pending.append(action)
        led = self.core.ledger
        self.ledger_trace.append((led.allocated_bytes, led.max_bytes))
        return self

    def send(self, verb, client=b"c1", **fields):
        msg_id = next(self.ids)
        self.now += 0.001
        self.feed(ClientRequest(client, msg_id, verb, fields, self.now, self.now))
        return msg_id

    def tick(self, dt=0.0):
        self.now += dt
        return self.feed(Tick(self.now, self.now))

    def run_jobs(self, fail=None, limit=1000):
        """Answer every job the core has sent (and those it sends meanwhile)."""
        for _ in range(limit):
            if not self.worker.pending:
                return
            self.answer(0, fail)
        raise AssertionError("jobs never stopped coming")

    def answer(self, index=0, fail=None):
        job = self.worker.pending.pop(index)
        self.now += 0.001
        self.feed(WorkerResult(job.job_id, self.workers[job.dev].answer(job, fail), self.now,
                               self.now))
        self.feed(Tick(self.now, self.now))   # the heartbeat's role: the worker is alive
        return job

    def final(self, msg_id, client=b"c1"):
        got = [r for r in self.replies.get((client, msg_id), []) if r.get("status") != "partial"]
        assert len(got) <= 1, f"more than one final reply: {got}"
        return got[0] if got else None

    def jobs(self, verb=None):
        return [j for j in self.worker.pending if verb is None or j.verb == verb]

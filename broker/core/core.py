"""The broker's core: every decision, as a pure state machine (events in, actions out).

No sockets, no clock, no threads: ``handle(event)`` takes a typed event (core/events.py) and
returns the actions the server must carry out. Its collaborators are passed in: the estimate
function (reads GGUF metadata), the measured cache and the journal (small files).

Requests that touch an agent (REGISTER, UNREGISTER, DECODE, and the broker's own PARK and
RESTORE) go through that agent's *lane* and are applied one at a time in arrival order, so a
pipelined REGISTER p, UNREGISTER p, REGISTER p behaves as sent, and a DECODE queued behind
another is cancelled or expires here, at once. The worker gets at most one job per agent.
Making room (room.py) is two-phase: a PARK is confirmed by the worker before the bytes it frees
are booked again, so the ledger never goes over its cap.
"""
import itertools

from lmx.broker.core import booking, chatreq, outcomes, recovery, room, views
from lmx.broker.core.devices import DeviceView
from lmx.broker.core.devices import resolve as devices_resolve
from lmx.broker.core.events import (CancelJob, ClientRequest, ClientSlow, Log, Reply, SendJob, Tick,
                                    WorkerHeartbeat, WorkerLost, WorkerProgress, WorkerReady,
                                    WorkerResult, WorkerStarting, WorkerToken)
from lmx.broker.core.quotas import QuotaBook
from lmx.broker.core.state import Lane, Op
from lmx.common import protocol
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError, Reason
from lmx.common.jobs import ChatJob, DecodeJob
from lmx.common.replies import CancelReply, ChatPartial, HelpReply, PartialReply

READ_ONLY = {"STATUS", "LIST", "HELP"}
RUNS = ("DECODE", "CHAT")


class Core:
    """Admission, bookings, lanes, parking, deadlines and recovery for every device."""

    def __init__(self, config, estimate, measured, journal, started=0.0):
        self.config = config
        self.estimate = estimate          # (model, ContextSpec, device kind) -> Estimate
        self.measured, self.journal = measured, journal
        self.started = started            # wall time, for uptime_s
        self.devices = [DeviceView(i, w.name, config.admission_percent)
                        for i, w in enumerate(config.local_workers())]
        self.agents, self.lost = {}, {}
        self.groups = {}                  # gid -> seats.SeatGroup (the workers' contexts)
        self._gids = itertools.count(1)
        self.lanes = {}                   # agent name -> Lane
        self.jobs = {}                    # job id -> the Op waiting for it
        self.quotas = QuotaBook(config.quotas)
        self.counters = {"requests": 0, "errors": 0}
        self.revision = 0                 # bumped on every change STATUS could show
        self.now = self.wall = 0.0
        self._ids = itertools.count(1)
        self._out = []
        self._events = {ClientRequest: self._on_client, WorkerToken: self._on_token,
                        WorkerProgress: lambda ev: booking.on_progress(self, ev),
                        WorkerResult: lambda ev: outcomes.on_result(self, ev),
                        WorkerReady: lambda ev: recovery.on_ready(self, ev),
                        WorkerHeartbeat: lambda ev: recovery.on_heartbeat(self, ev),
                        WorkerLost: lambda ev: recovery.on_lost(self, ev),
                        WorkerStarting: lambda ev: recovery.on_starting(self, ev),
                        ClientSlow: self._on_slow, Tick: self._on_tick}
        self._verbs = {"HELP": self._help, "STATUS": self._status, "LIST": self._list,
                       "REGISTER": self._register, "UNREGISTER": self._unregister,
                       "DECODE": self._decode, "CHAT": self._chat, "CANCEL": self._cancel}
        self._starters = {"REGISTER": lambda op: booking.start_register(self, op),
                          "UNREGISTER": lambda op: booking.start_unregister(self, op),
                          "DECODE": self._start_run, "CHAT": self._start_run}

    # -- the first device (what a single-device broker and its tests look at) ---------------

    @property
    def worker(self):
        return self.devices[0]

    @property
    def ledger(self):
        return self.devices[0].ledger

    @property
    def models(self):
        return self.devices[0].models

    @property
    def room(self):
        """Every op waiting for room, on any device."""
        return [op for dev in self.devices for op in dev.room]

    # -- the one entry point ----------------------------------------------------------------

    def handle(self, event):
        """Apply one event; return the actions to carry out, in order."""
        self._out = []
        self.now = event.now
        self.wall = getattr(event, "wall", self.wall)
        if not (isinstance(event, Tick) or isinstance(event, ClientRequest) and
                event.verb in READ_ONLY):
            self.revision += 1
        try:
            self._events[type(event)](event)
            if type(event) is not WorkerToken:     # a token frees no room: no planning for
                room.pump(self)                     # each of a 100-row step's tokens
        except Exception as exc:  # a bug: say so, and still carry out what was decided
            self.log("exception", f"broker: the core failed on {type(event).__name__}: "
                     f"{exc!r}")
        out, self._out = self._out, []
        return out

    # -- actions ----------------------------------------------------------------------------

    def reply(self, identity, msg_id, fields, status_rev=None):
        """Queue a reply to a client (fields: a record's wire map or error fields)."""
        if identity is None:
            return
        fields.setdefault("status", "ok")
        if fields["status"] == "error":
            self.counters["errors"] += 1
        self._out.append(Reply(identity, msg_id, fields, status_rev))

    def send(self, op, job):
        """Send a job record to the worker of op's device on behalf of op."""
        job_id = next(self._ids)
        op.job_id, op.sent_at = job_id, self.now
        self.jobs[job_id] = op
        self._out.append(SendJob(job_id, job.VERB, job.to_wire(), op.dev))

    def next_gid(self):
        return next(self._gids)

    def emit(self, action):
        self._out.append(action)

    def log(self, level, text):
        self._out.append(Log(level, text))

    # -- clients ----------------------------------------------------------------------------

    def _on_client(self, ev):
        self.counters["requests"] += 1
        try:
            self._verbs[ev.verb](ev)
        except LmxError as err:
            self.reply(ev.identity, ev.msg_id, err.fields())
        except Exception as exc:  # a bug must never kill the loop; the caller gets an answer
            self.log("exception", f"broker: {ev.verb} handler failed: {exc!r}")
            self.reply(ev.identity, ev.msg_id,
                       LmxError(Code.INTERNAL, f"{ev.verb} failed: {exc}").fields())

    def _help(self, ev):
        self.reply(ev.identity, ev.msg_id, HelpReply(list(protocol.PROTOCOL_VERSION),
                                                     protocol.help_text()).to_wire())

    def _status(self, ev):
        self._out.append(Reply(ev.identity, ev.msg_id, None, self.revision))

    def _list(self, ev):
        self.reply(ev.identity, ev.msg_id, views.list_reply(self).to_wire())

    def _register(self, ev):
        f = ev.fields
        spec = ContextSpec.from_fields(f, self.default_spec())
        if spec.n_ctx > self.config.max_n_ctx:
            raise LmxError(Code.BAD_REQUEST, f"n_ctx must be in [64, {self.config.max_n_ctx}]",
                           Reason.BAD_VALUE, field="n_ctx")
        client = self.quotas.client(f.get("key"))
        self._check_depth()
        fields = {"model": f["model"], "spec": spec, "client": client,
                  "progress": bool(f.get("progress"))}
        if f.get("device") is not None:
            fields["device"] = devices_resolve(self, f["device"]).index
        self._enqueue(Op("REGISTER", f["agent"], fields, ev.now, ev.identity, ev.msg_id))

    def _unregister(self, ev):
        self._check_depth()
        self._enqueue(Op("UNREGISTER", ev.fields["agent"], {}, ev.now, ev.identity,
                         ev.msg_id))

    def _decode(self, ev):
        f, cfg = ev.fields, self.config
        if not 1 <= f["n_predict"] <= cfg.max_n_predict:
            raise LmxError(Code.BAD_REQUEST, f"n_predict must be in [1, {cfg.max_n_predict}], "
                           f"got {f['n_predict']}", Reason.BAD_VALUE, field="n_predict")
        if not f["prompt"]:
            raise LmxError(Code.BAD_REQUEST, "prompt is empty", Reason.BAD_VALUE, field="prompt")
        if len(f["prompt"].encode("utf-8", "surrogatepass")) > cfg.max_prompt_bytes:
            raise LmxError(Code.BAD_REQUEST, f"prompt exceeds {cfg.max_prompt_bytes} bytes",
                           Reason.BAD_VALUE, field="prompt")
        deadline_ms = f.get("deadline_ms")
        if deadline_ms is not None and not 1 <= deadline_ms <= 3_600_000:
            raise LmxError(Code.BAD_REQUEST, "deadline_ms must be in [1, 3600000]",
                           Reason.BAD_VALUE, field="deadline_ms")
        self.quotas.client(f.get("key"))        # a wrong key is refused; the agent's counts
        self._check_depth()
        self._enqueue(Op("DECODE", f["agent"], f, ev.now, ev.identity, ev.msg_id,
                         deadline=ev.now + deadline_ms / 1000 if deadline_ms else None))

    def _chat(self, ev):
        f = ev.fields
        fields = chatreq.check_chat(f, self.config.max_n_predict)
        deadline_ms = f.get("deadline_ms")
        if deadline_ms is not None and not 1 <= deadline_ms <= 3_600_000:
            raise chatreq.bad("deadline_ms", "must be in [1, 3600000]")
        self.quotas.client(f.get("key"))        # a wrong key is refused; the agent's counts
        self._check_depth()
        self._enqueue(Op("CHAT", f["agent"], fields, ev.now, ev.identity, ev.msg_id,
                         deadline=ev.now + deadline_ms / 1000 if deadline_ms else None))

    def _cancel(self, ev):
        """CANCEL: drop a DECODE the broker still holds, or stop the one at the worker."""
        agent, request = ev.fields["agent"], ev.fields["request"]
        lane = self.lanes.get(agent)
        ops = ([lane.active] if lane and lane.active else []) + list(lane.queue if lane else ())
        # Any client may cancel (README's threat model); its own request first on a tie.
        found = sorted((o for o in ops if o.verb in RUNS and o.msg_id == request),
                       key=lambda o: o.identity != ev.identity)
        op = found[0] if found else None
        if op is None:
            raise LmxError(Code.UNKNOWN_REQUEST, f"no DECODE or CHAT {request!r} of agent "
                           f"{agent!r} is queued or running")
        if op.job_id is not None:
            self.emit_cancel(op)
            where = "sent"
        else:
            self.drop(op, LmxError(Code.CANCELLED, "cancelled before it started"))
            where = "queued"
        self.reply(ev.identity, ev.msg_id, CancelReply(agent, request, where).to_wire())

    def emit_cancel(self, op):
        self.emit(CancelJob(op.job_id, op.dev))

    def _check_depth(self):
        """BUSY when the requests held here (not yet at the worker) reach --queue-depth."""
        if not any(d.state == "ready" for d in self.devices):
            state = self.devices[0].state if len(self.devices) == 1 else "not ready"
            raise LmxError(Code.WORKER_UNAVAILABLE, f"worker is {state}; try again")
        held = self.queue_depth()
        if held >= self.config.queue_depth:
            raise LmxError(Code.BUSY, f"request queue is full ({held} waiting)",
                           queue_depth=held, max_queue_depth=self.config.queue_depth)

    def queue_depth(self):
        """Requests accepted but not yet sent to the worker (the one formula for BUSY)."""
        queued = sum(len(lane.queue) for lane in self.lanes.values())
        return queued + sum(1 for dev in self.devices for op in dev.room if not op.internal)

    # -- lanes ------------------------------------------------------------------------------

    def _enqueue(self, op):
        self.lanes.setdefault(op.agent, Lane()).queue.append(op)
        self.advance(op.agent)

    def advance(self, name):
        """Start the agent's next op while its lane is free."""
        lane = self.lanes.get(name)
        while lane is not None and lane.active is None and lane.queue:
            op = lane.active = lane.queue.popleft()
            try:
                self._starters[op.verb](op)
            except LmxError as err:
                lane.active = None
                self.reply(op.identity, op.msg_id, err.fields())
            except Exception as exc:  # a bug: answer it and free the lane, never wedge it
                lane.active = None
                self.log("exception", f"broker: starting {op.verb} of {op.agent} failed: "
                         f"{exc!r}")
                self.reply(op.identity, op.msg_id, LmxError(
                    Code.INTERNAL, f"{op.verb} failed: {exc}").fields())
        if lane is not None and lane.idle:
            del self.lanes[name]

    def end(self, op, fields):
        """op is done: answer its client (fields None: nothing to say), free its lane."""
        if fields is not None:
            self.reply(op.identity, op.msg_id, fields)
        lane = self.lanes.get(op.agent)
        if lane is not None and lane.active is op:
            lane.active = None
            self.advance(op.agent)

    def drop(self, op, err):
        """Remove an op that has not reached the worker and answer it with err."""
        err.details.setdefault("agent", op.agent)
        lane = self.lanes.get(op.agent)
        if lane is not None and op in lane.queue:
            lane.queue.remove(op)
            self.reply(op.identity, op.msg_id, err.fields())
            if lane.idle:
                del self.lanes[op.agent]
            return
        room.abandon(self, op)
        self.end(op, err.fields())

    def lane_idle(self, name):
        lane = self.lanes.get(name)
        return lane is None or lane.idle

    # -- DECODE and CHAT -------------------------------------------------------------------

    def _start_run(self, op):
        rec = self.agent(op.agent)
        self.quotas.check_run(rec.client, self.now)
        dev = self.need_device(rec.dev)
        op.dev = rec.dev
        dev.last_runs.append((self.now, op))     # a burst of requests holds swaps (room.py)
        if rec.live and not room.blocks(dev) and not room.over_live_limit(self, dev):
            self.launch_run(op)
        else:
            dev.room.append(op)             # room.pump makes it live, in arrival order

    def launch_run(self, op):
        """Send a DECODE or CHAT whose agent is live."""
        rec, f = self.agents[op.agent], op.fields
        rec.last_used = self.now
        left = None if op.deadline is None else max(1, int((op.deadline - self.now) * 1000))
        if op.verb == "CHAT":
            job = ChatJob(op.agent, template=self.config.chat_templates.get(rec.path),
                          deadline_ms=left, max_prompt_tokens=self.config.max_prompt_tokens,
                          seat=op.seat, **f)
        else:
            job = DecodeJob(op.agent, f["prompt"], f["n_predict"],
                            self.config.max_prompt_tokens, bool(f.get("stream")), left,
                            op.seat)
        self.send(op, job)

    def _on_token(self, ev):
        op = self.jobs.get(ev.job_id)
        if op is not None:
            self.devices[op.dev].last_seen = ev.now
        if op is not None and op.fields.get("stream") and not op.slow:
            record = ChatPartial(op.agent, ev.index, ev.text) if op.verb == "CHAT" else \
                PartialReply(op.agent, ev.index, ev.token, ev.text)
            fields = record.to_wire()
            self.reply(op.identity, op.msg_id, dict(fields, status="partial"))

    def _on_slow(self, ev):
        """A client's replies piled up: stop its streams (their final replies still come)."""
        for op in list(self.jobs.values()):
            if op.identity == ev.identity and op.fields.get("stream") and not op.slow:
                op.slow = True
                self.emit_cancel(op)
                self.log("warning", f"broker: client reads too slowly; stopping the stream of "
                         f"agent={op.agent} request={op.msg_id!r}")

    def _on_tick(self, ev):
        """Deadlines of requests still held here, and the worker's liveness."""
        late = [op for lane in self.lanes.values() for op in
                ([lane.active] if lane.active and lane.active.job_id is None else [])
                + list(lane.queue)
                if op.deadline is not None and op.deadline <= ev.now and not op.internal]
        for op in late:
            self.revision += 1
            self.drop(op, LmxError(Code.DEADLINE, "the deadline passed while the request was "
                                   "queued"))
        recovery.check_liveness(self, ev.now)

    # -- lookups ----------------------------------------------------------------------------

    def agent(self, name):
        """The registered agent, or UNKNOWN_AGENT / AGENT_LOST."""
        rec = self.agents.get(name)
        if rec is None and name in self.lost:
            raise LmxError(Code.AGENT_LOST, f"agent {name!r} was registered but could not be "
                           f"restored after a restart: {self.lost[name]}")
        if rec is None or rec.state == "leaving":
            raise LmxError(Code.UNKNOWN_AGENT, f"no agent {name!r} is registered")
        return rec

    def need_device(self, index):
        """The device, or WORKER_UNAVAILABLE while its worker is not ready."""
        dev = self.devices[index]
        if dev.state != "ready":
            where = f" on device {index} ({dev.name})" if len(self.devices) > 1 else ""
            raise LmxError(Code.WORKER_UNAVAILABLE, f"worker{where} is {dev.state}; try again")
        return dev

    def default_spec(self):
        kind = next((d.kind for d in self.devices if d.state == "ready"), "cpu")
        return ContextSpec(n_ctx=self.config.default_n_ctx,
                           n_gpu_layers=-1 if kind == "cuda" else 0)

    def ledger_numbers(self, index=0):
        led = self.devices[index].ledger
        return {"ledger_max_bytes": led.max_bytes, "ledger_allocated_bytes": led.allocated_bytes}

    def status_fields(self):
        """STATUS's record as a map (the server packs it once per revision)."""
        return views.status_reply(self).to_wire()

    def status_dynamic(self):
        """STATUS's fields that change without an event: uptime, counters, quota use."""
        return dict(uptime_s=round(self.wall - self.started, 1), **self.counters,
                    quotas=self.quotas.view(self, self.now))

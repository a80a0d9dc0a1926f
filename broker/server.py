"""The broker: one loop over a client ROUTER and a worker ROUTER.

REGISTER books before it builds: estimate -> ledger.try_reserve -> worker acquires the model
and creates the slot -> commit. Any failure after the reservation releases it, so the ledger,
the registry and the worker's refcounts end exactly as they were.
"""
import logging
import os
import time
from dataclasses import dataclass, field

import zmq

from lmx.broker import access
from lmx.broker.estimate import estimate
from lmx.broker.estimator import CUDA_OVERHEAD
from lmx.broker.journal import Journal
from lmx.broker.ledger import Ledger
from lmx.broker.measured import MeasuredCache, with_margin
from lmx.broker.workerlink import WorkerLink, is_alive
from lmx.common import config as cfg
from lmx.common import protocol
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError, Reason
from lmx.common.sockets import make_socket

log = logging.getLogger("lmx.broker")
VERSION = "0.1.0"


@dataclass
class BrokerConfig:
    """Everything the broker is started with (lmx-broker's options)."""

    endpoint: str = cfg.DEFAULT_ENDPOINT
    worker_endpoint: str = ""
    table: dict = field(default_factory=dict)
    vram_total: int = None             # declared size; None: NVML on a GPU, else 8 GiB
    admission_percent: int = cfg.DEFAULT_ADMISSION_PERCENT
    spawn_worker: bool = True
    worker_args: tuple = ()
    worker_start_timeout: float = 120.0
    worker_overhead: int = None        # None: 640 MiB on CUDA, 0 on CPU
    heartbeat_s: float = cfg.DEFAULT_HEARTBEAT_S
    liveness: int = cfg.DEFAULT_LIVENESS
    queue_depth: int = cfg.DEFAULT_QUEUE_DEPTH
    max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES
    default_n_ctx: int = cfg.DEFAULT_N_CTX
    max_n_ctx: int = cfg.MAX_N_CTX
    max_n_predict: int = cfg.MAX_N_PREDICT
    max_prompt_bytes: int = cfg.MAX_PROMPT_BYTES
    state_dir: str = ""                # measured.json lives here ("" keeps it in memory)
    model_dirs: tuple = ()             # REGISTER paths must lie under one of these
    max_prompt_tokens: int = cfg.DEFAULT_MAX_PROMPT_TOKENS
    max_agents_per_client: int = cfg.DEFAULT_MAX_AGENTS_PER_CLIENT
    curve_secret_key: str = None       # tcp endpoints: the server's zmq.auth secret key file
    curve_clients: str = None          # ... and the folder of allowed clients' public keys
    park_to_disk: bool = True          # parked state also on disk (state_dir/parked)
    measure_margin_percent: int = 5    # booking after reconciliation = measured + this
    others_margin: int = 256 << 20     # kept free below what other processes hold


@dataclass
class Agent:
    """One registered agent as the broker books it (its context; the weights are the model's)."""

    agent: str
    model: str
    path: str
    n_ctx: int
    booked_bytes: int
    source: str
    spec: dict = field(default_factory=dict)
    owner: bytes = b""                  # the client identity that registered it
    estimated_bytes: int = None
    measured_bytes: int = None
    state: str = "registering"          # registering -> ready -> leaving
    registered_at: float = field(default_factory=time.time)
    last_active: float = None
    decodes: int = 0
    generated_tokens: int = 0
    context_reset: bool = False         # tell the next DECODE its conversation was lost


@dataclass
class ModelBooking:
    """A model's weights, booked once while any agent uses it."""

    path: str
    fingerprint: str
    booked_bytes: int
    estimated_bytes: int
    source: str
    agents: set = field(default_factory=set)
    measured_bytes: int = None




def refuse_if_served(endpoint):
    """Binding an ipc path silently takes it over: refuse if a broker still answers there."""
    if not endpoint.startswith("ipc://") or not os.path.exists(endpoint[len("ipc://"):]):
        return
    from lmx.common.client import Client, LmxTimeout
    try:
        with Client(endpoint, timeout=1.0) as probe:
            pid = probe.request("STATUS").get("worker_pid")
    except (LmxTimeout, LmxError):
        return                      # a stale socket file: nobody home
    raise RuntimeError(f"another lmx broker (worker pid {pid}) is serving {endpoint}")


class Broker:
    """Admission accounting, the agent registry and the request queue."""

    def __init__(self, config, ctx=None):
        self.config = config
        self.ctx = ctx or zmq.Context()
        self.ledger = Ledger(None, config.admission_percent)
        self.agents = {}
        self.models = {}
        self.measured = MeasuredCache(os.path.join(config.state_dir, "measured.json")
                                      if config.state_dir else "")
        self.journal = Journal(os.path.join(config.state_dir, "journal.json")
                               if config.state_dir else "")
        self.lost = {}                      # agent -> why it could not be restored
        self.client = None
        self.wsock = make_socket(self.ctx, zmq.ROUTER, config.worker_endpoint, bind=True)
        self.worker = WorkerLink(self.wsock, config.heartbeat_s, config.liveness,
                                 config.queue_depth)
        self.started = time.time()
        self.stop = False
        self.counters = {"requests": 0, "errors": 0}
        self.handlers = {"HELP": self.on_help, "STATUS": self.on_status, "LIST": self.on_list,
                         "REGISTER": self.on_register, "UNREGISTER": self.on_unregister,
                         "DECODE": self.on_decode}
        self._backoff = 1.0
        self._respawn_at = None
        self.auth = None

    # -- start-up and the loop ----------------------------------------------------------

    def start(self):
        """Start (or wait for) the worker, learn the device size, then bind the client side."""
        if self.config.spawn_worker:
            self.worker.spawn(self.config.worker_endpoint, self.config.worker_args)
        deadline = time.monotonic() + self.config.worker_start_timeout
        while self.worker.state != "ready":
            if self.stop:
                raise RuntimeError("stopped before the worker was ready")
            if self.worker.process_exited():
                raise RuntimeError(f"worker exited with {self.worker.proc.returncode} "
                                   "before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no worker READY on {self.config.worker_endpoint} within "
                                   f"{self.config.worker_start_timeout:g} s")
            if self.wsock.poll(200):
                self._on_worker(self.wsock.recv_multipart())
        self._adopt_device()
        self._replay_journal()
        refuse_if_served(self.config.endpoint)
        access.prepare_ipc(self.config.endpoint)
        self.client = make_socket(self.ctx, zmq.ROUTER, self.config.endpoint, bind=True,
                                  setup=self._secure)
        access.lock_down_ipc(self.config.endpoint)
        log.info("broker: serving %s (cap %s of %s)", self.config.endpoint,
                 cfg.format_size(self.ledger.max_bytes),
                 cfg.format_size(self.ledger.total_bytes))

    def _secure(self, sock):
        """CURVE for tcp endpoints (refuses to start without keys); nothing for ipc."""
        self.auth = access.secure_tcp(self.ctx, sock, self.config.endpoint,
                                      self.config.curve_secret_key, self.config.curve_clients)

    def _adopt_device(self):
        """Set the ledger's total from the worker (NVML, or the declared size on CPU)."""
        dev = self.worker.device
        self.ledger.set_total(dev["total_bytes"])
        overhead = self.config.worker_overhead
        if overhead is None:
            overhead = CUDA_OVERHEAD if dev.get("kind") == "cuda" else 0
        if overhead:
            self.ledger.force("worker:overhead", overhead)
        self._overhead_estimated = self.config.worker_overhead is None
        self._read_external(dev)

    def _read_external(self, dev):
        """Memory other processes hold on the device lowers the cap (never evicts anyone)."""
        used, own = dev.get("used_bytes"), dev.get("process_bytes")
        if used is not None:
            self.ledger.set_external(used - (own or 0), self.config.others_margin)

    def run(self):
        """Serve until stop is set (by a signal handler or a test)."""
        poller = zmq.Poller()
        poller.register(self.client, zmq.POLLIN)
        poller.register(self.wsock, zmq.POLLIN)
        next_beat = time.monotonic()
        while not self.stop:
            events = dict(poller.poll(int(self.config.heartbeat_s * 1000 / 2)))
            if self.wsock in events:
                self._drain(self.wsock, self._on_worker)
            if self.client in events:
                self._drain(self.client, self._on_client)
            now = time.monotonic()
            if now >= next_beat:
                self.worker.heartbeat()
                next_beat = now + self.config.heartbeat_s
            self._check_worker(now)
        self.close()

    @staticmethod
    def _drain(sock, handler, limit=256):
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    def close(self):
        """Stop the worker and close the sockets."""
        self.worker.stop()
        if self.client is not None:
            self.client.close()
        if self.auth is not None:
            self.auth.stop()
        self.wsock.close()

    # -- clients ------------------------------------------------------------------------

    def _send(self, identity, msg_id, fields):
        """Every reply to a client goes through here."""
        if fields.get("status", "ok") != "ok":
            self.counters["errors"] += 1
        self.client.send_multipart([identity, *protocol.encode_reply(msg_id, **fields)])

    def _on_client(self, frames):
        identity, body = frames[0], frames[1:]
        self.counters["requests"] += 1
        try:
            msg = protocol.decode_message(body, protocol.CLIENT_VERBS,
                                          self.config.max_frame_bytes)
        except LmxError as err:
            log.warning("protocol: %s", err)
            self._send(identity, err.msg_id, err.fields())
            return
        try:
            reply = self.handlers[msg.verb](identity, msg)
        except LmxError as err:
            reply = err.fields()
        except Exception as exc:  # a handler bug must never kill the loop
            log.exception("broker: %s handler failed", msg.verb)
            reply = LmxError(Code.INTERNAL, f"{msg.verb} failed: {exc}").fields()
        if reply is not None:
            self._send(identity, msg.id, reply)

    def on_help(self, _identity, _msg):
        """HELP: the verbs and their fields."""
        return {"protocol": list(protocol.PROTOCOL_VERSION), "verbs": protocol.help_text()}

    def on_register(self, identity, msg):
        """REGISTER: estimate, reserve, then ask the worker to build; reply when it has."""
        agent, model = msg.fields["agent"], msg.fields["model"]
        self._check_agent_id(agent)
        spec = ContextSpec.from_fields(msg.fields, self._default_spec())
        if spec.n_ctx > self.config.max_n_ctx:
            raise LmxError(Code.BAD_REQUEST, f"n_ctx must be in [64, {self.config.max_n_ctx}]",
                           Reason.BAD_VALUE, field="n_ctx")
        if agent in self.agents:
            raise LmxError(Code.AGENT_EXISTS, f"agent {agent!r} is already registered")
        owned = sum(1 for a in self.agents.values() if a.owner == identity)
        if owned >= self.config.max_agents_per_client:
            raise LmxError(Code.LIMIT, f"this client already has {owned} agents (the limit)",
                           Reason.AGENTS_PER_CLIENT, limit=self.config.max_agents_per_client)
        self._check_queue()
        device = self.worker.device.get("kind", "cpu")
        est = estimate(model, spec, self.config.table, device, self.measured,
                       model_dirs=self.config.model_dirs)
        rec, mrec = self._book(agent, model, est, spec, identity)

        def done(result):
            if result.get("status") == "ok":
                rec.state = "ready"
                self.journal.put(agent, {"model": model, "path": est.path, "spec": rec.spec})
                self.lost.pop(agent, None)
                if result.get("model_loaded"):
                    self._reconcile_model(mrec, result.get("model_measured") or {}, spec)
                result.update(agent=agent, path=est.path, n_ctx=spec.n_ctx,
                              booked_bytes=rec.booked_bytes, estimate_source=rec.source,
                              model_booked_bytes=mrec.booked_bytes,
                              weights_source=mrec.source, estimate=est.estimated)
            else:
                self._unbook(agent, "register failed")
            self._send(identity, msg.id, dict(result, **self._ledger_numbers()))

        self._submit("REGISTER", {"agent": agent, "path": est.path, "spec": spec.as_dict()},
                     done, on_error=lambda: self._unbook(agent, "register not queued"))
        return None

    def _book(self, agent, model, est, spec, identity, state="registering"):
        """Reserve the agent's context (and its model's weights if not yet booked) atomically,
        then record both; raise VRAM_LEDGER_DENY with the numbers if they do not fit."""
        mrec = self.models.get(est.path)
        want = {f"agent:{agent}": est.context}
        if mrec is None:
            want[f"model:{est.path}"] = est.weights
        denial = self.ledger.try_reserve_many(want)
        if denial is not None:
            log.info("admission: denied agent=%s requested=%d allocated=%d max=%d reason=%s",
                     agent, denial.requested_bytes, denial.ledger_allocated_bytes,
                     denial.ledger_max_bytes, denial.reason)
            raise denial.error(f"agent {agent!r} on {model}")
        if mrec is None:
            mrec = self.models[est.path] = ModelBooking(
                est.path, est.fingerprint, est.weights,
                est.estimated.get("weights_device", est.weights), est.weights_source)
        mrec.agents.add(agent)
        rec = self.agents[agent] = Agent(agent, model, est.path, spec.n_ctx, est.context,
                                         est.context_source, spec.as_dict(), identity,
                                         est.estimated.get("context_device", est.context),
                                         state=state)
        log.info("admission: reserved agent=%s context=%d (%s) weights=%s (%s)", agent,
                 est.context, est.context_source,
                 est.weights if f"model:{est.path}" in want else "shared", est.weights_source)
        return rec, mrec

    def _default_spec(self):
        cuda = self.worker.device.get("kind") == "cuda"
        return ContextSpec(n_ctx=self.config.default_n_ctx, n_gpu_layers=-1 if cuda else 0)

    def _reconcile_model(self, mrec, measured, spec):
        """Book the model's measured weights (+ margin), unless the operator table set them."""
        nbytes = max(measured.get("device_bytes") or 0, measured.get("nvml_delta") or 0)
        if not nbytes:
            return
        mrec.measured_bytes = nbytes
        device = self.worker.device.get("kind", "cpu")
        self.measured.store_weights(mrec.fingerprint, device, ContextSpec(
            n_gpu_layers=spec.n_gpu_layers), with_margin(nbytes, self.config.
                                                         measure_margin_percent))
        self._rebook(f"model:{mrec.path}", mrec, nbytes, keep=mrec.source == "table")

    def _reconcile_overhead(self, engine):
        """The worker's own device bytes (CUDA context, cuBLAS, pools): NVML's reading of the
        process minus the buffers llama.cpp reported. Raised when it grows, never lowered."""
        process, known = engine.get("process_bytes"), engine.get("known_device_bytes")
        if process is None or known is None or self.config.worker_overhead is not None:
            return
        booked = with_margin(max(process - known, 0), self.config.measure_margin_percent)
        current = self.ledger.booked("worker:overhead") or 0
        if booked > current or self._overhead_estimated:
            log.info("reconcile: worker:overhead booked=%d measured=%d (process %d - buffers %d)",
                     booked, process - known, process, known)
            self.ledger.force("worker:overhead", booked)
            self._overhead_estimated = False

    def _reconcile_context(self, rec, measured):
        """Book an agent's measured context (+ margin) and remember it for the next REGISTER."""
        nbytes = max(measured.get("device_bytes") or 0, measured.get("nvml_delta") or 0)
        if not nbytes or rec.agent not in self.agents:
            return
        rec.measured_bytes = nbytes
        mrec = self.models.get(rec.path)
        self.measured.store_context(mrec.fingerprint if mrec else "", self.worker.device.get(
            "kind", "cpu"), ContextSpec(**rec.spec), with_margin(
            nbytes, self.config.measure_margin_percent))
        self._rebook(f"agent:{rec.agent}", rec, nbytes)

    def _rebook(self, key, rec, measured, keep=False):
        booked = with_margin(measured, self.config.measure_margin_percent)
        est = rec.estimated_bytes or 0
        log.info("reconcile: %s estimated=%d measured=%d (%+.1f%%) booked=%d%s", key, est,
                 measured, 100.0 * (est - measured) / measured, rec.booked_bytes if keep
                 else booked, " (operator table kept)" if keep else "")
        if not keep and self.ledger.booked(key) is not None:
            self.ledger.force(key, booked)
            rec.booked_bytes = booked

    def on_unregister(self, identity, msg):
        """UNREGISTER: free the worker's slot, then release the agent's bytes."""
        rec = self._agent(msg.fields["agent"])
        prior, rec.state = rec.state, "leaving"

        def done(result):
            gone = result.get("status") == "ok" or result.get("code") in (
                Code.UNKNOWN_AGENT, Code.WORKER_LOST)
            if gone:
                freed = self._unbook(rec.agent, "unregistered")
                result = dict(result, status="ok", agent=rec.agent, released_bytes=freed)
            else:
                rec.state = prior
            self._send(identity, msg.id, dict(result, **self._ledger_numbers()))

        self._submit("UNREGISTER", {"agent": rec.agent}, done,
                     on_error=lambda: setattr(rec, "state", prior))
        return None

    def on_decode(self, identity, msg):
        """DECODE: validate, queue for the worker, and forward its result."""
        rec = self._agent(msg.fields["agent"])
        prompt, n_predict = msg.fields["prompt"], msg.fields["n_predict"]
        if not 1 <= n_predict <= self.config.max_n_predict:
            raise LmxError(Code.BAD_REQUEST, f"n_predict must be in [1, "
                           f"{self.config.max_n_predict}], got {n_predict}", Reason.BAD_VALUE,
                           field="n_predict")
        if not prompt:
            raise LmxError(Code.BAD_REQUEST, "prompt is empty", Reason.BAD_VALUE, field="prompt")
        if len(prompt.encode("utf-8", "surrogatepass")) > self.config.max_prompt_bytes:
            raise LmxError(Code.BAD_REQUEST, f"prompt exceeds {self.config.max_prompt_bytes} "
                           "bytes", Reason.BAD_VALUE, field="prompt")
        t0 = time.monotonic()

        def done(result):
            if result.get("context_measured"):
                self._reconcile_context(rec, result["context_measured"])
            if result.get("status") == "ok":
                rec.decodes += 1
                rec.generated_tokens += result.get("generated_tokens", 0)
                rec.last_active = time.time()
            result = dict(result, agent=rec.agent, broker_ms=round(
                (time.monotonic() - t0) * 1000, 2))
            if rec.context_reset and result.get("status") == "ok":
                result["context_reset"] = True      # said once, on the first reply after it
                rec.context_reset = False
            self._send(identity, msg.id, result)

        self._submit("DECODE", {"agent": rec.agent, "prompt": prompt, "n_predict": n_predict,
                                "max_prompt_tokens": self.config.max_prompt_tokens}, done)
        return None

    def on_status(self, _identity, _msg):
        """STATUS: ledger, device, worker, queue and counters."""
        dev, wk = self.worker.device, self.worker
        return {"version": VERSION, "protocol": list(protocol.PROTOCOL_VERSION),
                "endpoint": self.config.endpoint, "uptime_s": round(time.time() - self.started, 1),
                **self._ledger_numbers(), "admission_percent": self.ledger.admission_percent,
                "ledger_percent_cap_bytes": self.ledger.percent_cap,
                "external_bytes": self.ledger.external_bytes,
                "bookings": self.ledger.snapshot()["bookings"],
                "device_kind": dev.get("kind"), "device_name": dev.get("name"),
                "device_source": dev.get("source"),
                "device_total_bytes": dev.get("total_bytes"),
                "device_used_bytes": dev.get("used_bytes"),
                "device_free_bytes": dev.get("free_bytes"),
                "worker_pid": wk.pid, "worker_state": wk.state, "worker_restarts": wk.restarts,
                "worker_process_bytes": dev.get("process_bytes"),
                "streaming_available": (dev.get("streaming") or {}).get("available", False),
                "streaming_reason": (dev.get("streaming") or {}).get("reason"),
                "live_agent": wk.engine.get("live_agent"),
                "models": self._models(), "agents": len(self.agents),
                "queue_depth": len(wk.queue), "inflight": wk.inflight is not None,
                **self.counters}

    def on_list(self, _identity, _msg):
        """LIST: every agent with its booking and state."""
        slots = self.worker.engine.get("slots", {})
        keys = (("live", False), ("parked_bytes", 0), ("parked_pinned", False), ("n_past", 0))
        return {"agents": [dict(vars(a), owner=a.owner.hex(),
                                **{k: slots.get(a.agent, {}).get(k, d) for k, d in keys})
                           for a in self.agents.values()]}

    # -- helpers ------------------------------------------------------------------------

    def _ledger_numbers(self):
        return {"ledger_max_bytes": self.ledger.max_bytes,
                "ledger_allocated_bytes": self.ledger.allocated_bytes}

    def _models(self):
        refs = self.worker.engine.get("models", {})
        out = []
        for path, m in sorted(self.models.items()):
            ctx = [self.agents[a] for a in m.agents if a in self.agents]
            out.append({"path": path, "agents": len(m.agents), "booked_bytes": m.booked_bytes,
                        "estimated_bytes": m.estimated_bytes, "measured_bytes": m.measured_bytes,
                        "source": m.source,
                        "context_booked_bytes": sum(a.booked_bytes for a in ctx),
                        "worker_refs": refs.get(path, {}).get("refs", 0)})
        for path, info in refs.items():
            if path not in self.models:      # held by the worker but booked by nobody: a bug
                out.append({"path": path, "agents": 0, "booked_bytes": 0,
                            "worker_refs": info.get("refs", 0)})
        return out

    def _check_agent_id(self, agent):
        if not cfg.AGENT_ID_RE.match(agent):
            raise LmxError(Code.BAD_REQUEST, "agent id must be 1-64 chars of letters, digits "
                           "and _.:- (starting with a letter or digit)", Reason.BAD_VALUE,
                           field="agent")

    def _check_queue(self):
        if self.worker.state != "ready":
            raise LmxError(Code.WORKER_UNAVAILABLE, f"worker is {self.worker.state}")
        if len(self.worker.queue) >= self.config.queue_depth:
            raise LmxError(Code.BUSY, "request queue is full", queue_depth=len(
                self.worker.queue), max_queue_depth=self.config.queue_depth)

    def _agent(self, agent):
        rec = self.agents.get(agent)
        if rec is None and agent in self.lost:
            raise LmxError(Code.AGENT_LOST, f"agent {agent!r} was registered but could not be "
                           f"restored after a restart: {self.lost[agent]}")
        if rec is None or rec.state == "leaving":
            raise LmxError(Code.UNKNOWN_AGENT, f"no agent {agent!r} is registered")
        return rec

    def _unbook(self, agent, why):
        """Drop an agent's context booking, and its model's when it was the last user."""
        rec = self.agents.pop(agent, None)
        freed = self.ledger.release(f"agent:{agent}")
        mrec = self.models.get(rec.path) if rec else None
        if mrec is not None:
            mrec.agents.discard(agent)
            if not mrec.agents:
                freed += self.ledger.release(f"model:{mrec.path}")
                del self.models[mrec.path]
        self.journal.drop(agent)
        log.info("admission: released agent=%s bytes=%d (%s)", agent, freed, why)
        return freed

    def _submit(self, verb, fields, done, on_error=None):
        try:
            self.worker.submit(verb, fields, done, time.monotonic())
        except LmxError:
            if on_error:
                on_error()
            raise

    # -- worker -------------------------------------------------------------------------

    def _on_worker(self, frames):
        identity, body = frames[0], frames[1:]
        try:
            msg = protocol.decode_message(body, protocol.WORKER_EVENTS, max_bytes=None)
        except LmxError as err:
            log.error("worker: bad frame: %s", err)
            return
        was_ready = self.worker.state == "ready"
        finished = self.worker.on_message(identity, msg, time.monotonic())
        if msg.verb == "HEARTBEAT" and msg.fields.get("device"):
            self._read_external(msg.fields["device"])
        if msg.verb == "READY" and self.worker.state == "ready" and not was_ready:
            self._adopt_device()
            self._backoff = 1.0
            self._restore_agents()
        if finished is not None:
            job, result = finished
            job.done(result)
            self._reconcile_overhead(self.worker.engine)
        self.worker.pump(time.monotonic())

    def _check_worker(self, now):
        wk = self.worker
        if wk.state == "ready":
            dead = wk.process_exited() or not is_alive(wk.last_seen, now, wk.heartbeat_s,
                                                       wk.liveness)
            if dead:
                exited = wk.process_exited()
                if not exited and wk.proc is not None:
                    wk.proc.kill()          # hung, not dead: it must not keep the GPU memory
                    wk.proc.wait()
                self._worker_lost("exited" if exited else "heartbeats stopped")
        elif wk.state == "lost" and self.config.spawn_worker and now >= self._respawn_at:
            wk.restarts += 1
            wk.spawn(self.config.worker_endpoint, self.config.worker_args)
        elif wk.state == "starting" and wk.process_exited():
            self._worker_lost("exited while starting")

    def _worker_lost(self, why):
        """Fail every unfinished job with WORKER_LOST; keep the agents and their bookings, to
        be rebuilt on the next worker (from their state on disk where it was parked)."""
        err = LmxError(Code.WORKER_LOST, f"the worker died ({why}) with this request in flight")
        for job in self.worker.fail_all(why):
            job.done(err.fields())
        for rec in self.agents.values():
            rec.state = "restoring"
        self._respawn_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 32.0)

    # -- recovery -----------------------------------------------------------------------

    def _replay_journal(self):
        """After a broker restart: book and rebuild every agent the journal remembers."""
        for agent, entry in list(self.journal.agents.items()):
            if agent in self.agents:
                continue
            try:
                spec = ContextSpec(**entry["spec"])
                est = estimate(entry["model"], spec, self.config.table,
                               self.worker.device.get("kind", "cpu"), self.measured,
                               model_dirs=self.config.model_dirs)
                self._book(agent, entry["model"], est, spec, b"", state="restoring")
            except (LmxError, TypeError, KeyError) as exc:
                self._mark_lost(agent, f"journal replay: {exc}")
        self._restore_agents()

    def _restore_agents(self):
        """Ask the (new) worker to rebuild every agent marked restoring, resuming from disk."""
        for rec in [r for r in self.agents.values() if r.state == "restoring"]:
            def done(result, rec=rec):
                if result.get("status") == "ok":
                    rec.state = "ready"
                    rec.context_reset = not result.get("resumed")
                    log.info("recovery: agent=%s %s", rec.agent, "resumed from disk"
                             if result.get("resumed") else "rebuilt; its context was reset")
                else:
                    self._mark_lost(rec.agent, result.get("message", "restore failed"))
            self.worker.submit("REGISTER", {"agent": rec.agent, "path": rec.path,
                                            "spec": rec.spec, "resume": True}, done,
                               time.monotonic())

    def _mark_lost(self, agent, why):
        """An agent that was registered and cannot be restored: say so, never silently."""
        if agent in self.agents:
            self._unbook(agent, f"lost: {why}")
        self.journal.drop(agent)
        self.lost[agent] = why
        log.error("recovery: agent=%s lost: %s", agent, why)

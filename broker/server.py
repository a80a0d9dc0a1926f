"""The broker: one loop over a client ROUTER and a worker ROUTER.

This module holds the loop, start-up and the sockets; the handlers live in mixins:
admission.py (REGISTER/UNREGISTER/DECODE: book before build, unwind, reconcile),
recovery.py (worker liveness, restarts, journal replay) and views.py (HELP/STATUS/LIST).
"""
import logging
import os
import time
from dataclasses import dataclass, field

import zmq

from lmx.broker import access
from lmx.broker.admission import AdmissionMixin
from lmx.broker.estimator import CUDA_OVERHEAD
from lmx.broker.journal import Journal
from lmx.broker.liveset import LiveSetMixin
from lmx.broker.ledger import Ledger
from lmx.broker.measured import MeasuredCache
from lmx.broker.recovery import RecoveryMixin
from lmx.broker.views import ViewsMixin
from lmx.broker.workerlink import WorkerLink
from lmx.common import config as cfg
from lmx.common import protocol
from lmx.common.errors import Code, LmxError
from lmx.common.sockets import make_socket

log = logging.getLogger("lmx.broker")
READ_ONLY = {"STATUS", "LIST", "HELP"}      # verbs that change nothing STATUS shows


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
    max_live_contexts: int = 0         # 0: as many as the ledger allows
    admit_by_parking: bool = False     # REGISTER may park idle agents to make room
    measure_margin_percent: int = 5    # booking after reconciliation = measured + this
    others_margin: int = 256 << 20     # kept free below what other processes hold


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


class Broker(AdmissionMixin, LiveSetMixin, RecoveryMixin, ViewsMixin):
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
                         "DECODE": self.on_decode, "CANCEL": self.on_cancel}
        self.requests = {}                  # (agent, request id) -> the DECODE's Job
        self._status_cache = None           # STATUS packed once per state change
        self._backoff = 1.0
        self._respawn_at = None
        self.auth = None
        self._init_liveset()

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
            # The worker creates its CUDA context before READY, so its NVML reading is the
            # overhead; cuBLAS and pools grow later and are reconciled upwards.
            overhead = CUDA_OVERHEAD if dev.get("kind") == "cuda" else 0
            if dev.get("kind") == "cuda" and dev.get("process_bytes"):
                overhead = max(dev["process_bytes"], overhead)
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
            for job in self.worker.expire(now):
                self._status_cache = None
                job.done(LmxError(Code.DEADLINE, "the deadline passed while the request was "
                                  "queued").fields())
            self._expire_waiting(now)
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
        if fields.get("status") == "error":
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
        if msg.verb not in READ_ONLY:
            self._status_cache = None
        try:
            reply = self.handlers[msg.verb](identity, msg)
        except LmxError as err:
            reply = err.fields()
        except Exception as exc:  # a handler bug must never kill the loop
            log.exception("broker: %s handler failed", msg.verb)
            reply = LmxError(Code.INTERNAL, f"{msg.verb} failed: {exc}").fields()
        if reply is not None:
            self._send(identity, msg.id, reply)

    def _on_worker(self, frames):
        identity, body = frames[0], frames[1:]
        self._status_cache = None           # any worker message may change what STATUS shows
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
            try:
                job.done(result)
                self._reconcile_overhead(self.worker.engine)
            except Exception:  # a callback bug must never kill the loop
                log.exception("broker: %s result handling failed", job.verb)
            self._retry_waiting()
        self.worker.pump(time.monotonic())

"""The broker's I/O: two ROUTER sockets, the worker process, and the clock around the core.

The loop turns socket traffic, the worker's exit and time into events for the core
(broker/core), and carries out the actions it returns. It decides nothing itself.

Replies never vanish at a high-water mark: the client ROUTER is ROUTER_MANDATORY, and a reply
the socket cannot take now waits in that client's outbox and is retried every turn of the
loop. When a client's outbox passes MAX_OUTBOX_BYTES (a streaming reader that does not read),
the core stops that client's streams; their final replies still wait in the outbox.
"""
import collections
import logging
import os
import subprocess
import sys
import time

import zmq

from lmx.broker import access
from lmx.broker.core import Core
from lmx.broker.core.events import (CancelJob, ClientRequest, ClientSlow, KillWorker, Log,
                                    Reply, SendJob, SpawnWorker, Tick, WorkerHeartbeat,
                                    WorkerLost, WorkerProgress, WorkerReady, WorkerResult,
                                    WorkerStarting, WorkerToken)
from lmx.broker.estimate import estimate
from lmx.broker.journal import Journal
from lmx.broker.measured import MeasuredCache
from lmx.broker.statelock import StateLock
from lmx.common import config as cfg
from lmx.common import protocol
from lmx.common.errors import LmxError
from lmx.common.jobs import DeviceReading, LoadFraction, Result, StreamingInfo
from lmx.common.sockets import make_socket

log = logging.getLogger("lmx.broker")
MAX_OUTBOX_BYTES = 64 << 20      # per client: past it, its streams are stopped
TICK_S = 0.02


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


class Outbox:
    """Per-client replies the ROUTER could not take yet, sent in order when it can."""

    def __init__(self, sock):
        self.sock = sock
        self.pending = collections.defaultdict(collections.deque)
        self.nbytes = collections.Counter()

    def send(self, identity, frames):
        """Send now, or keep for later; True if the client's backlog is over the limit."""
        if not self.pending.get(identity) and self._try(identity, frames):
            return False
        self.pending[identity].append(frames)
        self.nbytes[identity] += sum(len(f) for f in frames)
        return self.nbytes[identity] > MAX_OUTBOX_BYTES

    def _try(self, identity, frames):
        try:
            self.sock.send_multipart([identity, *frames], zmq.NOBLOCK)
        except zmq.Again:
            return False                    # its pipe is full: keep it
        except zmq.ZMQError as exc:         # EHOSTUNREACH: the client is gone
            log.info("broker: reply to a disconnected client dropped (%s)", exc)
        return True

    def flush(self):
        for identity in list(self.pending):
            box = self.pending[identity]
            while box and self._try(identity, box[0]):
                self.nbytes[identity] -= sum(len(f) for f in box.popleft())
            if not box:
                del self.pending[identity]
                del self.nbytes[identity]


class WorkerProcess:
    """The spawned lmx-worker subprocess."""

    def __init__(self, worker_config):
        self.config = worker_config
        self.proc = None

    def spawn(self):
        cmd = [sys.executable, "-m", "lmx.worker.main", *self.config.argv()]
        log.info("worker: spawning %s -m lmx.worker.main --config ...", sys.executable)
        self.proc = subprocess.Popen(cmd)

    def exited(self):
        return self.proc is not None and self.proc.poll() is not None

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def wait(self, timeout):
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker: pid %s ignored SHUTDOWN; killing", self.proc.pid)
            self.kill()


class Broker:
    """Sockets, the worker process and the loop around one Core."""

    def __init__(self, config, ctx=None, metrics=None):
        self.config = config
        self.ctx = ctx or zmq.Context()
        state = config.state_dir
        self.lock = StateLock(state) if state else None
        measured = MeasuredCache(os.path.join(state, "measured.json") if state else "")
        self.core = Core(config, lambda model, spec, kind: estimate(
            model, spec, config.table, kind, measured, model_dirs=config.model_dirs),
            measured, Journal(os.path.join(state, "journal.json") if state else ""),
            started=time.time())
        self.wsock = make_socket(self.ctx, zmq.ROUTER, config.worker_endpoint, bind=True)
        self.worker = WorkerProcess(config.worker)
        self.widentity = None
        self.client = self.outbox = self.auth = None
        self.stop = False
        self._status = (None, None)          # (revision, CachedReply)
        self._respawn_at = None
        self._slow = set()
        self.metrics = None
        if metrics is not None:          # (host, port): Prometheus metrics (broker/metrics.py)
            from lmx.broker.metrics import Metrics
            self.metrics = Metrics(self.core)
            self.metrics.serve(*metrics)

    # -- start-up ------------------------------------------------------------------------

    def start(self):
        """Start (or wait for) the worker, let the core adopt it, then bind the client side."""
        if self.config.spawn_worker:
            self.worker.spawn()
        deadline = time.monotonic() + self.config.worker_start_timeout
        while self.core.worker.state != "ready":
            if self.stop:
                raise RuntimeError("stopped before the worker was ready")
            if self.worker.exited():
                raise RuntimeError(f"worker exited with {self.worker.proc.returncode} "
                                   "before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no worker READY on {self.config.worker_endpoint} within "
                                   f"{self.config.worker_start_timeout:g} s")
            if self.wsock.poll(200):
                self._on_worker(self.wsock.recv_multipart())
        refuse_if_served(self.config.endpoint)
        access.prepare_ipc(self.config.endpoint)
        self.client = make_socket(self.ctx, zmq.ROUTER, self.config.endpoint, bind=True,
                                  setup=self._secure)
        self.client.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.outbox = Outbox(self.client)
        access.lock_down_ipc(self.config.endpoint)
        led = self.core.ledger
        log.info("broker: serving %s (cap %s of %s)", self.config.endpoint,
                 cfg.format_size(led.max_bytes), cfg.format_size(led.total_bytes))

    def _secure(self, sock):
        """CURVE for tcp endpoints (refuses to start without keys); nothing for ipc."""
        self.auth = access.secure_tcp(self.ctx, sock, self.config.endpoint,
                                      self.config.curve_secret_key, self.config.curve_clients)

    # -- the loop ------------------------------------------------------------------------

    def run(self):
        """Serve until stop is set (by a signal handler or a test)."""
        poller = zmq.Poller()
        poller.register(self.client, zmq.POLLIN)
        poller.register(self.wsock, zmq.POLLIN)
        next_beat = next_tick = time.monotonic()
        while not self.stop:
            wait = TICK_S if self.outbox.pending else self.config.heartbeat_s / 2
            events = dict(poller.poll(int(wait * 1000)))
            if self.wsock in events:
                self._drain(self.wsock, self._on_worker)
            if self.client in events:
                self._drain(self.client, self._on_client)
            now = time.monotonic()
            if now >= next_tick:
                self._dispatch(Tick(now, time.time()))
                next_tick = now + TICK_S
            if now >= next_beat:
                self._to_worker(protocol.encode_request("HEARTBEAT", 0))
                next_beat = now + self.config.heartbeat_s
            self._watch_worker(now)
            self.outbox.flush()
        self.close()

    @staticmethod
    def _drain(sock, handler, limit=256):
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handler(frames)

    def _watch_worker(self, now):
        """The worker process exiting is an event; so is the time to start a new one."""
        state = self.core.worker.state
        if state in ("ready", "starting") and self.worker.exited():
            self._dispatch(WorkerLost("exited" if state == "ready" else "exited while "
                                      "starting", now))
        if self._respawn_at is not None and now >= self._respawn_at:
            self._respawn_at = None
            self.worker.spawn()
            self._dispatch(WorkerStarting(now))

    def close(self):
        """Stop the worker, close the sockets, release the state directory."""
        if self.widentity is not None:
            self._to_worker(protocol.encode_request("SHUTDOWN", 0))
        self.worker.wait(10.0)
        for sock in (self.client, self.wsock):
            if sock is not None:
                sock.close()
        if self.auth is not None:
            self.auth.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.release()

    # -- events in -----------------------------------------------------------------------

    def _on_client(self, frames):
        identity, body = frames[0], frames[1:]
        try:
            msg = protocol.decode_message(body, protocol.CLIENT_VERBS,
                                          self.config.max_frame_bytes)
        except LmxError as err:
            log.warning("protocol: %s", err)
            self.core.counters["requests"] += 1
            self.core.counters["errors"] += 1
            self._reply(identity, err.msg_id, err.fields())
            return
        self._dispatch(ClientRequest(identity, msg.id, msg.verb, msg.fields, time.monotonic(),
                                     time.time()))

    def _on_worker(self, frames):
        identity, body = frames[0], frames[1:]
        try:
            msg = protocol.decode_message(body, protocol.WORKER_EVENTS, max_bytes=None)
        except LmxError as err:
            log.error("worker: bad frame: %s", err)
            return
        now, f = time.monotonic(), msg.fields
        if msg.verb == "READY":
            if self.core.worker.state == "ready" and identity != self.widentity:
                log.error("worker: second worker pid=%s refused; one worker per broker",
                          f["pid"])
                self.wsock.send_multipart([identity, *protocol.encode_request("SHUTDOWN", 0)])
                return
            self.widentity = identity
            streaming = f.get("streaming") or f["device"].get("streaming") or {}
            self._dispatch(WorkerReady(f["pid"], DeviceReading.from_wire(f["device"]), now,
                                       StreamingInfo.from_wire(streaming)))
        elif identity != self.widentity:
            return
        elif msg.verb == "RESULT":
            self._dispatch(WorkerResult(msg.id, Result.from_wire(f), now, time.time()))
        elif msg.verb == "TOKEN":
            self._dispatch(WorkerToken(msg.id, f["index"], f["token"], f["text"], now))
        elif msg.verb == "TOKENS":
            for job, index, token, text in f["tokens"]:
                self._dispatch(WorkerToken(job, index, token, text, now))
        elif msg.verb == "PROGRESS":
            self._dispatch(WorkerProgress(msg.id, LoadFraction.from_wire(f).fraction, now))
        else:
            device = f.get("device")
            self._dispatch(WorkerHeartbeat(DeviceReading.from_wire(device) if device else
                                           None, now))

    def _dispatch(self, event):
        try:
            actions = self.core.handle(event)
        except Exception:  # a core bug must never kill the loop
            log.exception("broker: the core failed on %s", type(event).__name__)
            return
        if self.metrics is not None:     # first: a client that got a reply sees it counted
            self.metrics.observe(event, actions)
        for action in actions:
            self._carry_out(action)

    # -- actions out ---------------------------------------------------------------------

    def _carry_out(self, action):
        kind = type(action)
        if kind is Reply:
            if action.fields is None:
                self._reply_status(action)
            else:
                self._reply(action.identity, action.msg_id, action.fields)
        elif kind is SendJob:
            self._to_worker(protocol.encode_request(action.verb, action.job_id,
                                                    **action.fields))
        elif kind is CancelJob:
            self._to_worker(protocol.encode_request("CANCEL", 0, job=action.job_id))
        elif kind is Log:
            log.log(logging.getLevelName(action.level.upper()) if action.level != "exception"
                    else logging.ERROR, "%s", action.text)
        elif kind is KillWorker:
            log.error("worker: %s; killing pid %s", action.why, self.core.worker.pid)
            self.worker.kill()
        elif kind is SpawnWorker:
            self.widentity = None
            self._respawn_at = time.monotonic() + action.delay_s

    def _reply(self, identity, msg_id, fields):
        """Every reply to a client goes through here (and its outbox)."""
        self._send_client(identity, protocol.encode_reply(msg_id, **fields))

    def _reply_status(self, action):
        rev, cached = self._status
        if rev != action.status_rev:
            cached = protocol.CachedReply(self.core.status_fields())
            self._status = (action.status_rev, cached)
        self._send_client(action.identity, cached.frames(action.msg_id,
                                                         **self.core.status_dynamic()))

    def _send_client(self, identity, frames):
        if self.outbox is None:
            return
        if self.outbox.send(identity, frames):
            if identity not in self._slow:
                self._slow.add(identity)
                self._dispatch(ClientSlow(identity, time.monotonic()))
        else:
            self._slow.discard(identity)

    def _to_worker(self, frames):
        """Every frame to the worker goes through here."""
        if self.widentity is not None:
            self.wsock.send_multipart([self.widentity, *frames])

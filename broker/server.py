"""The broker's I/O: the client ROUTER, the workers (broker/workers.py: one per device, local
processes and remote links), and the clock around the core.

The loop turns socket traffic, a worker's exit and time into events for the core
(broker/core), and carries out the actions it returns. It decides nothing itself.

Replies never vanish at a high-water mark: the client ROUTER is ROUTER_MANDATORY, and a reply
the socket cannot take now waits in that client's outbox and is retried every turn of the
loop. When a client's outbox passes MAX_OUTBOX_BYTES (a streaming reader that does not read),
the core stops that client's streams; their final replies still wait in the outbox.
"""
import collections
import logging
import os
import time

import zmq

from lmx.broker import access
from lmx.broker.core import Core, room
from lmx.broker.core.events import (CancelJob, ClientRequest, ClientSlow, KillWorker, Log,
                                    Reply, SendJob, SpawnWorker, Tick, WorkerHeartbeat,
                                    WorkerLost, WorkerProgress, WorkerReady, WorkerResult,
                                    WorkerStarting, WorkerToken)
from lmx.broker.estimate import estimate
from lmx.broker.journal import Journal
from lmx.broker.measured import MeasuredCache
from lmx.broker.statelock import StateLock
from lmx.broker.workers import AuthHolder, Workers
from lmx.common import config as cfg
from lmx.common import protocol
from lmx.common.errors import LmxError
from lmx.common.jobs import DeviceReading, LoadFraction, Result, StreamingInfo
from lmx.common.sockets import make_socket

log = logging.getLogger("lmx.broker")
MAX_OUTBOX_BYTES = 64 << 20      # per client: past it, its streams are stopped
TICK_S = 0.02
HOLD_TICK_S = 0.005       # while a swap waits out a burst (room.py): look again this often


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


class Broker:
    """Sockets, the workers and the loop around one Core."""

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
        self.auth = AuthHolder(self.ctx, config)
        self.client = self.outbox = None
        self.workers = Workers(self.ctx, config, self.auth)
        self.stop = False
        self._status = (None, None)          # (revision, CachedReply)
        self._slow = set()
        self.metrics = None
        if metrics is not None:          # (host, port): Prometheus metrics (broker/metrics.py)
            from lmx.broker.metrics import Metrics
            self.metrics = Metrics(self.core)
            self.metrics.serve(*metrics)

    # -- start-up ------------------------------------------------------------------------

    def start(self):
        """Start the local workers (or wait for one started by hand), let the core adopt
        them, then bind the client side."""
        self.workers.spawn_all()
        deadline = time.monotonic() + self.config.worker_start_timeout
        poller = zmq.Poller()
        for sock in self.workers.sockets():
            poller.register(sock, zmq.POLLIN)
        while not self._started():
            if self.stop:
                raise RuntimeError("stopped before the worker was ready")
            for link in self.workers.links:
                if link.process is not None and link.process.exited():
                    raise RuntimeError(f"worker exited with {link.process.proc.returncode} "
                                       "before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no worker READY on {self.config.worker_endpoint} within "
                                   f"{self.config.worker_start_timeout:g} s")
            for sock in dict(poller.poll(200)):
                self._drain(sock, lambda frames, sock=sock: self._on_worker(sock, frames))
        refuse_if_served(self.config.endpoint)
        access.prepare_ipc(self.config.endpoint)
        self.client = make_socket(self.ctx, zmq.ROUTER, self.config.endpoint, bind=True,
                                  setup=self.auth.secure_clients)
        self.client.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.outbox = Outbox(self.client)
        access.lock_down_ipc(self.config.endpoint)
        for dev in self.core.devices:
            log.info("broker: device %d (%s): cap %s of %s", dev.index, dev.name,
                     cfg.format_size(dev.ledger.max_bytes),
                     cfg.format_size(dev.ledger.total_bytes))
        log.info("broker: serving %s", self.config.endpoint)

    def _started(self):
        """Every local device's worker is ready (without local ones: any worker is)."""
        devs = self.core.devices
        if self.config.local_workers():
            return all(d.state == "ready" for d in devs[:len(self.config.local_workers())])
        return any(d.state == "ready" for d in devs)

    # -- the loop ------------------------------------------------------------------------

    def run(self):
        """Serve until stop is set (by a signal handler or a test)."""
        poller = zmq.Poller()
        poller.register(self.client, zmq.POLLIN)
        for sock in self.workers.sockets():
            poller.register(sock, zmq.POLLIN)
        next_beat = next_tick = time.monotonic()
        while not self.stop:
            holding = room.holding(self.core)      # a swap waits out a burst: tick often
            wait = HOLD_TICK_S if holding else TICK_S if self.outbox.pending else \
                self.config.heartbeat_s / 2
            events = dict(poller.poll(int(wait * 1000)))
            for sock in self.workers.sockets():
                if sock in events:
                    self._drain(sock, lambda frames, sock=sock: self._on_worker(sock, frames))
            if self.client in events:
                self._drain(self.client, self._on_client)
            now = time.monotonic()
            if now >= next_tick:
                self._dispatch(Tick(now, time.time()))
                next_tick = now + (HOLD_TICK_S if holding else TICK_S)
            if now >= next_beat:
                self.workers.broadcast(protocol.encode_request("HEARTBEAT", 0))
                next_beat = now + self.config.heartbeat_s
            self._watch_workers(now)
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

    def _watch_workers(self, now):
        """A local worker process exiting is an event; so is the time to start a new one."""
        for link in self.workers.links:
            if link.process is None or link.index >= len(self.core.devices):
                continue
            state = self.core.devices[link.index].state
            if state in ("ready", "starting") and link.process.exited():
                self._dispatch(WorkerLost("exited" if state == "ready" else "exited while "
                                          "starting", now, link.index))
            if link.respawn_at is not None and now >= link.respawn_at:
                link.respawn_at = None
                link.process.spawn()
                self._dispatch(WorkerStarting(now, link.index))

    def close(self):
        """Stop the workers, close the sockets, release the state directory."""
        self.workers.close(10.0)
        if self.client is not None:
            self.client.close()
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

    def _on_worker(self, sock, frames):
        identity, body = frames[0], frames[1:]
        try:
            msg = protocol.decode_message(body, protocol.WORKER_EVENTS, max_bytes=None)
        except LmxError as err:
            log.error("worker: bad frame: %s", err)
            return
        now, f = time.monotonic(), msg.fields
        if msg.verb == "READY":
            self._on_ready(sock, identity, f, now)
            return
        dev = self.workers.device_of(sock, identity)
        if dev is None:
            return
        if msg.verb == "RESULT":
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
                                           None, now, dev))

    def _on_ready(self, sock, identity, f, now):
        """A worker said READY: its device (by its name), or a refusal."""
        name = f.get("name") or "local:0"
        dev = self.workers.attach(sock, identity, name, lambda i: i < len(
            self.core.devices) and self.core.devices[i].state == "ready")
        if dev is None:
            return
        streaming = f.get("streaming") or f["device"].get("streaming") or {}
        self._dispatch(WorkerReady(f["pid"], DeviceReading.from_wire(f["device"]), now,
                                   StreamingInfo.from_wire(streaming), dev, name,
                                   sock is self.workers.remote))

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
            self.workers.send(action.dev, protocol.encode_request(action.verb, action.job_id,
                                                                  **action.fields))
        elif kind is CancelJob:
            self.workers.send(action.dev, protocol.encode_request("CANCEL", 0,
                                                                  job=action.job_id))
        elif kind is Log:
            log.log(logging.getLevelName(action.level.upper()) if action.level != "exception"
                    else logging.ERROR, "%s", action.text)
        elif kind is KillWorker:
            self._kill(action)
        elif kind is SpawnWorker:
            link = self.workers.links[action.dev]
            self.workers.forget(action.dev)
            link.respawn_at = time.monotonic() + action.delay_s

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

    def _kill(self, action):
        """A silent worker: kill a local process (it must not keep device memory); a remote
        one is forgotten until it says READY again."""
        link = self.workers.links[action.dev]
        if link.process is not None:
            log.error("worker: %s; killing pid %s (device %d)", action.why,
                      self.core.devices[action.dev].pid, action.dev)
            link.process.kill()
        else:
            log.error("worker: %s; remote device %d (%s) awaits its worker", action.why,
                      action.dev, link.name)
            self.workers.forget(action.dev)

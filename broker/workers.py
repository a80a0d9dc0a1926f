"""The broker's side of its workers: one link per device, the sockets they come in on, and the
local worker processes.

Local workers (one per ``--gpus`` index, or one per ``--vram-total``) are subprocesses that
connect to a private ipc ROUTER; each is started with its device's name (``local:N``) and, with
``--gpus``, sees only its own GPU (CUDA_VISIBLE_DEVICES). Remote workers connect to a second
ROUTER on ``--remote-workers tcp://HOST:PORT``, a CURVE server that admits only the public keys
in ``--curve-workers`` (zmq.auth; an unknown key is refused in the handshake and logged). A
worker is known by the name in its READY: a new name is a new device, a known one gets its
device back (a restarted remote worker), and a second worker under a name whose worker is still
ready is refused with SHUTDOWN. Every frame to a worker goes through ``send``.
"""
import logging
import os
import subprocess
import sys

import zmq

from lmx.broker import access
from lmx.common import protocol
from lmx.common.sockets import make_socket

log = logging.getLogger("lmx.broker")
WORKERS_DOMAIN = "lmx-workers"       # the ZAP domain of the remote workers' socket


class WorkerProcess:
    """A spawned lmx-worker subprocess."""

    def __init__(self, worker_config, gpu=None):
        self.config = worker_config
        self.gpu = gpu                    # --gpus: the one GPU it may see
        self.proc = None

    def spawn(self):
        cmd = [sys.executable, "-m", "lmx.worker.main", *self.config.argv()]
        env = None
        if self.gpu is not None:
            # NVML counts GPUs in PCI bus order, CUDA fastest first unless told otherwise: in
            # PCI order CUDA_VISIBLE_DEVICES=N is the card the worker reads as NVML index N.
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(self.gpu),
                       CUDA_DEVICE_ORDER="PCI_BUS_ID")
        log.info("worker: spawning %s -m lmx.worker.main --config ... (%s%s)", sys.executable,
                 self.config.name, "" if self.gpu is None else f", CUDA_VISIBLE_DEVICES="
                 f"{self.gpu}")
        self.proc = subprocess.Popen(cmd, env=env)

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


class Link:
    """One device's worker as the server sees it: the socket and identity it speaks from,
    and its process when it is local."""

    def __init__(self, index, name, process=None):
        self.index, self.name, self.process = index, name, process
        self.sock = self.identity = None
        self.respawn_at = None

    @property
    def remote(self):
        return self.process is None


class Workers:
    """Every device's link, the local and remote ROUTER sockets, and routing between them."""

    def __init__(self, ctx, config, auth_holder):
        self.config = config
        self.local = make_socket(ctx, zmq.ROUTER, config.worker_endpoint, bind=True)
        self.remote = None
        if config.remote_endpoint:
            self.remote = make_socket(ctx, zmq.ROUTER, config.remote_endpoint, bind=True,
                                      setup=lambda s: auth_holder.secure_workers(s))
        gpus = list(config.gpus) or [None] * len(config.local_workers())
        self.links = [Link(i, w.name, WorkerProcess(w, gpu))
                      for i, (w, gpu) in enumerate(zip(config.local_workers(), gpus))]

    def sockets(self):
        return [s for s in (self.local, self.remote) if s is not None]

    def spawn_all(self):
        for link in self.links:
            link.process.spawn()

    def attach(self, sock, identity, name, ready):
        """The device index of a worker that said READY under name, or None when it is
        refused (told to SHUTDOWN). ready(index): whether that device's worker is ready."""
        remote = sock is self.remote
        for link in self.links:
            if link.name != name:
                continue
            if link.remote != remote:
                return self._refuse(sock, identity, f"{name!r} is a local device's name")
            if link.identity is not None and link.identity != identity and \
                    ready(link.index):
                return self._refuse(sock, identity, f"a worker named {name!r} is connected")
            link.sock, link.identity = sock, identity
            return link.index
        if not remote and self.config.spawn_worker:
            return self._refuse(sock, identity, f"no local device is named {name!r} (the "
                                "broker starts its local workers itself)")
        link = Link(len(self.links), name)
        link.sock, link.identity = sock, identity
        self.links.append(link)
        log.info("worker: %s worker %r is device %d", "remote" if remote else "hand-started",
                 name, link.index)
        return link.index

    def _refuse(self, sock, identity, why):
        log.error("worker: refused a worker: %s", why)
        sock.send_multipart([identity, *protocol.encode_request("SHUTDOWN", 0)])
        return None

    def device_of(self, sock, identity):
        """The device index a message came from, or None (a stranger, or a replaced worker)."""
        for link in self.links:
            if link.identity == identity and link.sock is sock:
                return link.index
        return None

    def send(self, index, frames):
        """Every frame to a worker goes through here (nothing while it is not connected)."""
        link = self.links[index] if index < len(self.links) else None
        if link is not None and link.identity is not None:
            link.sock.send_multipart([link.identity, *frames])

    def broadcast(self, frames):
        for link in self.links:
            self.send(link.index, frames)

    def forget(self, index):
        """The device's worker is gone: nothing more goes to it until a READY."""
        self.links[index].identity = None

    def close(self, timeout=10.0):
        """SHUTDOWN to every worker, wait for the local ones, close the sockets."""
        self.broadcast(protocol.encode_request("SHUTDOWN", 0))
        for link in self.links:
            if link.process is not None:
                link.process.wait(timeout)
        for sock in self.sockets():
            sock.close()


class AuthHolder:
    """The one ZAP authenticator of the broker's context, shared by the client and remote
    worker endpoints (each in its own domain)."""

    def __init__(self, ctx, config):
        self.ctx, self.config, self.auth = ctx, config, None

    def secure_clients(self, sock):
        self.auth = access.secure_tcp(self.ctx, sock, self.config.endpoint,
                                      self.config.curve_secret_key, self.config.curve_clients,
                                      auth=self.auth)

    def secure_workers(self, sock):
        self.auth = access.secure_tcp(self.ctx, sock, self.config.remote_endpoint,
                                      self.config.curve_secret_key, self.config.curve_workers,
                                      auth=self.auth, domain=WORKERS_DOMAIN,
                                      what="--remote-workers", keys="--curve-workers")

    def stop(self):
        if self.auth is not None:
            self.auth.stop()

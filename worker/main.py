"""`lmx-worker`: connect to a broker's worker endpoint and run llama.cpp jobs.

Started by the broker as ``python -m lmx.worker.main --config JSON`` (a WorkerConfig, see
common/config.py); the individual options start one by hand and override the JSON's fields.

Threads: the main thread owns the DEALER to the broker (heartbeats, forwarding); it turns each
job into its typed record (common/jobs.py) and queues it with its arrival time. The compute
thread owns the llama.cpp engine and an inproc PAIR on which it returns results. Sockets never
cross threads.
"""
import llama_cpp  # noqa: F401,I001  -- before numpy, see engine.py

import ctypes
import dataclasses
import logging
import os
import queue
import signal
import sys
import threading
import time

import socket

import click
import zmq
import zmq.auth
from click.core import ParameterSource

from lmx.common import protocol
from lmx.common.config import DEFAULT_VRAM_TOTAL, WorkerConfig, default_threads, parse_size
from lmx.common.errors import Code, LmxError
from lmx.common.jobs import JOB_TYPES, CancelJob
from lmx.common.sockets import make_socket
from lmx.worker.device import HostBuffer, open_device
from lmx.worker import streamer
from lmx.worker.engine import Engine
from lmx.worker.scheduler import Incoming, Scheduler

log = logging.getLogger("lmx.worker")
RESULTS = "inproc://lmx-worker-results"


def compute_loop(ctx, jobs, engine, cancelled, quantum, turn_tokens):
    """Compute thread: the scheduler runs jobs on the engine until a None arrives."""
    sock = make_socket(ctx, zmq.PAIR, RESULTS)
    try:
        Scheduler(engine, sock, cancelled, quantum, turn_tokens).run(jobs)
    finally:
        engine.close()
        sock.close()


class Worker:
    """The IO side: register with the broker, forward jobs and results, heartbeat."""

    def __init__(self, broker, device, engine, heartbeat_s, liveness, quantum=4, name=None,
                 curve=None, turn_tokens=512):
        self.ctx = zmq.Context()
        self.results = make_socket(self.ctx, zmq.PAIR, RESULTS, bind=True)
        self.sock = make_socket(self.ctx, zmq.DEALER, broker, curve=curve)
        # A broker that takes nothing for the liveness time is gone: never block forever.
        self.sock.setsockopt(zmq.SNDTIMEO, int(heartbeat_s * liveness * 1000))
        # Over CURVE, a broker that refuses this worker's key says so in the handshake.
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH) \
            if curve else None
        self.device = device
        self.name = name or default_name(device)
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.jobs = queue.Queue()
        self.cancelled = set()          # job ids to stop at their next token
        self.stop = False
        self.refused = False
        self.thread = threading.Thread(target=compute_loop, name="lmx-compute",
                                       args=(self.ctx, self.jobs, engine, self.cancelled,
                                             quantum, turn_tokens),
                                       daemon=True)

    def send(self, verb, msg_id=0, **fields):
        """Every message of this thread's own to the broker goes through here."""
        self.forward(protocol.encode_request(verb, msg_id, **fields))

    def forward(self, frames):
        """Every frame to the broker goes through here; one it will not take within the
        liveness time stops the worker (the broker is gone)."""
        try:
            self.sock.send_multipart(frames)
        except zmq.Again:
            log.error("worker: the broker took nothing for %.1f s; exiting",
                      self.heartbeat_s * self.liveness)
            self.stop = True

    def run(self):
        """Main loop: until SHUTDOWN, a signal, or the broker falls silent."""
        self.thread.start()
        self.send("READY", pid=os.getpid(), device=ready_device(self.device), name=self.name)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        if self.monitor is not None:
            poller.register(self.monitor, zmq.POLLIN)
        last_heard = next_beat = time.monotonic()
        while not self.stop:
            events = dict(poller.poll(int(self.heartbeat_s * 1000)))
            now = time.monotonic()
            # Drain each socket while this thread holds the GIL: forwarding one message per
            # wake-up left the results queue to the compute thread's GIL switch interval
            # (5 ms a message when it runs Python between llama_decode calls).
            if self.results in events:
                for frames in drain(self.results):
                    self.forward(frames)
            if self.sock in events:
                last_heard = now
                for frames in drain(self.sock):
                    self._on_broker(frames)
            if self.monitor is not None and self.monitor in events:
                log.error("worker: the broker refused this worker's CURVE key (its public "
                          "key is not in the broker's --curve-workers folder); exiting")
                self.refused = True
                break
            if now - last_heard > self.heartbeat_s * self.liveness:
                log.error("worker: broker silent for %.1f s; exiting", now - last_heard)
                break
            if now >= next_beat:
                self.send("HEARTBEAT", device=self.device.read())
                next_beat = now + self.heartbeat_s
        self.close()

    def _on_broker(self, frames):
        try:
            msg = protocol.decode_message(frames, protocol.WORKER_JOBS, max_bytes=None)
        except LmxError as err:
            log.error("worker: bad frame from broker: %s", err)
            return
        if msg.verb == "SHUTDOWN":
            self.stop = True
        elif msg.verb == "CANCEL":
            # read by the compute thread between tokens
            self.cancelled.add(CancelJob.from_wire(msg.fields).job)
        elif msg.verb != "HEARTBEAT":
            self.jobs.put(incoming(msg, time.monotonic()))   # deadlines count from here

    def close(self):
        """Stop the compute thread (it frees llama.cpp state) and close sockets."""
        self.jobs.put(None)
        self.thread.join(timeout=30)
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close()
        self.sock.close()
        self.results.close()
        self.ctx.term()


def drain(sock, most=10_000):
    """Every message waiting on sock (at most `most`), without blocking."""
    for _ in range(most):
        try:
            yield sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


def incoming(msg, received):
    """The compute thread's view of a decoded job: its typed record and arrival time (or,
    when the record cannot be built, the error its RESULT carries)."""
    cls = JOB_TYPES.get(msg.verb)
    if cls is None:
        return Incoming(msg.id, msg.verb, None, received,
                        LmxError(Code.UNKNOWN_VERB, f"worker cannot run {msg.verb}"))
    try:
        return Incoming(msg.id, msg.verb, cls.from_wire(msg.fields), received)
    except TypeError as exc:          # a field the record needs is missing
        return Incoming(msg.id, msg.verb, None, received, LmxError(
            Code.INTERNAL, f"broker sent a {msg.verb} the worker cannot read: {exc}"))


def default_name(device):
    """HOST:gpuN or HOST:cpu: how the broker knows this worker's device across restarts."""
    where = f"gpu{device.index}" if device.kind == "cuda" else "cpu"
    return f"{socket.gethostname()}:{where}"


def curve_keys(cfg):
    """(public, secret, server public) for a tcp broker, from zmq.auth key files; None for
    ipc. A tcp broker without keys is refused: the broker admits only known workers."""
    if not cfg.broker.startswith("tcp://"):
        return None
    if not cfg.curve_secret_key or not cfg.curve_server_key:
        raise click.UsageError(f"{cfg.broker} is a TCP broker: give --curve-secret-key (this "
                               "worker's zmq.auth secret key) and --curve-server-key (the "
                               "broker's public key)")
    public, secret = zmq.auth.load_certificate(cfg.curve_secret_key)
    server, _ = zmq.auth.load_certificate(cfg.curve_server_key)
    if secret is None:
        raise click.UsageError(f"{cfg.curve_secret_key} holds no secret key")
    return public, secret, server


def ready_device(device):
    """READY's device map: a reading plus whether the layer streamer can run here (decided
    without importing numba)."""
    return dict(device.read(), streaming=streamer.availability(device.kind == "cuda"))


def warm_cuda():
    """Create this process's CUDA context now, not inside the first REGISTER: the first load
    then costs what any load costs, and READY's NVML reading already includes the context."""
    rt = HostBuffer._load_cudart()
    if rt is not None:
        rt.cudaFree(ctypes.c_void_p(0))


_D = WorkerConfig()                    # the options' defaults: WorkerConfig's fields
# option name -> WorkerConfig field, for options given on the command line
_FIELDS = {"broker": "broker", "vram_total": "vram_total", "gpu_index": "gpu_index",
           "force_cpu": "force_cpu", "threads": "threads", "heartbeat": "heartbeat_s",
           "liveness": "liveness", "simulate_others": "simulate_others",
           "max_batch": "max_batch", "quantum": "quantum", "turn_tokens": "turn_tokens",
           "park_dir": "park_dir",
           "log_level": "log_level", "name": "name", "curve_secret_key": "curve_secret_key",
           "curve_server_key": "curve_server_key"}


def _size_option(ctx, param, value):
    try:
        return parse_size(value) if value is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _config_option(ctx, param, value):
    try:
        return WorkerConfig.from_json(value) if value is not None else None
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc)) from None


def build_config(ctx, config, options):
    """The --config JSON (or the defaults), with every option given on the command line
    put over it."""
    base = config or WorkerConfig()
    given = {_FIELDS[name]: value for name, value in options.items()
             if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
    return dataclasses.replace(base, **given)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", default=None, callback=_config_option,
              help="The whole configuration as one JSON object (WorkerConfig.to_json(); the "
              "broker passes this); options given as well override its fields.")
@click.option("--broker", default=_D.broker or None, help="The broker's worker endpoint, e.g. "
              "ipc:///tmp/lmx.sock.worker (lmx-broker prints it).")
@click.option("--vram-total", default=None, callback=_size_option, help="Declared device "
              "size (e.g. 8GiB). On CPU it is the size admission uses (default 8GiB); on a GPU "
              "it caps NVML's total.")
@click.option("--gpu-index", default=_D.gpu_index, show_default=True,
              help="NVML index of the GPU.")
@click.option("--cpu", "force_cpu", is_flag=True, default=_D.force_cpu,
              help="Run llama.cpp on the CPU even if a GPU is present.")
@click.option("--threads", default=_D.threads, type=int, help="llama.cpp threads [default: "
              "the cores this process may use].")
@click.option("--heartbeat", default=_D.heartbeat_s, show_default=True,
              help="Heartbeat interval in seconds; each heartbeat carries a fresh device "
              "reading (NVML on a GPU), so this is also the NVML timer.")
@click.option("--liveness", default=_D.liveness, show_default=True,
              help="Silent intervals before the broker is declared gone.")
@click.option("--simulate-others", type=click.Path(dir_okay=False), default=_D.simulate_others,
              help="CPU only: the bytes other processes hold, read from this file at every "
              "reading (stands in for NVML where there is no GPU).")
@click.option("--max-batch", default=_D.max_batch, show_default=True,
              type=click.IntRange(1, 256), help="Most seats of a group context (when the "
              "broker does not place agents itself).")
@click.option("--quantum", default=_D.quantum, show_default=True, type=click.IntRange(1, 4096),
              help="Batched steps a group runs per turn before the next group's turn, at most.")
@click.option("--turn-tokens", default=_D.turn_tokens, show_default=True,
              type=click.IntRange(1, 1 << 20), help="Tokens a group evaluates per turn, at "
              "most: turns are fair by tokens (a long prompt's chunks use up its turns).")
@click.option("--park-dir", type=click.Path(file_okay=False), default=_D.park_dir,
              help="Parked state files: states a PARK sends to disk, and a copy of every "
              "parked state so a restart can resume conversations.")
@click.option("--name", default=_D.name, help="How the broker knows this worker's device; "
              "a worker that comes back under the same name gets its device and agents back "
              "[default: HOST:gpuN or HOST:cpu].")
@click.option("--curve-secret-key", type=click.Path(exists=True, dir_okay=False),
              default=_D.curve_secret_key, help="tcp:// broker: this worker's zmq.auth secret "
              "key file (its public key must be in the broker's --curve-workers folder).")
@click.option("--curve-server-key", type=click.Path(exists=True, dir_okay=False),
              default=_D.curve_server_key, help="tcp:// broker: the broker's public key file.")
@click.option("--log-level", default=_D.log_level, show_default=True)
def main(config, **options):
    """Run one lmx worker: the llama.cpp backend for one GPU (or the CPU)."""
    cfg = build_config(click.get_current_context(), config, options)
    if not cfg.broker:
        raise click.UsageError("no broker endpoint: give --broker or --config")
    curve_keys(cfg)                      # a tcp broker without keys is a usage error
    serve(cfg)


def serve(cfg):
    """Open the device, build the engine and run the worker until it stops."""
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    gpu = llama_cpp.llama_supports_gpu_offload() and not cfg.force_cpu
    device = open_device(gpu, cfg.gpu_index, cfg.vram_total, DEFAULT_VRAM_TOTAL,
                         cfg.simulate_others)
    n_threads = cfg.threads or default_threads()
    if device.kind == "cuda":
        warm_cuda()
    engine = Engine(n_threads, gpu=device.kind == "cuda", pinned=device.kind == "cuda",
                    process_bytes=lambda: device.read()["process_bytes"],
                    park_dir=cfg.park_dir, max_batch=cfg.max_batch)
    worker = Worker(cfg.broker, device, engine, cfg.heartbeat_s, cfg.liveness, cfg.quantum,
                    cfg.name, curve_keys(cfg), cfg.turn_tokens)
    # Signal handlers do no work: they ask the loop to stop.
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "stop", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(worker, "stop", True))
    log.info("worker: pid=%d name=%s device=%s threads=%d broker=%s", os.getpid(),
             worker.name, device.read()["name"], n_threads, cfg.broker)
    worker.run()
    if worker.refused:
        sys.exit(1)


if __name__ == "__main__":
    main()

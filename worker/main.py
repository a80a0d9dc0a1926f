"""`lmx-worker`: connect to a broker's worker endpoint and run llama.cpp jobs.

Threads: the main thread owns the DEALER to the broker (heartbeats, forwarding); the compute
thread owns the llama.cpp engine and an inproc PAIR on which it returns results. Sockets never
cross threads.
"""
import llama_cpp  # noqa: F401,I001  -- before numpy, see engine.py

import ctypes
import logging
import os
import queue
import signal
import threading
import time

import click
import zmq

from lmx.common import protocol
from lmx.common.config import (DEFAULT_HEARTBEAT_S, DEFAULT_LIVENESS, DEFAULT_VRAM_TOTAL,
                               default_threads, parse_size)
from lmx.common.errors import LmxError
from lmx.common.sockets import make_socket
from lmx.worker.device import HostBuffer, open_device
from lmx.worker import streamer
from lmx.worker.engine import Engine
from lmx.worker.scheduler import Scheduler

log = logging.getLogger("lmx.worker")
RESULTS = "inproc://lmx-worker-results"


def compute_loop(ctx, jobs, engine, cancelled, quantum):
    """Compute thread: the scheduler runs jobs on the engine until a None arrives."""
    sock = make_socket(ctx, zmq.PAIR, RESULTS)
    try:
        Scheduler(engine, sock, cancelled, quantum).run(jobs)
    finally:
        engine.close()
        sock.close()


class Worker:
    """The IO side: register with the broker, forward jobs and results, heartbeat."""

    def __init__(self, broker, device, engine, heartbeat_s, liveness, quantum=4):
        self.ctx = zmq.Context()
        self.results = make_socket(self.ctx, zmq.PAIR, RESULTS, bind=True)
        self.sock = make_socket(self.ctx, zmq.DEALER, broker)
        self.device = device
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.jobs = queue.Queue()
        self.cancelled = set()          # job ids to stop at their next token
        self.stop = False
        self.thread = threading.Thread(target=compute_loop, name="lmx-compute",
                                       args=(self.ctx, self.jobs, engine, self.cancelled,
                                             quantum),
                                       daemon=True)

    def send(self, verb, msg_id=0, **fields):
        """Every frame to the broker goes through here."""
        self.sock.send_multipart(protocol.encode_request(verb, msg_id, **fields))

    def run(self):
        """Main loop: until SHUTDOWN, a signal, or the broker falls silent."""
        self.thread.start()
        device = dict(self.device.read(), streaming=streamer.availability())
        self.send("READY", pid=os.getpid(), device=device)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        last_heard = next_beat = time.monotonic()
        while not self.stop:
            events = dict(poller.poll(int(self.heartbeat_s * 1000)))
            now = time.monotonic()
            if self.results in events:
                self.sock.send_multipart(self.results.recv_multipart())
            if self.sock in events:
                last_heard = now
                self._on_broker(self.sock.recv_multipart())
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
            self.cancelled.add(msg.fields["job"])   # read by the compute thread between tokens
        elif msg.verb != "HEARTBEAT":
            msg.fields["_received"] = time.monotonic()   # deadlines count from here
            self.jobs.put(msg)

    def close(self):
        """Stop the compute thread (it frees llama.cpp state) and close sockets."""
        self.jobs.put(None)
        self.thread.join(timeout=30)
        self.sock.close()
        self.results.close()
        self.ctx.term()


def warm_cuda():
    """Create this process's CUDA context now, not inside the first REGISTER: the first load
    then costs what any load costs, and READY's NVML reading already includes the context."""
    rt = HostBuffer._load_cudart()
    if rt is not None:
        rt.cudaFree(ctypes.c_void_p(0))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--broker", required=True, help="The broker's worker endpoint, e.g. "
              "ipc:///tmp/lmx.sock.worker (lmx-broker prints it).")
@click.option("--vram-total", default=None, help="Declared device size (e.g. 8GiB). On CPU it "
              "is the size admission uses (default 8GiB); on a GPU it caps NVML's total.")
@click.option("--gpu-index", default=0, show_default=True, help="NVML index of the GPU.")
@click.option("--cpu", "force_cpu", is_flag=True, help="Run llama.cpp on the CPU even if a "
              "GPU is present.")
@click.option("--threads", default=None, type=int, help="llama.cpp threads [default: the "
              "cores this process may use].")
@click.option("--heartbeat", default=DEFAULT_HEARTBEAT_S, show_default=True,
              help="Heartbeat interval in seconds; each heartbeat carries a fresh device "
              "reading (NVML on a GPU), so this is also the NVML timer.")
@click.option("--liveness", default=DEFAULT_LIVENESS, show_default=True,
              help="Silent intervals before the broker is declared gone.")
@click.option("--simulate-others", type=click.Path(dir_okay=False), default=None,
              help="CPU only: the bytes other processes hold, read from this file at every "
              "reading (stands in for NVML where there is no GPU).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Agents of one model and context spec live in one context and decoded in "
              "one llama_decode batch.")
@click.option("--park-ram", default=None, help="Host memory for parked KV state (e.g. 4GiB); "
              "past it, parked state goes to files in --park-dir [default: no limit].")
@click.option("--quantum", default=4, show_default=True, type=click.IntRange(1, 4096),
              help="Batched steps a group runs per turn before the next group's turn.")
@click.option("--park-dir", type=click.Path(file_okay=False), default=None,
              help="Parked state past --park-ram, and a copy of every parked state so a "
              "restart can resume conversations.")
@click.option("--log-level", default="INFO", show_default=True)
def main(broker, vram_total, gpu_index, force_cpu, threads, heartbeat, liveness,
         simulate_others, max_batch, park_ram, quantum, park_dir, log_level):
    """Run one lmx worker: the llama.cpp backend for one GPU (or the CPU)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        declared = parse_size(vram_total) if vram_total else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--vram-total")
    try:
        park_ram = parse_size(park_ram) if park_ram else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--park-ram")
    gpu = llama_cpp.llama_supports_gpu_offload() and not force_cpu
    device = open_device(gpu, gpu_index, declared, DEFAULT_VRAM_TOTAL, simulate_others)
    n_threads = threads or default_threads()

    if device.kind == "cuda":
        warm_cuda()
    engine = Engine(n_threads, gpu=device.kind == "cuda", pinned=device.kind == "cuda",
                    process_bytes=lambda: device.read()["process_bytes"], park_dir=park_dir,
                    park_ram=park_ram, max_batch=max_batch)
    worker = Worker(broker, device, engine, heartbeat, liveness, quantum)
    # Signal handlers do no work: they ask the loop to stop.
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "stop", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(worker, "stop", True))
    log.info("worker: pid=%d device=%s threads=%d broker=%s", os.getpid(),
             device.read()["name"], n_threads, broker)
    worker.run()


if __name__ == "__main__":
    main()

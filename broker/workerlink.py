"""The broker's side of its one worker: the process, its liveness and the job queue.

Jobs go to the worker in arrival order over one socket, up to WINDOW in flight at once; the
worker keeps each agent's requests in order and gives agents turns. The broker knows every
job a dead worker took with it (the in-flight set).
"""
import collections
import itertools
import logging
import subprocess
import sys
import time

from lmx.common import protocol
from lmx.common.errors import Code, LmxError

log = logging.getLogger("lmx.broker")
WINDOW = 64          # jobs in flight at the worker at once


def is_alive(last_seen, now, interval, liveness):
    """MDP liveness: a peer is alive while it spoke within `liveness` intervals."""
    return now - last_seen <= interval * liveness


class Job:
    """One unit of worker work and the callbacks that turn its output into replies."""

    __slots__ = ("id", "verb", "fields", "done", "queued_at", "sent_at", "deadline", "partial")

    def __init__(self, job_id, verb, fields, done, now, deadline=None, partial=None):
        self.id = job_id
        self.verb = verb
        self.fields = fields
        self.done = done          # done(result_fields) -> None
        self.queued_at = now
        self.sent_at = None
        self.deadline = deadline  # monotonic seconds, or None
        self.partial = partial    # partial(token_fields) for a streaming DECODE


class WorkerLink:
    """Tracks the worker (identity, pid, device reading, engine summary) and its jobs."""

    def __init__(self, sock, heartbeat_s, liveness, queue_depth):
        self.sock = sock
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.queue_depth = queue_depth
        self.queue = collections.deque()
        self.inflight = {}        # job id -> Job sent to the worker
        self.identity = None
        self.pid = None
        self.proc = None
        self.state = "starting"
        self.device = {}
        self.engine = {}
        self.last_seen = 0.0
        self.restarts = 0
        self._ids = itertools.count(1)

    # -- process ------------------------------------------------------------------------

    def spawn(self, endpoint, extra_args):
        """Start `python -m lmx.worker.main` pointed at our worker endpoint."""
        cmd = [sys.executable, "-m", "lmx.worker.main", "--broker", endpoint,
               "--heartbeat", str(self.heartbeat_s), "--liveness", str(self.liveness),
               *extra_args]
        log.info("worker: spawning %s", " ".join(cmd))
        self.proc = subprocess.Popen(cmd)
        self.state = "starting"
        self.last_seen = time.monotonic()

    def process_exited(self):
        """True when a spawned worker process has exited."""
        return self.proc is not None and self.proc.poll() is not None

    def stop(self, timeout=10.0):
        """Ask the worker to shut down; kill it if it does not exit in time."""
        if self.identity is not None:
            self._send(protocol.encode_request("SHUTDOWN", 0))
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker: pid %s ignored SHUTDOWN; killing", self.proc.pid)
                self.proc.kill()
                self.proc.wait()

    # -- messages -----------------------------------------------------------------------

    def _send(self, frames):
        """Every frame to the worker goes through here."""
        self.sock.send_multipart([self.identity, *frames])

    def heartbeat(self):
        """Tell the worker we are alive."""
        if self.identity is not None and self.state == "ready":
            self._send(protocol.encode_request("HEARTBEAT", 0))

    def on_message(self, identity, msg, now):
        """Handle READY/HEARTBEAT/RESULT; return (job, result) when a job finished."""
        if msg.verb == "READY":
            if self.state == "ready" and identity != self.identity:
                log.error("worker: second worker pid=%s refused; one worker per broker",
                          msg.fields["pid"])
                self.sock.send_multipart([identity, *protocol.encode_request("SHUTDOWN", 0)])
                return None
            self.identity, self.pid = identity, msg.fields["pid"]
            self.device, self.state, self.last_seen = msg.fields["device"], "ready", now
            log.info("worker: ready pid=%s device=%s total=%s", self.pid,
                     self.device.get("name"), self.device.get("total_bytes"))
            return None
        if identity != self.identity:
            return None
        self.last_seen = now
        if msg.verb == "HEARTBEAT" and msg.fields.get("device"):
            self.device = dict(msg.fields["device"], streaming=self.device.get("streaming"))
        if msg.verb == "TOKEN":
            job = self.inflight.get(msg.id)
            if job is not None and job.partial is not None:
                job.partial(msg.fields)
            return None
        if msg.verb != "RESULT":
            return None
        job = self.inflight.pop(msg.id, None)
        if job is None:
            log.error("worker: result for unknown job %s", msg.id)
            return None
        self.engine = msg.fields.pop("engine", self.engine)
        return job, msg.fields

    # -- jobs ---------------------------------------------------------------------------

    def submit(self, verb, fields, done, now, internal=False, deadline=None, partial=None):
        """Queue a job; raise BUSY when the queue is full or WORKER_UNAVAILABLE when down.

        internal jobs (rebuilding agents after a restart) are never refused for depth."""
        if self.state != "ready":
            raise LmxError(Code.WORKER_UNAVAILABLE, f"worker is {self.state}; try again")
        waiting = len(self.queue) + len(self.inflight) - 1   # beyond the one running
        if waiting >= self.queue_depth and not internal:
            raise LmxError(Code.BUSY, f"request queue is full ({waiting} waiting)",
                           queue_depth=waiting, max_queue_depth=self.queue_depth)
        job = Job(next(self._ids), verb, fields, done, now, deadline, partial)
        self.queue.append(job)
        self.pump(now)
        return job

    def pump(self, now):
        """Send queued jobs while fewer than WINDOW are in flight."""
        while self.queue and len(self.inflight) < WINDOW and self.state == "ready":
            job = self.queue.popleft()
            self.inflight[job.id] = job
            job.sent_at = now
            fields = job.fields
            if job.deadline is not None:    # the worker counts the time that is left
                fields = dict(fields, deadline_ms=max(1, int((job.deadline - now) * 1000)))
            self._send(protocol.encode_request(job.verb, job.id, **fields))

    def cancel(self, job):
        """Drop a job still queued here ("queued"), or ask the worker to drop it before it
        starts or stop it at its next token ("sent"); None if the job is gone."""
        if job in self.queue:
            self.queue.remove(job)
            return "queued"
        if job.id in self.inflight:
            self._send(protocol.encode_request("CANCEL", 0, job=job.id))
            return "sent"
        return None

    def expire(self, now):
        """Remove and return queued jobs whose deadline has passed."""
        late = [j for j in self.queue if j.deadline is not None and j.deadline <= now]
        for job in late:
            self.queue.remove(job)
        return late

    def fail_all(self, message):
        """The worker is gone: mark it lost and return every unfinished job."""
        jobs = list(self.inflight.values()) + list(self.queue)
        self.inflight = {}
        self.queue.clear()
        self.state, self.identity, self.engine = "lost", None, {}
        log.error("worker: lost (%s); failing %d job(s)", message, len(jobs))
        return jobs

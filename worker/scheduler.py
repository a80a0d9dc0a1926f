"""The worker's compute loop: every runnable agent advanced together, a token per step.

Each agent has a FIFO of its DECODEs and its UNREGISTER, so its own requests keep their order.
Every agent with a running DECODE is live in a group (engine.py); each step evaluates one token
of every running agent of a group in one llama_decode, so agents on one model are batched and
none starves; groups (different models or specs) take turns of `quantum` steps, and new jobs
are taken between turns, so a short request is not stuck behind a long one. REGISTER and PARK
run as soon as they arrive (the broker sends PARK only for an agent with no work in flight).
A DECODE cancelled or past its deadline before it starts is answered without running; once
running it stops at its next token. Deadlines count from the moment the worker received the job.
"""
import collections
import logging
import queue
import time

from lmx.common import protocol
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError

log = logging.getLogger("lmx.worker")


class Scheduler:
    """Runs on the compute thread; owns the engine and the results socket."""

    def __init__(self, engine, sock, cancelled, quantum=4):
        self.engine, self.sock, self.cancelled = engine, sock, cancelled
        self.quantum = max(1, quantum)
        self.waiting = collections.OrderedDict()   # agent -> deque of messages
        self.running = {}                           # agent -> (message, engine Run)

    def run(self, jobs):
        """Until a None arrives on jobs: take jobs, then give every agent with work a turn."""
        while True:
            block = not (self.waiting or self.running)
            try:
                msg = jobs.get(block=block)
                while True:
                    if msg is None:
                        return
                    self._take(msg)
                    msg = jobs.get_nowait()
            except queue.Empty:
                pass
            self._round()

    def _take(self, msg):
        f = msg.fields
        if msg.verb == "REGISTER":
            self._finish(msg, lambda: self.engine.register(
                f["agent"], f["path"], ContextSpec(**f["spec"]), resume=bool(f.get("resume"))))
        elif msg.verb == "PARK":
            if f["agent"] in self.running or self.waiting.get(f["agent"]):
                self._send_result(msg, LmxError(Code.BUSY, f"agent {f['agent']!r} has work "
                                                "in flight; not parked").fields())
            else:
                self._finish(msg, lambda: self.engine.park(f["agent"]))
        elif msg.verb in ("DECODE", "UNREGISTER"):
            self.waiting.setdefault(f["agent"], collections.deque()).append(msg)
        else:
            self._send_result(msg, LmxError(Code.UNKNOWN_VERB,
                                            f"worker cannot run {msg.verb}").fields())

    def _round(self):
        """Start what can start, make the running agents live, then give each group a turn."""
        for agent in list(self.waiting):
            if agent not in self.running:
                self._start_next(agent)
        fresh = [run for _, run in self.running.values() if run.t_live is None]
        if fresh:
            try:
                self.engine.prepare(fresh)
            except LmxError as err:
                for run in fresh:       # a context could not be built: fail those that wait
                    if run.slot.group is None:
                        slot = run.slot
                        slot.pending = run.prior if (slot.parked is not None or slot.on_disk
                                                     or slot.n_past) else []
                        self._end(run, err.fields())
        groups = {}
        for _, run in self.running.values():
            if run.slot.group is not None:
                groups.setdefault(id(run.slot.group), []).append(run)
        for runs in groups.values():
            for _ in range(self.quantum):
                try:
                    finished = self.engine.step(runs)
                except LmxError as err:
                    finished = runs
                    for run in runs:
                        run.result = err.fields()
                except Exception as exc:  # a bug must not kill the worker: report it
                    log.exception("worker: DECODE failed")
                    finished = runs
                    for run in runs:
                        run.result = LmxError(Code.INTERNAL,
                                              f"worker error in DECODE: {exc}").fields()
                for run in finished:
                    self._end(run, run.result if "code" in run.result else dict(
                        run.result, status="ok"))
                runs = [r for r in runs if r.result is None]
                if not runs:
                    break

    def _start_next(self, agent):
        """Pop the agent's next message; start a DECODE (True) or finish anything else."""
        box = self.waiting[agent]
        while box:
            msg = box.popleft()
            if msg.verb == "UNREGISTER":
                self._finish(msg, lambda: self.engine.unregister(agent))
                continue
            early = self._should_stop(msg)()
            if early:
                err = LmxError(Code.CANCELLED if early == "cancel" else Code.DEADLINE,
                               f"{'cancelled' if early == 'cancel' else 'the deadline passed'}"
                               " before it started")
                self._send_result(msg, err.fields())
                continue
            f = msg.fields
            stream = self._stream(msg) if f.get("stream") else None
            try:
                run = self.engine.start(agent, f["prompt"], f["n_predict"],
                                        f.get("max_prompt_tokens"), on_token=stream,
                                        should_stop=self._should_stop(msg))
            except LmxError as err:
                self._send_result(msg, err.fields())
                continue
            self.running[agent] = (msg, run)
            return True
        del self.waiting[agent]
        return False

    def _end(self, run, out):
        msg, _ = self.running.pop(run.agent)
        self._send_result(msg, out)

    def _finish(self, msg, call):
        try:
            out = dict(call(), status="ok")
        except LmxError as err:
            out = err.fields()
        except Exception as exc:
            log.exception("worker: %s failed", msg.verb)
            out = LmxError(Code.INTERNAL, f"worker error in {msg.verb}: {exc}").fields()
        self._send_result(msg, out)

    def _send_result(self, msg, out):
        self.cancelled.discard(msg.id)
        out["engine"] = self.engine.summary()
        self.sock.send_multipart(protocol.encode_request("RESULT", msg.id, **out))

    def _stream(self, msg):
        def on_token(index, token, text):
            self.sock.send_multipart(protocol.encode_request(
                "TOKEN", msg.id, index=index, token=token, text=text))
        return on_token

    def _should_stop(self, msg):
        """should_stop for a DECODE: the broker's CANCEL, or its deadline passing."""
        deadline = msg.fields.get("deadline_ms")
        received = msg.fields.get("_received", time.monotonic())
        until = received + deadline / 1000 if deadline else None

        def should_stop():
            if msg.id in self.cancelled:
                return "cancel"
            if until is not None and time.monotonic() >= until:
                return "deadline"
            return None
        return should_stop

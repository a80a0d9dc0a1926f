"""The worker's compute loop: many agents' requests advanced in turns, a few tokens each.

Each agent has a FIFO of its DECODEs and its UNREGISTER, so its own requests keep their order;
agents take turns round-robin, each running up to `quantum` tokens of its current DECODE per
turn, so no agent starves and a short request is not stuck behind a long one. REGISTER runs as
soon as it arrives. A DECODE cancelled or past its deadline before it starts is answered
without running; once running it stops at its next token (engine.decode_steps' should_stop).
Deadlines count from the moment the worker received the job.
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
        self.running = {}                           # agent -> (message, decode_steps generator)

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
        if msg.verb == "REGISTER":
            f = msg.fields
            self._finish(msg, lambda: self.engine.register(
                f["agent"], f["path"], ContextSpec(**f["spec"]), resume=bool(f.get("resume"))))
        elif msg.verb in ("DECODE", "UNREGISTER"):
            self.waiting.setdefault(msg.fields["agent"], collections.deque()).append(msg)
        else:
            self._send_result(msg, LmxError(Code.UNKNOWN_VERB,
                                            f"worker cannot run {msg.verb}").fields())

    def _round(self):
        """One turn for every agent that has a running or waiting request."""
        for agent in list(self.waiting):
            if agent not in self.running and not self._start_next(agent):
                continue
            msg, steps = self.running[agent]
            self._advance(agent, msg, steps)

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
            self.running[agent] = (msg, self.engine.decode_steps(
                agent, f["prompt"], f["n_predict"], f.get("max_prompt_tokens"),
                on_token=stream, should_stop=self._should_stop(msg)))
            return True
        del self.waiting[agent]
        return False

    def _advance(self, agent, msg, steps):
        """Run up to `quantum` tokens of the agent's DECODE; send its result when done."""
        try:
            for _ in range(self.quantum):
                next(steps)
            return
        except StopIteration as done:
            out = dict(done.value, status="ok")
        except LmxError as err:
            out = err.fields()
        except Exception as exc:  # a bug must not kill the worker: report it
            log.exception("worker: DECODE failed")
            out = LmxError(Code.INTERNAL, f"worker error in DECODE: {exc}").fields()
        del self.running[agent]
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

"""The worker's compute loop: every runnable agent advanced together, a token per step.

Jobs arrive as Incoming items (the typed job record from common/jobs.py and the time the main
thread received it). Each agent has a FIFO of its DECODEs, CHATs and its UNREGISTER, so its own
requests keep their order. Every agent with a running DECODE is seated in a group (seats.py);
each step evaluates one token of every running agent of a group in one llama_decode, so agents
on one model are batched and none starves; groups (different models or specs) take turns,
fair by tokens: a turn is at most `quantum` steps and `turn_tokens` evaluated tokens (deficit
round robin: a turn that evaluated more, a long prompt's chunks, carries the debt into the
group's next turns), and new jobs are taken between turns; a turn ends after one step when jobs
are waiting, so a newcomer joins the running agents' next step (its time to first token is a
step, not a quantum) and a short request is not stuck behind a long one. REGISTER, PARK and
RESIZE run as soon as they arrive; the broker sends PARK only for an agent with no work in
flight, so a PARK for one with work here is a broker bug (INTERNAL).
Each step also carries chunks of newcomers' prompts (decode.py). A DECODE or CHAT cancelled
or past its deadline before it starts is answered without running; once running it stops at
its next token (a CHAT streams TOKEN events whose text is the delta).
Deadlines count from the moment the main thread received the job.

Every job is answered by exactly one RESULT: ``Result(status, slot, engine, error, out)``.
"""
import llama_cpp  # noqa: F401,I001  -- before numpy in every worker module (see engine.py)

import collections
import logging
import queue
import time
from typing import NamedTuple, Optional

from lmx.common import protocol
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError
from lmx.common.jobs import (ChatJob, DecodeJob, ExportJob, ImportJob, LoadFraction, ParkJob,
                             RegisterJob, ResizeJob, ResizeResult, Result, UnregisterJob)

log = logging.getLogger("lmx.worker")


class Incoming(NamedTuple):
    """One job as the main thread hands it over: its id, verb, typed record (None when it
    could not be built) and the monotonic time it arrived; error: why it could not be built."""

    id: object
    verb: str
    job: object
    received: float
    error: Optional[LmxError] = None


class Scheduler:
    """Runs on the compute thread; owns the engine and the results socket."""

    def __init__(self, engine, sock, cancelled, quantum=4, turn_tokens=512):
        self.engine, self.sock, self.cancelled = engine, sock, cancelled
        self.quantum = max(1, quantum)
        self.turn_tokens = max(1, turn_tokens)
        self.credit = {}        # group -> tokens it may still evaluate (deficit round robin)
        self.tokens = []        # (job id, index, token, text) streamed in this step
        self.waiting = collections.OrderedDict()   # agent -> deque of Incoming
        self.running = {}                           # agent -> (Incoming, engine Run)
        self.jobs = None
        engine.on_launch = self._flush_stream       # a step's tokens go out during the next

    def run(self, jobs):
        """Until a None arrives on jobs: take jobs, then give every agent with work a turn."""
        self.jobs = jobs
        while True:
            block = not (self.waiting or self.running)
            try:
                item = jobs.get(block=block)
                self._flush_stream()        # the last step's tokens, before jobs that take long
                while True:
                    if item is None:
                        return
                    self._take(item)
                    item = jobs.get_nowait()
            except queue.Empty:
                pass
            self._round()

    def _take(self, item):
        job = item.job
        if item.error is not None:
            self._reply(item, error=item.error)
        elif isinstance(job, RegisterJob):
            self._finish(item, lambda: self.engine.register(
                job.agent, job.path, ContextSpec(**job.spec), resume=bool(job.resume),
                seat=job.seat, on_progress=self._progress(item) if job.progress else None))
        elif isinstance(job, ResizeJob):
            self._finish(item, lambda: self._resize(job))
        elif isinstance(job, ExportJob):
            self._finish(item, lambda: self.engine.export_state(job.agent, job.offset,
                                                                job.size))
        elif isinstance(job, ImportJob):
            self._finish(item, lambda: self.engine.import_state(job))
        elif isinstance(job, ParkJob):
            if job.agent in self.running or self.waiting.get(job.agent):
                self._reply(item, error=LmxError(
                    Code.INTERNAL, f"PARK for agent {job.agent!r}, which has work in flight "
                    "at the worker (a broker bug); not parked", agent=job.agent))
            else:
                self._finish(item, lambda: self.engine.park(job.agent, job.ram_bytes,
                                                            bool(job.disk), job.shrink))
        elif isinstance(job, (DecodeJob, ChatJob, UnregisterJob)):
            self.waiting.setdefault(job.agent, collections.deque()).append(item)
        else:
            self._reply(item, error=LmxError(Code.UNKNOWN_VERB,
                                             f"worker cannot run {item.verb}"))

    def _resize(self, job):
        self.engine.reclaim(job.group, job.capacity)
        self._drop_lost()
        group = self.engine.group(job.group)
        return ResizeResult(group.capacity if group else 0)

    def _round(self):
        """Start what can start, make the running agents live, then give each group a turn."""
        for agent in list(self.waiting):
            if agent not in self.running:
                self._start_next(agent)
        fresh = [run for _, run in self.running.values() if run.t_live is None]
        if fresh:
            seats = {run.agent: item.job.seat for item, run in self.running.values()
                     if run.t_live is None and item.job.seat is not None}
            try:
                self.engine.prepare(fresh, seats)
            except LmxError as err:
                for run in fresh:       # a context could not be built: fail those that wait
                    if run.slot.group is None:
                        slot = run.slot
                        slot.pending = run.prior if (slot.parked is not None or slot.on_disk
                                                     or slot.n_past) else []
                        self._end(run, err)
        self._drop_lost()
        groups = {}
        for _, run in self.running.values():
            if run.slot.group is not None:
                groups.setdefault(id(run.slot.group), []).append(run)
        self.credit = {key: self.credit.get(key, 0) for key in groups}
        for key, runs in groups.items():
            self._turn(key, runs)

    def _turn(self, key, runs):
        """A group's turn: steps until it has evaluated its credit of tokens (turn_tokens a
        turn, a debt carried to the next: a long prompt's 512-token chunks do not take four
        steps' worth of turns from a group decoding one token a step) or `quantum` steps,
        or until jobs arrive."""
        credit = min(self.credit[key] + self.turn_tokens, self.turn_tokens)
        steps = 0
        while credit > 0 and steps < self.quantum and runs:
            finished, error = self._step(runs)
            credit -= self.engine.step_tokens
            steps += 1
            for i, run in enumerate(finished):    # the engine's summary once, with the last
                self._end(run, error, engine=i == len(finished) - 1)
            runs = [r for r in runs if r not in finished]
            if self._jobs_waiting():
                break
        self.credit[key] = credit if runs else 0

    def _jobs_waiting(self):
        """New jobs arrived: end this group's turn after one step, so a newcomer joins the
        next step instead of waiting out the quantum (the next groups still get their step)."""
        return self.jobs is not None and not self.jobs.empty()

    def _drop_lost(self):
        """End every running DECODE whose conversation was reset because its saved state
        could not be restored (STATE_LOST); an idle agent's reset shows in its slot."""
        for agent, err in list(self.engine.lost.items()):
            if agent in self.running:
                self._end(self.running[agent][1], err)
        self.engine.lost.clear()

    def _step(self, runs):
        """One engine step: (the runs that finished, None), or (all of them, the error)."""
        try:
            return self.engine.step(runs), None
        except LmxError as err:
            return runs, err
        except Exception as exc:  # a bug must not kill the worker: report it
            log.exception("worker: DECODE failed")
            return runs, LmxError(Code.INTERNAL, f"worker error in DECODE: {exc}")

    def _start_next(self, agent):
        """Pop the agent's next job; start a DECODE (True) or finish anything else."""
        box = self.waiting[agent]
        while box:
            item = box.popleft()
            job = item.job
            if isinstance(job, UnregisterJob):
                self._finish(item, lambda: self.engine.unregister(agent))
                continue
            should_stop = self._should_stop(item)
            early = should_stop()
            if early:
                self._reply(item, error=LmxError(
                    Code.CANCELLED if early == "cancel" else Code.DEADLINE,
                    f"{'cancelled' if early == 'cancel' else 'the deadline passed'} before it "
                    "started"))
                continue
            stream = self._stream(item) if job.stream else None
            try:
                if isinstance(job, ChatJob):
                    run = self.engine.start_chat(agent, job, on_token=stream,
                                                 should_stop=should_stop)
                else:
                    run = self.engine.start(agent, job.prompt, job.n_predict,
                                            job.max_prompt_tokens, on_token=stream,
                                            should_stop=should_stop)
            except LmxError as err:
                self._reply(item, error=err)
                continue
            except Exception as exc:     # a bug must not kill the worker: report it
                log.exception("worker: %s failed to start", item.verb)
                self._reply(item, error=LmxError(Code.INTERNAL,
                                                 f"worker error in {item.verb}: {exc}"))
                continue
            self.running[agent] = (item, run)
            return True
        del self.waiting[agent]
        return False

    def _end(self, run, error=None, engine=True):
        item, _ = self.running.pop(run.agent)
        run.close()         # a CHAT's sampler chain is freed however it ends
        if error is not None:
            self._reply(item, error=error, engine=engine)
        else:
            self._reply(item, out=run.result, engine=engine)

    def _finish(self, item, call):
        """Run a job's engine call and answer it with the result record or the error."""
        try:
            out = call()
        except LmxError as err:
            self._reply(item, error=err)
            return
        except Exception as exc:
            log.exception("worker: %s failed", item.verb)
            self._reply(item, error=LmxError(Code.INTERNAL,
                                             f"worker error in {item.verb}: {exc}"))
            return
        self._reply(item, out=out)

    def _reply(self, item, out=None, error=None, engine=True):
        """The job's one RESULT: the verb's record or the error, the slot, the engine's
        summary (engine=False: none; runs that end in one step send it once, with the last:
        80 agents ending together sent 80 copies of an 80-agent summary, each built by the
        worker and decoded by the broker)."""
        self._flush_stream()                # its tokens before its result
        self.cancelled.discard(item.id)
        agent = getattr(item.job, "agent", None)
        if error is not None:
            fields = error.fields()
            fields.pop("status", None)
            result = Result("error", error=fields)
        else:
            result = Result("ok", out=out.to_wire())
        result.slot = self.engine.slot_state(agent) if agent is not None else None
        result.engine = self.engine.summary() if engine else None
        self.sock.send_multipart(protocol.encode_request("RESULT", item.id,
                                                         **result.to_wire()))

    def _progress(self, item):
        """on_progress for a REGISTER's model load: PROGRESS events with the job's id."""
        def on_progress(fraction):
            self.sock.send_multipart(protocol.encode_request(
                "PROGRESS", item.id, **LoadFraction(fraction).to_wire()))
        return on_progress

    def _stream(self, item):
        def on_token(index, token, text):
            self.tokens.append((item.id, index, token, text))
        return on_token

    def _flush_stream(self):
        """Stream what the steps so far gave, in one TOKENS event (one message per step, not
        per token: the per-message cost was the worker's ceiling at 64 agents). Called while
        the GPU computes the next step (Engine.on_launch), before a RESULT, and before new
        jobs are taken, so a token waits at most one step and never behind a slow job."""
        self.engine.emit_pending()
        if self.tokens:
            self.sock.send_multipart(protocol.encode_request("TOKENS", 0, tokens=self.tokens))
            self.tokens = []

    def _should_stop(self, item):
        """should_stop for a DECODE: the broker's CANCEL, or its deadline passing."""
        deadline = item.job.deadline_ms
        until = item.received + deadline / 1000 if deadline else None

        def should_stop():
            if item.id in self.cancelled:
                return "cancel"
            if until is not None and time.monotonic() >= until:
                return "deadline"
            return None
        return should_stop

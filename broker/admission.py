"""REGISTER, UNREGISTER and DECODE: book before build, unwind on failure, reconcile to measured."""
import logging
import time

from lmx.broker.estimate import estimate
from lmx.broker.measured import with_margin
from lmx.broker.records import Agent, ModelBooking
from lmx.common import config as cfg
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError, Reason

log = logging.getLogger("lmx.broker")


class AdmissionMixin:
    """The Broker's request handlers that touch the ledger (mixed into Broker)."""

    def on_register(self, identity, msg):
        """REGISTER: estimate, reserve, then ask the worker to build; reply when it has."""
        agent, model = msg.fields["agent"], msg.fields["model"]
        self._check_agent_id(agent)
        spec = ContextSpec.from_fields(msg.fields, self._default_spec())
        if spec.n_ctx > self.config.max_n_ctx:
            raise LmxError(Code.BAD_REQUEST, f"n_ctx must be in [64, {self.config.max_n_ctx}]",
                           Reason.BAD_VALUE, field="n_ctx")
        if agent in self.agents:
            raise LmxError(Code.AGENT_EXISTS, f"agent {agent!r} is already registered")
        owned = sum(1 for a in self.agents.values() if a.owner == identity)
        if owned >= self.config.max_agents_per_client:
            raise LmxError(Code.LIMIT, f"this client already has {owned} agents (the limit)",
                           Reason.AGENTS_PER_CLIENT, limit=self.config.max_agents_per_client)
        self._check_queue()
        device = self.worker.device.get("kind", "cpu")
        est = estimate(model, spec, self.config.table, device, self.measured,
                       model_dirs=self.config.model_dirs)
        try:
            rec, mrec = self._book(agent, model, est, spec, identity)
        except LmxError as err:
            victims = None
            if err.code == Code.VRAM_LEDGER_DENY and self.config.admit_by_parking:
                new = est.context + (0 if est.path in self.models else est.weights)
                victims = self._plan_room(None, new)
            if not victims:
                raise
            for victim in victims:
                self._park(victim)
            rec, mrec = self._book(agent, model, est, spec, identity)

        def done(result):
            if result.get("status") == "ok":
                rec.state = "ready"
                self.journal.put(agent, {"model": model, "path": est.path, "spec": rec.spec})
                self.lost.pop(agent, None)
                if result.get("model_loaded"):
                    self._reconcile_model(mrec, result.get("model_measured") or {}, spec)
                result.update(agent=agent, path=est.path, n_ctx=spec.n_ctx,
                              booked_bytes=rec.booked_bytes, estimate_source=rec.source,
                              model_booked_bytes=mrec.booked_bytes,
                              weights_source=mrec.source, estimate=est.estimated)
            else:
                self._unbook(agent, "register failed")
            self._send(identity, msg.id, dict(result, **self._ledger_numbers()))

        self._submit("REGISTER", {"agent": agent, "path": est.path, "spec": spec.as_dict()},
                     done, on_error=lambda: self._unbook(agent, "register not queued"))
        return None

    def _book(self, agent, model, est, spec, identity, state="registering"):
        """Reserve the agent's context (and its model's weights if not yet booked) atomically,
        then record both; raise VRAM_LEDGER_DENY with the numbers if they do not fit."""
        mrec = self.models.get(est.path)
        want = {f"agent:{agent}": est.context}
        if mrec is None:
            want[f"model:{est.path}"] = est.weights
        denial = self.ledger.try_reserve_many(want)
        if denial is not None:
            log.info("admission: denied agent=%s requested=%d allocated=%d max=%d reason=%s",
                     agent, denial.requested_bytes, denial.ledger_allocated_bytes,
                     denial.ledger_max_bytes, denial.reason)
            raise denial.error(f"agent {agent!r} on {model}")
        if mrec is None:
            mrec = self.models[est.path] = ModelBooking(
                est.path, est.fingerprint, est.weights,
                est.estimated.get("weights_device", est.weights), est.weights_source)
        mrec.agents.add(agent)
        rec = self.agents[agent] = Agent(agent, model, est.path, spec.n_ctx, est.context,
                                         est.context_source, spec.as_dict(), identity,
                                         est.estimated.get("context_device", est.context),
                                         state=state)
        log.info("admission: reserved agent=%s context=%d (%s) weights=%s (%s)", agent,
                 est.context, est.context_source,
                 est.weights if f"model:{est.path}" in want else "shared", est.weights_source)
        return rec, mrec

    def _default_spec(self):
        cuda = self.worker.device.get("kind") == "cuda"
        return ContextSpec(n_ctx=self.config.default_n_ctx, n_gpu_layers=-1 if cuda else 0)

    def _reconcile_model(self, mrec, measured, spec):
        """Book the model's measured weights (+ margin), unless the operator table set them."""
        nbytes = max(measured.get("device_bytes") or 0, measured.get("nvml_delta") or 0)
        if not nbytes:
            return
        mrec.measured_bytes = nbytes
        device = self.worker.device.get("kind", "cpu")
        self.measured.store_weights(mrec.fingerprint, device, ContextSpec(
            n_gpu_layers=spec.n_gpu_layers), with_margin(nbytes, self.config.
                                                         measure_margin_percent))
        self._rebook(f"model:{mrec.path}", mrec, nbytes, keep=mrec.source == "table")

    def _reconcile_overhead(self, engine):
        """The worker's own device bytes (CUDA context, cuBLAS, pools): NVML's reading of the
        process minus the buffers llama.cpp reported. Raised when it grows, never lowered."""
        process, known = engine.get("process_bytes"), engine.get("known_device_bytes")
        if process is None or known is None or self.config.worker_overhead is not None:
            return
        booked = with_margin(max(process - known, 0), self.config.measure_margin_percent)
        current = self.ledger.booked("worker:overhead") or 0
        if booked > current or self._overhead_estimated:
            log.info("reconcile: worker:overhead booked=%d measured=%d (process %d - buffers %d)",
                     booked, process - known, process, known)
            self.ledger.force("worker:overhead", booked)
            self._overhead_estimated = False

    def _reconcile_context(self, rec, measured):
        """Book an agent's measured context (+ margin) and remember it for the next REGISTER."""
        nbytes = max(measured.get("device_bytes") or 0, measured.get("nvml_delta") or 0)
        if not nbytes or rec.agent not in self.agents:
            return
        rec.measured_bytes = nbytes
        mrec = self.models.get(rec.path)
        self.measured.store_context(mrec.fingerprint if mrec else "", self.worker.device.get(
            "kind", "cpu"), ContextSpec(**rec.spec), with_margin(
            nbytes, self.config.measure_margin_percent))
        self._rebook(f"agent:{rec.agent}", rec, nbytes)

    def _rebook(self, key, rec, measured, keep=False):
        booked = with_margin(measured, self.config.measure_margin_percent)
        est = rec.estimated_bytes or 0
        log.info("reconcile: %s estimated=%d measured=%d (%+.1f%%) booked=%d%s", key, est,
                 measured, 100.0 * (est - measured) / measured, rec.booked_bytes if keep
                 else booked, " (operator table kept)" if keep else "")
        if not keep and self.ledger.booked(key) is not None:
            self.ledger.force(key, booked)
            rec.booked_bytes = booked

    def on_unregister(self, identity, msg):
        """UNREGISTER: free the worker's slot, then release the agent's bytes."""
        rec = self._agent(msg.fields["agent"])
        prior, rec.state = rec.state, "leaving"
        self._drop_waiting(rec, "the agent was unregistered before this DECODE ran")

        def done(result):
            gone = result.get("status") == "ok" or result.get("code") in (
                Code.UNKNOWN_AGENT, Code.WORKER_LOST)
            if gone:
                freed = self._unbook(rec.agent, "unregistered")
                result = dict(result, status="ok", agent=rec.agent, released_bytes=freed)
            else:
                rec.state = prior
            self._send(identity, msg.id, dict(result, **self._ledger_numbers()))

        self._submit("UNREGISTER", {"agent": rec.agent}, done,
                     on_error=lambda: setattr(rec, "state", prior))
        return None

    def on_decode(self, identity, msg):
        """DECODE: validate, queue for the worker, stream its tokens, forward its result."""
        rec = self._agent(msg.fields["agent"])
        prompt, n_predict = msg.fields["prompt"], msg.fields["n_predict"]
        deadline_ms = msg.fields.get("deadline_ms")
        if not 1 <= n_predict <= self.config.max_n_predict:
            raise LmxError(Code.BAD_REQUEST, f"n_predict must be in [1, "
                           f"{self.config.max_n_predict}], got {n_predict}", Reason.BAD_VALUE,
                           field="n_predict")
        if not prompt:
            raise LmxError(Code.BAD_REQUEST, "prompt is empty", Reason.BAD_VALUE, field="prompt")
        if len(prompt.encode("utf-8", "surrogatepass")) > self.config.max_prompt_bytes:
            raise LmxError(Code.BAD_REQUEST, f"prompt exceeds {self.config.max_prompt_bytes} "
                           "bytes", Reason.BAD_VALUE, field="prompt")
        if deadline_ms is not None and not 1 <= deadline_ms <= 3_600_000:
            raise LmxError(Code.BAD_REQUEST, "deadline_ms must be in [1, 3600000]",
                           Reason.BAD_VALUE, field="deadline_ms")
        t0 = time.monotonic()
        key = (rec.agent, msg.id)
        deadline = t0 + deadline_ms / 1000 if deadline_ms else None
        stream = bool(msg.fields.get("stream"))
        if self.waiting:       # the worker's queue checks itself at submit; add those waiting
            queued = len(self.worker.queue) + len(self.worker.inflight) - 1 + len(self.waiting)
            if queued >= self.config.queue_depth:
                raise LmxError(Code.BUSY, f"request queue is full ({queued} waiting)",
                               queue_depth=queued, max_queue_depth=self.config.queue_depth)

        def finish(result, evicted):
            self.requests.pop(key, None)
            if result.get("context_measured"):
                self._reconcile_context(rec, result["context_measured"])
            if result.get("status") == "ok":
                rec.decodes += 1
                rec.generated_tokens += result.get("generated_tokens", 0)
                rec.last_active = time.time()
                result["kv_swap_evicted"] = evicted
            result = dict(result, agent=rec.agent, broker_ms=round(
                (time.monotonic() - t0) * 1000, 2))
            if rec.context_reset and result.get("status") == "ok":
                result["context_reset"] = True      # said once, on the first reply after it
                rec.context_reset = False
            self._send(identity, msg.id, result)

        def partial(fields):
            self._send(identity, msg.id, dict(fields, status="partial", agent=rec.agent))

        def launch(parked):
            # Say which agent lost its live context for this one (one that had one).
            evicted = next((a for a in parked if self.agents.get(a) and
                            self.agents[a].decodes), None)

            def done(result):
                rec.outstanding -= 1
                rec.last_used = time.monotonic()
                if job.sent_at is not None:
                    result["queue_ms"] = round((job.sent_at - t0) * 1000, 2)
                finish(result, evicted)

            rec.outstanding += 1
            rec.last_used = time.monotonic()
            try:
                job = self._submit("DECODE", {
                    "agent": rec.agent, "prompt": prompt, "n_predict": n_predict,
                    "stream": stream, "max_prompt_tokens": self.config.max_prompt_tokens},
                    done, deadline=deadline, partial=partial if stream else None)
            except LmxError:
                rec.outstanding -= 1
                raise
            self.requests[key] = job

        def fail(err):
            self.requests.pop(key, None)
            finish(err.fields(), None)

        # While any DECODE waits for room, later ones queue behind it (first come, first
        # served): live agents then go idle, so the waiting one cannot starve.
        parked = None if self.waiting else self._ensure_live(rec)
        if parked is None:
            self.requests[key] = self._wait_for_room(rec, launch, fail, deadline)
        else:
            launch(parked)
        return None

    def on_cancel(self, _identity, msg):
        """CANCEL: drop a DECODE that has not started, or stop a running one at its next token.

        The DECODE's own reply says which: CANCELLED, or ok with stopped_by "cancel"."""
        agent, request = msg.fields["agent"], msg.fields["request"]
        job = self.requests.get((agent, request))
        if job in self.waiting:
            self.waiting.remove(job)
            job.fail(LmxError(Code.CANCELLED, "cancelled while it waited for room"))
            return {"agent": agent, "request": request, "cancelled": "queued"}
        where = self.worker.cancel(job) if job is not None else None
        if where is None:
            raise LmxError(Code.UNKNOWN_REQUEST, f"no DECODE {request!r} of agent {agent!r} is "
                           "queued or running")
        if where == "queued":
            job.done(LmxError(Code.CANCELLED, "cancelled before it started").fields())
        return {"agent": agent, "request": request, "cancelled": where}

    def _check_agent_id(self, agent):
        if not cfg.AGENT_ID_RE.match(agent):
            raise LmxError(Code.BAD_REQUEST, "agent id must be 1-64 chars of letters, digits "
                           "and _.:- (starting with a letter or digit)", Reason.BAD_VALUE,
                           field="agent")

    def _check_queue(self):
        if self.worker.state != "ready":
            raise LmxError(Code.WORKER_UNAVAILABLE, f"worker is {self.worker.state}")
        queued = len(self.worker.queue) + len(self.waiting)
        if queued >= self.config.queue_depth:
            raise LmxError(Code.BUSY, "request queue is full", queue_depth=queued,
                           max_queue_depth=self.config.queue_depth)

    def _agent(self, agent):
        rec = self.agents.get(agent)
        if rec is None and agent in self.lost:
            raise LmxError(Code.AGENT_LOST, f"agent {agent!r} was registered but could not be "
                           f"restored after a restart: {self.lost[agent]}")
        if rec is None or rec.state == "leaving":
            raise LmxError(Code.UNKNOWN_AGENT, f"no agent {agent!r} is registered")
        return rec

    def _unbook(self, agent, why):
        """Drop an agent's context booking, and its model's when it was the last user."""
        rec = self.agents.pop(agent, None)
        freed = self.ledger.release(f"agent:{agent}")
        mrec = self.models.get(rec.path) if rec else None
        if mrec is not None:
            mrec.agents.discard(agent)
            if not mrec.agents:
                freed += self.ledger.release(f"model:{mrec.path}")
                del self.models[mrec.path]
        self.journal.drop(agent)
        log.info("admission: released agent=%s bytes=%d (%s)", agent, freed, why)
        return freed

    def _submit(self, verb, fields, done, on_error=None, **job_options):
        try:
            return self.worker.submit(verb, fields, done, time.monotonic(), **job_options)
        except LmxError:
            if on_error:
                on_error()
            raise

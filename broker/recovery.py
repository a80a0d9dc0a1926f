"""A dead or hung worker, a restarted broker: keep every registered agent, rebuild it, and say
what was lost (mixed into Broker)."""
import logging
import time

from lmx.broker.estimate import estimate
from lmx.broker.workerlink import is_alive
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError

log = logging.getLogger("lmx.broker")


class RecoveryMixin:
    """Worker liveness, restarts and journal replay."""

    def _check_worker(self, now):
        wk, state = self.worker, self.worker.state
        if wk.state == "ready":
            dead = wk.process_exited() or not is_alive(wk.last_seen, now, wk.heartbeat_s,
                                                       wk.liveness)
            if dead:
                exited = wk.process_exited()
                if not exited and wk.proc is not None:
                    wk.proc.kill()          # hung, not dead: it must not keep the GPU memory
                    wk.proc.wait()
                self._worker_lost("exited" if exited else "heartbeats stopped")
        elif wk.state == "lost" and self.config.spawn_worker and now >= self._respawn_at:
            wk.restarts += 1
            wk.spawn(self.config.worker_endpoint, self.config.worker_args)
        elif wk.state == "starting" and wk.process_exited():
            self._worker_lost("exited while starting")
        if wk.state != state:
            self._status_cache = None

    def _worker_lost(self, why):
        """Fail every unfinished job with WORKER_LOST; keep the agents and their bookings, to
        be rebuilt on the next worker (from their state on disk where it was parked)."""
        err = LmxError(Code.WORKER_LOST, f"the worker died ({why}) with this request in flight")
        for job in self.worker.fail_all(why):
            job.done(err.fields())
        for rec in self.agents.values():
            rec.state = "restoring"
        self._respawn_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 32.0)

    def _replay_journal(self):
        """After a broker restart: book and rebuild every agent the journal remembers."""
        for agent, entry in list(self.journal.agents.items()):
            if agent in self.agents:
                continue
            try:
                spec = ContextSpec(**entry["spec"])
                est = estimate(entry["model"], spec, self.config.table,
                               self.worker.device.get("kind", "cpu"), self.measured,
                               model_dirs=self.config.model_dirs)
                self._book(agent, entry["model"], est, spec, b"", state="restoring")
            except (LmxError, TypeError, KeyError) as exc:
                self._mark_lost(agent, f"journal replay: {exc}")
        self._restore_agents()

    def _restore_agents(self):
        """Ask the (new) worker to rebuild every agent marked restoring, resuming from disk."""
        for rec in [r for r in self.agents.values() if r.state == "restoring"]:
            def done(result, rec=rec):
                if result.get("status") == "ok":
                    rec.state = "ready"
                    rec.context_reset = not result.get("resumed")
                    if result.get("resumed") and rec.live:   # its state is on disk: parked
                        self.ledger.release(f"agent:{rec.agent}")
                        rec.live = False
                    log.info("recovery: agent=%s %s", rec.agent, "resumed from disk"
                             if result.get("resumed") else "rebuilt; its context was reset")
                else:
                    self._mark_lost(rec.agent, result.get("message", "restore failed"))
            self.worker.submit("REGISTER", {"agent": rec.agent, "path": rec.path,
                                            "spec": rec.spec, "resume": True}, done,
                               time.monotonic(), internal=True)

    def _mark_lost(self, agent, why):
        """An agent that was registered and cannot be restored: say so, never silently."""
        if agent in self.agents:
            self._unbook(agent, f"lost: {why}")
        self.journal.drop(agent)
        self.lost[agent] = why
        log.error("recovery: agent=%s lost: %s", agent, why)

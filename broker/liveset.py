"""Which agents are live: the ledger books live contexts only (mixed into Broker).

An agent is live from REGISTER until the broker parks it, and becomes live again when its next
DECODE is admitted. A context must be made live (a parked agent's DECODE, or with
--admit-by-parking a REGISTER that does not fit) and the bytes are not there: the least
recently used *idle* live agents (nothing queued or running) are parked, their bookings
released, until it fits; the worker runs PARK before any later job, so the bytes are free
before anything is built in them. With --max-live-contexts N, a DECODE also parks idle agents
until at most N are live. When no idle agent can make room, the DECODE waits here (in arrival
order, with its deadline and CANCEL) until a running request finishes; while one waits, every
later DECODE queues behind it, so busy agents go idle and the waiting one cannot starve.
"""
import collections
import logging
import time

from lmx.common.errors import Code, LmxError

log = logging.getLogger("lmx.broker")


class Waiting:
    """A DECODE that waits for room to make its agent live."""

    __slots__ = ("rec", "launch", "fail", "deadline")

    def __init__(self, rec, launch, fail, deadline):
        self.rec, self.launch, self.fail, self.deadline = rec, launch, fail, deadline


class LiveSetMixin:
    """Parking decisions and the DECODEs waiting for room."""

    def _init_liveset(self):
        self.waiting = collections.deque()      # Waiting, in arrival order

    def _plan_room(self, rec, nbytes):
        """The idle live agents (least recently used first) to park so that nbytes more fit
        for rec (None: an agent not registered yet) and the live count stays within
        --max-live-contexts; None if no such set exists."""
        free = self.ledger.max_bytes - self.ledger.allocated_bytes
        live = sum(1 for r in self.agents.values() if r.live) + (
            0 if rec is not None and rec.live else 1)
        limit = self.config.max_live_contexts
        extra = max(live - limit, 0) if limit else 0
        idle = sorted((r for r in self.agents.values() if r.live and r is not rec and
                       r.outstanding == 0 and r.state == "ready"), key=lambda r: r.last_used)
        victims = []
        for victim in idle:
            if free >= nbytes and len(victims) >= extra:
                break
            victims.append(victim)
            free += self.ledger.booked(f"agent:{victim.agent}") or 0
        return victims if free >= nbytes and len(victims) >= extra else None

    def _ensure_live(self, rec):
        """Book rec's context if it is parked, parking idle agents first if needed; return the
        agents parked for it (a list), or None when it has to wait."""
        need = 0 if rec.live else rec.booked_bytes
        victims = self._plan_room(rec, need)
        if victims is None:
            if not rec.live:
                return None
            victims = []        # already live: the count limit waits for an idle agent
        parked = [self._park(v) for v in victims]
        if not rec.live:
            denial = self.ledger.try_reserve(f"agent:{rec.agent}", rec.booked_bytes)
            if denial is not None:          # cannot happen after a plan; never overbook
                log.error("liveset: %s did not fit after parking %s", rec.agent, parked)
                return None
            rec.live = True
        return parked

    def _park(self, victim):
        """Release an idle agent's context booking and tell the worker to park it."""
        victim.live = False
        freed = self.ledger.release(f"agent:{victim.agent}")
        log.info("liveset: parking agent=%s (releases %d bytes)", victim.agent, freed)

        def done(result):
            if result.get("status") != "ok" and victim.agent in self.agents and \
                    not victim.live and result.get("code") not in (Code.UNKNOWN_AGENT,
                                                                   Code.WORKER_LOST):
                # Still live on the worker: book it again, whatever the cap says now.
                log.error("liveset: parking %s failed (%s); booked again", victim.agent,
                          result.get("message"))
                self.ledger.force(f"agent:{victim.agent}", victim.booked_bytes)
                victim.live = True
        self.worker.submit("PARK", {"agent": victim.agent}, done, time.monotonic(),
                           internal=True)
        return victim.agent

    def _wait_for_room(self, rec, launch, fail, deadline):
        entry = Waiting(rec, launch, fail, deadline)
        self.waiting.append(entry)
        log.info("liveset: DECODE of %s waits for room (%d waiting)", rec.agent,
                 len(self.waiting))
        return entry

    def _retry_waiting(self):
        """Launch waiting DECODEs in arrival order while their agents can be made live."""
        while self.waiting:
            entry = self.waiting[0]
            if entry.rec.agent not in self.agents:
                self.waiting.popleft()
                entry.fail(LmxError(Code.CANCELLED, "the agent was unregistered"))
                continue
            parked = self._ensure_live(entry.rec)
            if parked is None:
                return
            self.waiting.popleft()
            try:
                entry.launch(parked)
            except LmxError as err:
                entry.fail(err)

    def _expire_waiting(self, now):
        for entry in [w for w in self.waiting if w.deadline is not None and w.deadline <= now]:
            self.waiting.remove(entry)
            self._status_cache = None
            entry.fail(LmxError(Code.DEADLINE, "the deadline passed while the request waited "
                                "for room to make its agent live"))

    def _drop_waiting(self, rec, why):
        for entry in [w for w in self.waiting if w.rec is rec]:
            self.waiting.remove(entry)
            entry.fail(LmxError(Code.CANCELLED, why))

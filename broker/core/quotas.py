"""Quotas per client (pure): who a request's key names, and whether the client may have more.

A client is a [[clients]] entry of the quotas file (``lmx-broker --quotas``, common/quotas.py),
named by the ``key`` a REGISTER, DECODE or CHAT carries; a request without a key belongs to
the default client ([default]). An agent belongs to the client that registered it, and every
later request for it counts against that client. What each quota counts:

- ``max_agents``: the client's registered agents, live or parked (registering ones included);
- ``max_booked_bytes``: the seat bytes (KV) of those agents, live or parked: what the ledger
  books for each while it is live, so a parked agent coming back never takes its client past
  the limit. Weights and group compute buffers are shared between clients and not charged;
- ``max_n_ctx``: the n_ctx one REGISTER asks for (its use: the largest of the client's agents);
- ``tokens_per_minute``: prompt + generated tokens of the client's finished DECODEs and CHATs
  over the last WINDOW_S seconds. A DECODE or CHAT is admitted while that sum is below the
  limit; one that is running is never cut off, and counts when it ends.

REGISTER is checked before anything is booked (booking.start_register), a DECODE or CHAT when
it reaches the head of its agent's lane. A refusal is ``QUOTA`` with the numbers.
"""
import collections
import math

from lmx.broker.core import seats
from lmx.common.errors import Code, LmxError, Reason
from lmx.common.quotas import DEFAULT_CLIENT, WINDOW_S
from lmx.common.replies import ClientQuota

_REASONS = {"max_agents": Reason.MAX_AGENTS, "max_booked_bytes": Reason.MAX_BOOKED_BYTES,
            "max_n_ctx": Reason.MAX_N_CTX, "tokens_per_minute": Reason.TOKENS_PER_MINUTE}


class QuotaBook:
    """The clients' limits (from the file) and their token windows."""

    def __init__(self, config=None):
        self.config = config
        self.windows = collections.defaultdict(collections.deque)   # client -> (t, tokens)

    @property
    def on(self):
        return self.config is not None

    def client(self, key):
        """The client a request's key names (DEFAULT_CLIENT without one, or without a quotas
        file); FORBIDDEN for a key no client has."""
        if not self.on or key is None:
            return DEFAULT_CLIENT
        found = self.config.client_for(key)
        if found is None:
            raise LmxError(Code.FORBIDDEN, "this key belongs to no client of the broker's "
                           "quotas file", Reason.UNKNOWN_CLIENT_KEY, field="key")
        return found.name

    def check_register(self, core, client, n_ctx, seat_bytes):
        """QUOTA if one more agent of n_ctx with seat_bytes would take client past a limit."""
        if not self.on:
            return
        limits, use = self.config.limits(client), self.use(core, client, core.now)
        if limits.max_agents is not None and use["max_agents"] + 1 > limits.max_agents:
            raise _refuse(client, "max_agents", limits.max_agents, use["max_agents"], 1, (
                f"client {client!r} has {use['max_agents']} agents, its max_agents quota is "
                f"{limits.max_agents}; unregister one first"))
        if limits.max_n_ctx is not None and n_ctx > limits.max_n_ctx:
            raise _refuse(client, "max_n_ctx", limits.max_n_ctx, n_ctx, n_ctx, (
                f"n_ctx {n_ctx} is over client {client!r}'s max_n_ctx quota of "
                f"{limits.max_n_ctx}"))
        booked, most = use["max_booked_bytes"], limits.max_booked_bytes
        if most is not None and booked + seat_bytes > most:
            raise _refuse(client, "max_booked_bytes", most, booked, seat_bytes, (
                f"client {client!r} books {booked} bytes of seats and this agent needs "
                f"{seat_bytes} more, over its max_booked_bytes quota of {most}; unregister "
                "one of its agents first"))

    def check_run(self, client, now):
        """QUOTA while the client's tokens of the last minute are at its limit."""
        limit = self.config.limits(client).tokens_per_minute if self.on else None
        if limit is None:
            return
        window = self._prune(client, now)
        used = sum(n for _, n in window)
        if used < limit:
            return
        wait, left = None, used
        for t, n in window:            # oldest first: when does enough of it leave?
            left -= n
            if left < limit:
                wait = math.ceil(max(t + WINDOW_S - now, 0.0) * 10) / 10
                break
        when = f"retry in {wait:g} s" if wait is not None else "a limit of 0 admits none"
        raise _refuse(client, "tokens_per_minute", limit, used, None, (
            f"client {client!r} used {used} tokens in the last {WINDOW_S:g} s, its "
            f"tokens_per_minute quota is {limit}; {when}"), wait)

    def spend(self, client, tokens, now):
        """A DECODE or CHAT of client finished with this many prompt + generated tokens."""
        if self.on and tokens and self.config.limits(client).tokens_per_minute is not None:
            self._prune(client, now).append((now, tokens))

    def _prune(self, client, now):
        window = self.windows[client]
        while window and window[0][0] <= now - WINDOW_S:
            window.popleft()
        return window

    def use(self, core, client, now):
        """{quota: what the client uses now}."""
        return self._uses(core, now).get(client) or self._use_of([], (), now)

    def view(self, core, now):
        """STATUS's quotas: {client: ClientQuota(limits, use)} as maps, the default first."""
        if not self.on:
            return {}
        uses = self._uses(core, now)
        return {name: ClientQuota(self.config.limits(name).as_dict(),
                                  uses.get(name) or self._use_of([], (), now)).to_wire()
                for name in self.config.names()}

    def _uses(self, core, now):
        """{client: use} in one pass over the agents; a REGISTER waiting for room counts as
        the agent it will be. Reads only (the metrics call it from their thread)."""
        mine = collections.defaultdict(list)       # client -> [(seat bytes, n_ctx)]
        for a in list(core.agents.values()):
            mine[a.client].append((a.booked_bytes, a.n_ctx))
        for op in list(core.room):
            if op.verb == "REGISTER" and op.agent not in core.agents and op.estimate:
                mine[op.fields.get("client", DEFAULT_CLIENT)].append(
                    (seats.split(op.estimate)[0], op.fields["spec"].n_ctx))
        return {client: self._use_of(agents, self.windows.get(client, ()), now)
                for client, agents in list(mine.items()) + [
                    (c, []) for c in list(self.windows) if c not in mine]}

    @staticmethod
    def _use_of(agents, window, now):
        return {"max_agents": len(agents), "max_booked_bytes": sum(b for b, _ in agents),
                "max_n_ctx": max((n for _, n in agents), default=0),
                "tokens_per_minute": sum(n for t, n in list(window) if t > now - WINDOW_S)}


def _refuse(client, quota, limit, use, requested, message, retry_after_s=None):
    """QUOTA with the numbers: which quota, its limit, the use, what was asked for, and when
    to retry (None: not by waiting)."""
    return LmxError(Code.QUOTA, message, _REASONS[quota], client=client, quota=quota,
                    limit=limit, use=use, requested=requested, retry_after_s=retry_after_s)


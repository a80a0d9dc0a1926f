"""Conversations as lmx agents: one agent per session, registered on first use, reused after,
and UNREGISTERed once idle for the configured timeout.

A session is named by the X-Lmx-Session header, else the request's `user`, else it is the
API key's one session for that model. Its agent id is derived, never taken from the client:
`PREFIX-KIND-MODEL-HASH` (KIND c for chat, t for /v1/completions; HASH a sha256 of key, model,
kind and session name), which always satisfies the broker's agent-id rule.
"""
import asyncio
import hashlib
import logging
import re
import time

from lmx.common.errors import Code, Reason
from lmx.gateway import errors

log = logging.getLogger("lmx.gateway")


def agent_id(prefix, key_name, alias, kind, session):
    """The agent id of a session (letters, digits and -_, at most 64 characters)."""
    slug = re.sub(r"[^A-Za-z0-9_]", "_", alias)[:20]
    digest = hashlib.sha256("\0".join((key_name, alias, kind, session)).encode()).hexdigest()
    return f"{prefix}-{kind}-{slug}-{digest[:20]}"


class Session:
    """One agent the gateway registered (or found registered): its use and idleness."""

    def __init__(self, agent, alias, now, key=None):
        self.agent, self.alias = agent, alias
        self.key = key       # the quotas client key sent with its REGISTER (None: default)
        self.ready = asyncio.get_running_loop().create_future()
        self.inflight = 0
        self.last_used = now
        self.text = None     # /v1/completions: the text its KV holds ("" fresh; None unknown)


class Sessions:
    """The gateway's agents, by agent id."""

    def __init__(self, link, cfg, clock=time.monotonic):
        self.link, self.cfg, self.clock = link, cfg, clock
        self.table = {}
        self.registered = 0
        self.unregistered = 0

    async def acquire(self, agent, entry, key=None):
        """The session of agent, registered on the broker (with the quotas client key, if
        any); counts as in use until release(). Raises HttpError when REGISTER fails."""
        while True:
            session = self.table.get(agent)
            if session is None:
                return await self._first(agent, entry, key)
            session.inflight += 1
            try:
                await asyncio.shield(session.ready)
                return session
            except asyncio.CancelledError:
                session.inflight -= 1
                if not session.ready.cancelled():
                    raise                   # this request itself was cancelled
            except BaseException:
                session.inflight -= 1
                raise
            # the request registering it went away first: try again

    async def _first(self, agent, entry, key):
        """Create and register a session; waiters share the outcome."""
        session = self.table[agent] = Session(agent, entry.alias, self.clock(), key)
        session.inflight += 1
        try:
            await self.register(session, entry)
        except BaseException as exc:
            if self.table.get(agent) is session:
                del self.table[agent]
            if isinstance(exc, asyncio.CancelledError):
                session.ready.cancel()
            else:
                session.ready.set_exception(exc)
                session.ready.exception()            # retrieved: no "never retrieved" log
            raise
        session.ready.set_result(True)
        return session

    def release(self, session):
        """The request on this session ended."""
        session.inflight -= 1
        session.last_used = self.clock()

    def forget(self, session):
        """The broker no longer knows the agent (UNKNOWN_AGENT): register anew next time."""
        if self.table.get(session.agent) is session:
            del self.table[session.agent]

    async def register(self, session, entry):
        """REGISTER the session's agent (adopting one already registered); HttpError if
        refused."""
        timeout = self.cfg.request_timeout_s
        keyed = {"key": session.key} if session.key is not None else {}
        for attempt in (0, 1):
            reply = await self.link.call("REGISTER", timeout, agent=session.agent,
                                         model=entry.model, **entry.context, **keyed)
            status, code = reply.get("status"), reply.get("code")
            if status == "ok":
                session.text = ""
                self.registered += 1
                log.info("gateway: registered %s on %s", session.agent, entry.model)
                return
            if code == Code.AGENT_EXISTS:         # left by an earlier gateway: adopt it
                log.info("gateway: adopted %s (already registered)", session.agent)
                return
            if code == Code.LIMIT and reply.get("reason") == Reason.AGENTS_PER_CLIENT and \
                    attempt == 0 and await self.evict_one():
                continue
            if code == Code.QUOTA and reply.get("reason") == Reason.MAX_AGENTS and \
                    attempt == 0 and await self.evict_one(same_key=session):
                continue
            if code == Code.MODEL_ERROR and reply.get("reason") in (Reason.UNKNOWN_KEY,
                                                                    Reason.NOT_FOUND):
                log.error("gateway: model %s (%s) is not loadable: %s", entry.alias,
                          entry.model, reply.get("message"))
            raise errors.from_reply(reply, self.cfg.retry_after_s)

    async def unregister(self, session):
        """UNREGISTER one session's agent (already out of the table)."""
        reply = await self.link.call("UNREGISTER", self.cfg.request_timeout_s,
                                     agent=session.agent)
        self.unregistered += reply.get("status") == "ok"
        log.info("gateway: unregistered %s (%s)", session.agent,
                 reply.get("status") if reply.get("status") == "ok" else reply.get("code"))

    def _idle(self, older_than):
        return [s for s in self.table.values() if s.inflight == 0 and s.ready.done()
                and not s.ready.exception() and s.last_used <= older_than]

    async def evict_one(self, same_key=None):
        """UNREGISTER the least recently used idle session (the broker's per-client agent
        limit was reached; same_key: a quotas client's max_agents, so one of that session's
        client); False when none is idle."""
        idle = sorted((s for s in self._idle(self.clock()) if same_key is None or
                       (s.key == same_key.key and s is not same_key)),
                      key=lambda s: s.last_used)
        if not idle:
            return False
        del self.table[idle[0].agent]
        await self.unregister(idle[0])
        return True

    async def reap_forever(self):
        """UNREGISTER sessions idle for cfg.idle_timeout_s, checking a few times per
        timeout."""
        every = min(max(self.cfg.idle_timeout_s / 4, 0.1), 5.0)
        while True:
            await asyncio.sleep(every)
            for session in self._idle(self.clock() - self.cfg.idle_timeout_s):
                if self.table.get(session.agent) is session and session.inflight == 0:
                    del self.table[session.agent]
                    await self.unregister(session)

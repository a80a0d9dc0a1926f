"""The gateway's HTTP side: a Starlette app whose handlers turn OpenAI requests into broker
requests on the one BrokerLink, and replies back into OpenAI JSON or server-sent events.

    POST /v1/chat/completions  -> CHAT on the session's agent (streamed: CHAT stream=true)
    POST /v1/completions       -> DECODE on the session's text agent (greedy, streamed inside)
    GET  /v1/models[/{id}]     -> the config's models this key may use
    GET  /health               -> STATUS reachable?
"""
import asyncio
import contextlib
import json
import logging
import time

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmx.common.errors import Code, LmxError
from lmx.gateway import errors, translate
from lmx.gateway.completions import CompletionsMixin
from lmx.gateway.errors import HttpError
from lmx.gateway.link import BrokerLink, gateway_error
from lmx.gateway.sessions import Sessions, agent_id
from lmx.gateway.translate import DONE, PING_S, sse

log = logging.getLogger("lmx.gateway")

SESSION_HEADER = "x-lmx-session"
MAX_SESSION_CHARS = 256
HEALTH_TIMEOUT_S = 2.0


class ClientGone(Exception):
    """The HTTP client disconnected before its reply was ready."""


async def disconnected(request):
    """Return once the client has gone (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Gateway(CompletionsMixin):
    """The state behind the routes: config, the broker link, the sessions."""

    def __init__(self, cfg, endpoint, curve=None):
        self.cfg = cfg
        self.link = BrokerLink(endpoint, curve)
        self.sessions = Sessions(self.link, cfg)
        self.created = int(time.time())
        self._reaper = None

    async def startup(self):
        """Start the link's tasks and the idle reaper."""
        self.link.start()
        self._reaper = asyncio.get_running_loop().create_task(self.sessions.reap_forever())

    async def shutdown(self):
        """Stop the reaper and close the link (agents stay registered: sessions outlive a
        gateway restart)."""
        self._reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reaper
        await self.link.close()

    # -- access ---------------------------------------------------------------------------

    def auth(self, request):
        """The request's ApiKey (None when the config has no keys); 401 otherwise."""
        if not self.cfg.keys:
            return None
        key = self.cfg.key_for(_bearer(request))
        if key is None:
            raise HttpError(401, "Incorrect API key provided (send Authorization: Bearer "
                            "KEY with a key from the gateway's config).", param=None,
                            code="invalid_api_key")
        return key

    @staticmethod
    def broker_key(request, key):
        """The key the broker gets with REGISTER, CHAT and DECODE: the caller's own when it is
        a quotas client's (its quota applies), else none (the broker's default client)."""
        return _bearer(request) if key is not None and key.forward else None

    async def read_json(self, request):
        """The request body as a JSON object, within the size limit."""
        limit = self.cfg.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise _too_large(int(length), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except ValueError as exc:
            raise HttpError(400, f"the body is not valid JSON: {exc}", code="invalid_json") \
                from None
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def entry(self, body, key):
        """The ModelEntry the request names (404 model_not_found if absent or not allowed)."""
        alias = body.get("model")
        if not isinstance(alias, str) or not alias:
            raise errors.bad_param("model", "model is required", "missing_required_parameter")
        entry = self.cfg.models.get(alias)
        if entry is None or (key is not None and not key.allows(alias)):
            raise errors.model_not_found(alias)
        return entry

    def agent_for(self, request, body, key, entry, kind):
        """The agent id of the request's session (header, else user, else per key+model)."""
        name = request.headers.get(SESSION_HEADER)
        if name:
            if len(name) > MAX_SESSION_CHARS:
                raise HttpError(400, f"{SESSION_HEADER} is longer than {MAX_SESSION_CHARS} "
                                "characters", code="invalid_value")
            name = "h:" + name
        elif isinstance(body.get("user"), str) and body["user"]:
            name = "u:" + body["user"]
        else:
            name = "k"
        return agent_id(self.cfg.agent_prefix, key.name if key else "", entry.alias, kind,
                        name)

    # -- broker round trips ---------------------------------------------------------------

    async def wait_reply(self, request, pending):
        """The next reply of pending, or ClientGone (the request CANCELled) if the HTTP
        client disconnects first."""
        try:
            return await self.watched(request, self.link.next_reply(
                pending, self.cfg.request_timeout_s))
        except BaseException:
            self.link.cancel(pending)
            raise

    async def watched(self, request, coro):
        """Await coro unless the HTTP client disconnects first (then it is cancelled, which
        CANCELs its request at the broker, and ClientGone is raised)."""
        work = asyncio.ensure_future(coro)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
        if work.cancelled():
            raise ClientGone()
        return work.result()

    async def begin(self, request, agent, entry, verb, fields, renames=None):
        """Acquire the session, send the request, wait for its first reply (partial or
        final). Returns (session, pending, first reply); an error reply raises HttpError
        (UNKNOWN_AGENT: the agent is registered anew and the request sent once more)."""
        for attempt in (0, 1):
            session = await self.sessions.acquire(agent, entry, fields.get("key"))
            try:
                pending = self.link.open(verb, agent, **fields)
                first = await self.wait_reply(request, pending)
            except LmxError as err:                      # no broker connected
                self.sessions.release(session)
                raise errors.from_reply(gateway_error(err.code, err.message),
                                        self.cfg.retry_after_s) from None
            except BaseException:
                self.sessions.release(session)
                raise
            if first.get("status") != "error":
                return session, pending, first
            self.sessions.release(session)
            if first.get("code") == Code.UNKNOWN_AGENT and attempt == 0:
                self.sessions.forget(session)
                continue
            raise errors.from_reply(first, self.cfg.retry_after_s, renames)

    # -- routes ---------------------------------------------------------------------------

    async def chat(self, request):
        """POST /v1/chat/completions."""
        key = self.auth(request)
        body = await self.read_json(request)
        entry = self.entry(body, key)
        fields, renames, opts = translate.chat_fields(body, self.cfg.max_messages)
        if opts["stream"]:
            fields["stream"] = True
        if self.broker_key(request, key) is not None:
            fields["key"] = self.broker_key(request, key)
        agent = self.agent_for(request, body, key, entry, "c")
        session, pending, first = await self.begin(request, agent, entry, "CHAT", fields,
                                                   renames)
        rid, headers = translate.new_id("chatcmpl"), {"X-Lmx-Agent": agent}
        if opts["stream"]:
            maker = translate.ChunkMaker(rid, entry.alias, opts["include_usage"])
            end = _Ending(self, session, pending)
            # the background task ends the request even if the stream never started
            return EventSourceResponse(self._chat_events(end, first, maker, opts),
                                       headers=headers, ping=PING_S,
                                       background=BackgroundTask(end))
        self.sessions.release(session)
        return JSONResponse(translate.chat_completion(
            first, rid, entry.alias, int(time.time()), opts["parallel_tool_calls"]),
            headers=headers)

    async def _chat_events(self, end, first, maker, opts):
        """The SSE events of a streamed chat; CANCELs the request if the client goes."""
        try:
            yield sse(maker.first())
            reply = first
            while reply.get("status") == "partial":
                # tokens that queued up while the last event was sent go out as one event
                delta, more = reply.get("delta") or "", self.link.ready_replies(end.pending)
                if more and more[-1].get("status") != "partial":
                    reply = more.pop()
                delta += "".join(r.get("delta") or "" for r in more)
                if delta:
                    yield sse(maker.text(delta))
                if reply.get("status") == "partial":
                    reply = await self.link.next_reply(end.pending, self.cfg.request_timeout_s)
            if reply.get("status") == "ok":
                for chunk in maker.ending(reply, opts["parallel_tool_calls"]):
                    yield sse(chunk)
            else:
                yield sse(errors.from_reply(reply, self.cfg.retry_after_s).body())
            yield DONE
        finally:
            end.end()

    async def models(self, request):
        """GET /v1/models."""
        key = self.auth(request)
        return JSONResponse({"object": "list", "data": [
            self._model(alias) for alias in self.cfg.models
            if key is None or key.allows(alias)]})

    async def model(self, request):
        """GET /v1/models/{model}."""
        key = self.auth(request)
        alias = request.path_params["model"]
        if alias not in self.cfg.models or (key is not None and not key.allows(alias)):
            raise errors.model_not_found(alias)
        return JSONResponse(self._model(alias))

    def _model(self, alias):
        return {"id": alias, "object": "model", "created": self.created, "owned_by": "lmx"}

    async def health(self, request):
        """GET /health: 200 when the broker answers STATUS, else 503."""
        reply = await self.link.call("STATUS", HEALTH_TIMEOUT_S)
        ok = reply.get("status") == "ok"
        body = {"status": "ok" if ok else "unavailable", "broker": self.link.endpoint,
                "sessions": len(self.sessions.table),
                "inflight": sum(s.inflight for s in self.sessions.table.values()),
                "registered": self.sessions.registered,
                "unregistered": self.sessions.unregistered}
        if not ok:
            body["error"] = reply.get("message")
        return JSONResponse(body, status_code=200 if ok else 503)


class _Ending:
    """Ends a streamed request once: CANCEL if it still runs, release its session."""

    def __init__(self, gw, session, pending):
        self.gw, self.session, self.pending = gw, session, pending

    async def __call__(self):
        """(async: a BackgroundTask runs a plain function in a thread)"""
        self.end()

    def end(self):
        """End it now (idempotent)."""
        if self.session is not None:
            self.gw.link.cancel(self.pending)       # a no-op once the final reply came
            self.gw.sessions.release(self.session)
            self.session = None


def _bearer(request):
    """The token of an Authorization: Bearer header ("" without one)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _too_large(size, limit):
    return HttpError(413, f"request body of {size} bytes is over this gateway's limit of "
                     f"{limit}", code="request_too_large")


async def _http_error(request, exc):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _starlette_error(request, exc):
    err = HttpError(exc.status_code, exc.detail or "error", code="not_found" if
                    exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code)


async def _client_gone(request, exc):
    return Response(status_code=499)


def create_app(cfg, endpoint, curve=None):
    """The ASGI app for one broker endpoint."""
    gw = Gateway(cfg, endpoint, curve)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gw.startup()
        yield
        await gw.shutdown()

    middleware = []
    if cfg.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins),
                                     allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type",
                                                    "X-Lmx-Session"]))
    app = Starlette(routes=[
        Route("/v1/chat/completions", gw.chat, methods=["POST"]),
        Route("/v1/completions", gw.completions, methods=["POST"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gw.model, methods=["GET"]),
        Route("/health", gw.health, methods=["GET"]),
    ], middleware=middleware, lifespan=lifespan, exception_handlers={
        HttpError: _http_error, HTTPException: _starlette_error, ClientGone: _client_gone})
    app.state.gateway = gw
    return app

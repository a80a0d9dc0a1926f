"""POST /v1/completions: a raw prompt, no chat template, on DECODE (mixed into Gateway).

DECODE continues an agent's text, and is greedy. The gateway gives it OpenAI's stateless
meaning: each session has its own text agent, and the gateway remembers the text that agent's
KV holds. A prompt that extends that text sends only the new part (the held prefix is reused);
any other prompt starts the agent over (UNREGISTER + REGISTER) and sends it whole. temperature,
top_p and seed are accepted and ignored (DECODE is greedy). Stop strings are applied by the
gateway on the streamed tokens; the DECODE is CANCELled at the first one.
"""
import asyncio
import time

from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse

from lmx.gateway import errors, translate
from lmx.gateway.translate import DONE, PING_S, sse


def _lock(session):
    if not hasattr(session, "lock"):
        session.lock = asyncio.Lock()
    return session.lock


class CompletionsMixin:
    """The /v1/completions route of Gateway."""

    async def completions(self, request):
        """POST /v1/completions."""
        key = self.auth(request)
        body = await self.read_json(request)
        entry = self.entry(body, key)
        prompt, n_predict, stops, opts = translate.completion_fields(body)
        agent = self.agent_for(request, body, key, entry, "t")
        token = self.broker_key(request, key)
        session = fitted = await self.sessions.acquire(agent, entry, token)
        lock, locked = _lock(session), False
        try:
            await lock.acquire()
            locked = True
            send = await self._fit(session, entry, prompt)
        except BaseException:
            if locked:
                lock.release()
            self.sessions.release(session)
            raise
        self.sessions.release(session)          # begin() acquires it again
        fields = {"prompt": send, "n_predict": n_predict, "stream": True}
        if token is not None:
            fields["key"] = token
        try:
            session, pending, first = await self.begin(request, agent, entry, "DECODE",
                                                       fields, {"n_predict": "max_tokens"})
        except BaseException:
            session.text = None
            lock.release()
            raise
        if session is not fitted and send != prompt:
            session.text = None      # registered anew (UNKNOWN_AGENT) under a continuation
        rid = translate.new_id("cmpl")
        run = _TextRun(self, session, pending, first, prompt, stops, lock)
        headers = {"X-Lmx-Agent": agent}
        if opts["stream"]:
            return EventSourceResponse(run.events(rid, entry.alias, opts["include_usage"]),
                                       headers=headers, ping=PING_S,
                                       background=BackgroundTask(run.aclose))
        try:
            text, finish, use, err = await self.watched(request, run.collect())
        finally:
            run.close()
        if err is not None:
            raise errors.from_reply(err, self.cfg.retry_after_s)
        return JSONResponse(translate.text_completion(rid, entry.alias, int(time.time()),
                                                      text, finish, use), headers=headers)

    async def _fit(self, session, entry, prompt):
        """What to send for prompt: the new part if the agent's text is its prefix, else the
        whole prompt after starting the agent over."""
        held = session.text
        if held and prompt.startswith(held) and len(prompt) > len(held):
            return prompt[len(held):]
        if held != "":
            await self.sessions.unregister(session)
            await self.sessions.register(session, entry)
        session.text = ""
        return prompt


class _TextRun:
    """One streamed DECODE read to its end, with stop strings applied."""

    def __init__(self, gw, session, pending, first, prompt, stops, lock):
        self.gw, self.session, self.pending, self.first = gw, session, pending, first
        self.prompt, self.scan, self.lock = prompt, translate.StopScanner(stops), lock
        self.stopping = False

    async def pieces(self):
        """("text", delta)..., then ("end", (finish_reason, usage)) or ("error", reply)."""
        gw, out, reply = self.gw, [], self.first
        try:
            while reply.get("status") == "partial":
                piece = self.scan.feed(reply.get("text", ""))
                if piece:
                    out.append(piece)
                    yield "text", piece
                if self.scan.hit and not self.stopping:
                    self.stopping = True
                    gw.link.request_cancel(self.pending)
                reply = await gw.link.next_reply(self.pending, gw.cfg.request_timeout_s)
            if reply.get("status") != "ok":
                self.session.text = None
                yield "error", reply
                return
            tail = self.scan.flush()
            if tail:
                out.append(tail)
                yield "text", tail
            yield "end", (self._finish(reply, "".join(out)), self._usage(reply))
        finally:
            self.close()

    async def collect(self):
        """(text, finish_reason, usage, error reply or None) of the whole run."""
        text, finish, use, err = "", "stop", None, None
        async for kind, value in self.pieces():
            if kind == "text":
                text += value
            elif kind == "end":
                finish, use = value
            else:
                err = value
        return text, finish, use, err

    async def aclose(self):
        """close() for a BackgroundTask (which runs a plain function in a thread)."""
        self.close()

    def close(self):
        """CANCEL the DECODE if it still runs, release the session (once)."""
        if self.lock is None:
            return
        self.gw.link.cancel(self.pending)
        self.gw.sessions.release(self.session)
        self.lock.release()
        self.lock = None

    def _finish(self, reply, text):
        """The finish reason, and what the agent's KV holds now (None: unknown)."""
        clean = not (self.scan.hit or reply.get("stopped_on_eos") or reply.get("stopped_by"))
        self.session.text = self.prompt + text if clean else None
        if reply.get("stopped_on_eos") or self.scan.hit:
            return "stop"
        return "length"

    @staticmethod
    def _usage(reply):
        done = reply.get("generated_tokens", 0)
        whole = max(reply.get("n_past", 0) - done, reply.get("prompt_tokens", 0))
        return {"prompt_tokens": whole, "completion_tokens": done, "total_tokens": whole + done,
                "prompt_tokens_details": {"cached_tokens": whole - reply.get("prompt_tokens",
                                                                             0)}}

    async def events(self, rid, alias, include_usage):
        """The SSE events of a streamed completion."""
        created = int(time.time())

        def chunk(text, finish=None):
            c = translate.text_completion(rid, alias, created, text, finish, None)
            if not include_usage:
                del c["usage"]
            return c

        try:
            async for kind, value in self.pieces():
                if kind == "text":
                    yield sse(chunk(value))
                elif kind == "end":
                    yield sse(chunk("", value[0]))
                    if include_usage:
                        yield sse(dict(chunk("", None), choices=[], usage=value[1]))
                else:
                    yield sse(errors.from_reply(value, self.gw.cfg.retry_after_s).body())
            yield DONE
        finally:
            self.close()

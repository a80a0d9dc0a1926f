"""Broker error replies as OpenAI errors (pure): an HTTP status, headers, and the body

    {"error": {"message": "...", "type": "...", "param": "...", "code": "..."}}

    broker code                         HTTP  type / code
    VRAM_LEDGER_DENY, LIMIT/PARK_BUDGET  503  server_error / <code lowercased>, Retry-After
    LIMIT/AGENTS_PER_CLIENT              503  (the gateway first frees an idle session)
    WORKER_*, AGENT_LOST, STATE_LOST     503  server_error, Retry-After
    BROKER_UNREACHABLE (the gateway's)   503  server_error / broker_unreachable, Retry-After
    BUSY                                 429  rate_limit_error / rate_limit_exceeded
    QUOTA                                429  rate_limit_error / quota_exceeded, Retry-After
                                              when the broker knows one (retry_after_s)
    CONTEXT_FULL, LIMIT/PROMPT_TOKENS    400  invalid_request_error / context_length_exceeded
    MODEL_ERROR UNKNOWN_KEY|NOT_FOUND    404  invalid_request_error / model_not_found
    BAD_REQUEST                          400  invalid_request_error, param = the broker's field
    NO_CHAT_TEMPLATE                     400  invalid_request_error / no_chat_template
    DEADLINE, GATEWAY_TIMEOUT            504  server_error / timeout
    anything else                        500  server_error / <code lowercased>
"""
import math

from lmx.common.errors import Code, Reason
from lmx.gateway.link import TIMEOUT, UNREACHABLE

INVALID = "invalid_request_error"
SERVER = "server_error"


class HttpError(Exception):
    """An error the gateway answers in OpenAI's shape."""

    def __init__(self, status, message, type_=INVALID, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self):
        """The JSON body: {"error": {...}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _gib(n):
    return f"{n / (1 << 30):.2f} GiB" if isinstance(n, int) else "?"


def ledger_message(reply):
    """A ledger denial in words, with the numbers."""
    req, alloc = reply.get("requested_bytes"), reply.get("ledger_allocated_bytes")
    cap = reply.get("ledger_max_bytes")
    return (f"lmx admission refused ({reply.get('reason') or reply.get('code')}): "
            f"{reply.get('message', '')} [requested {_gib(req)} ({req} bytes), allocated "
            f"{_gib(alloc)} ({alloc} bytes) of a cap of {_gib(cap)} ({cap} bytes)]")


def context_message(reply):
    """CONTEXT_FULL in the words OpenAI uses (agent harnesses match on them)."""
    n_ctx, prompt, most = reply.get("n_ctx"), reply.get("prompt_tokens"), \
        reply.get("max_tokens")
    if n_ctx is None or prompt is None:
        return reply.get("message", "context length exceeded")
    return (f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{prompt + (most or 0)} tokens ({prompt} in the messages, {most} in the "
            f"completion). Please reduce the length of the messages or completion.")


def from_reply(reply, retry_after=5, renames=None):
    """The HttpError for a broker error reply (renames: broker field -> request param)."""
    code, reason = reply.get("code"), reply.get("reason")
    message = reply.get("message", "")
    retry = {"Retry-After": str(retry_after)}
    if code == Code.VRAM_LEDGER_DENY or (code == Code.LIMIT and reason in (
            Reason.PARK_BUDGET, Reason.AGENTS_PER_CLIENT)):
        return HttpError(503, ledger_message(reply) if code == Code.VRAM_LEDGER_DENY else
                         f"lmx {code}/{reason}: {message}", SERVER, None,
                         f"{code}/{reason}".lower(), retry)
    if code in (Code.WORKER_UNAVAILABLE, Code.WORKER_LOST, Code.AGENT_LOST, Code.STATE_LOST,
                UNREACHABLE):
        return HttpError(503, f"lmx {code}: {message}", SERVER, None, code.lower(), retry)
    if code == Code.BUSY:
        return HttpError(429, f"lmx broker queue is full: {message}", "rate_limit_error",
                         None, "rate_limit_exceeded", {"Retry-After": "1"})
    if code == Code.QUOTA:
        return quota_error(reply)
    if code == Code.CONTEXT_FULL or (code == Code.LIMIT and reason == Reason.PROMPT_TOKENS):
        return HttpError(400, context_message(reply) if code == Code.CONTEXT_FULL else
                         message, INVALID, "messages", "context_length_exceeded")
    if code == Code.MODEL_ERROR and reason in (Reason.UNKNOWN_KEY, Reason.NOT_FOUND):
        return HttpError(404, f"the model's file is not available to the broker: {message}",
                         INVALID, "model", "model_not_found")
    if code == Code.BAD_REQUEST:
        field = reply.get("field")
        param = (renames or {}).get(field, field)
        return HttpError(400, message, INVALID, param, (reason or "invalid_value").lower())
    if code == Code.NO_CHAT_TEMPLATE:
        return HttpError(400, f"{message} (give the broker --chat-template MODEL=chatml, or "
                         "use /v1/completions)", INVALID, "model", "no_chat_template")
    if code in (Code.DEADLINE, TIMEOUT):
        return HttpError(504, f"lmx {code}: {message}", SERVER, None, "timeout")
    if code == Code.FRAME_TOO_LARGE:
        return HttpError(413, message, INVALID, None, "request_too_large")
    return HttpError(500, f"lmx {code}/{reason}: {message}", SERVER, None,
                     str(code).lower())


def quota_error(reply):
    """429 for a client over one of its quotas, with the numbers (and when to retry)."""
    retry = reply.get("retry_after_s")
    headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else {}
    return HttpError(429, f"lmx quota {reply.get('quota')} of client {reply.get('client')!r} "
                     f"exceeded (limit {reply.get('limit')}, use {reply.get('use')}): "
                     f"{reply.get('message', '')}", "rate_limit_error", None, "quota_exceeded",
                     headers)


def model_not_found(alias):
    """404 for a model the config does not offer (or the key may not use)."""
    return HttpError(404, f"The model '{alias}' does not exist or you do not have access to "
                     "it.", INVALID, "model", "model_not_found")


def bad_param(param, message, code="invalid_value"):
    """400 naming the request's parameter."""
    return HttpError(400, message, INVALID, param, code)

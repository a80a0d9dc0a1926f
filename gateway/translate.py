"""OpenAI Chat Completions and Completions <-> lmx CHAT and DECODE (pure: dicts in, dicts out).

Request fields passed to CHAT as they are: temperature, top_p, seed, stop, presence_penalty,
frequency_penalty, response_format, tools, tool_choice, and lmx's own top_k, min_p,
repeat_penalty and truncate (send them with the SDK's extra_body). max_completion_tokens (or
the older max_tokens) becomes max_tokens. n must be 1. parallel_tool_calls: false keeps only
the first call. logprobs are not offered (400). Anything else OpenAI defines is ignored.
"""
import json
import time
import uuid

from lmx.gateway.errors import bad_param

PASSED = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
          "response_format", "tools", "tool_choice", "top_k", "min_p", "repeat_penalty",
          "truncate")
PING_S = 15                  # an SSE comment this often keeps idle streams open
DONE = {"data": "[DONE]"}    # the last event of every stream


def sse(obj):
    """One server-sent event carrying obj as JSON (sse-starlette frames it)."""
    return {"data": json.dumps(obj, separators=(",", ":"), ensure_ascii=False)}


FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls",
          "cancelled": "stop", "deadline": "length"}


def new_id(prefix):
    """An OpenAI-looking response id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def messages_of(body, max_messages):
    """The request's messages as CHAT takes them, or a 400 naming the bad one."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "messages must be a non-empty array", "missing_required"
                        "_parameter" if messages is None else "invalid_type")
    if len(messages) > max_messages:
        raise bad_param("messages", f"{len(messages)} messages; this gateway takes at most "
                        f"{max_messages}")
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(i, m):
    if not isinstance(m, dict):
        raise bad_param(f"messages[{i}]", "each message must be an object")
    out = {k: v for k, v in m.items() if v is not None or k == "content"}
    if out.get("role") == "developer":          # OpenAI's newer name for system
        out["role"] = "system"
    content = out.get("content")
    if isinstance(content, list):              # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise bad_param(f"messages[{i}].content[{j}]", "only text content parts "
                                "are supported")
            texts.append(part["text"])
        out["content"] = "".join(texts)
    return out


def chat_fields(body, max_messages):
    """(CHAT fields without agent, renames of broker fields to request params, options)."""
    for name in ("response_format", "stream_options"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise bad_param(name, f"{name} must be an object", "invalid_type")
    n = body.get("n")
    if n not in (None, 1):
        raise bad_param("n", f"n must be 1 (each lmx session holds one conversation), got {n}")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad_param("logprobs", "logprobs are not supported by this gateway")
    fields = {"messages": messages_of(body, max_messages)}
    fields.update((k, body[k]) for k in PASSED if body.get(k) is not None)
    renames = {}
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            fields["max_tokens"] = body[name]
            renames["max_tokens"] = name
            break
    if fields.get("response_format", {}).get("type") == "text":
        del fields["response_format"]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_param("stream", "stream must be a boolean", "invalid_type")
    opts = body.get("stream_options") or {}
    options = {"stream": stream, "include_usage": bool(opts.get("include_usage")),
               "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False}
    return fields, renames, options


def usage(reply):
    """OpenAI's usage from a ChatReply (or a DecodeReply)."""
    prompt = reply.get("prompt_tokens", 0)
    done = reply.get("completion_tokens", reply.get("generated_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": done,
            "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": reply.get("cached_tokens", 0)}}


def tool_calls(reply, parallel):
    """The reply's tool calls (only the first one unless parallel)."""
    calls = reply.get("tool_calls") or []
    return calls if parallel else calls[:1]


def chat_completion(reply, rid, alias, created, parallel=True):
    """A chat.completion object from a final ChatReply."""
    calls = tool_calls(reply, parallel)
    message = {"role": "assistant", "content": reply.get("content"), "refusal": None}
    if calls:
        message["tool_calls"] = calls
        message["content"] = message["content"] or None
    return {"id": rid, "object": "chat.completion", "created": created, "model": alias,
            "system_fingerprint": "lmx",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": FINISH.get(reply.get("finish_reason"), "stop")}],
            "usage": usage(reply)}


class ChunkMaker:
    """chat.completion.chunk objects of one streamed reply."""

    def __init__(self, rid, alias, include_usage):
        self.rid, self.alias, self.include_usage = rid, alias, include_usage
        self.created = int(time.time())

    def chunk(self, delta, finish=None):
        """One chunk with one choice."""
        out = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created,
               "model": self.alias, "system_fingerprint": "lmx",
               "choices": [{"index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": finish}]}
        if self.include_usage:
            out["usage"] = None
        return out

    def first(self):
        """The opening chunk: the role."""
        return self.chunk({"role": "assistant", "content": ""})

    def text(self, delta):
        """A content delta."""
        return self.chunk({"content": delta})

    def ending(self, reply, parallel=True):
        """The chunks after the last content delta: each tool call (as OpenAI streams them:
        index, id, type, name, then its arguments), finish_reason, and usage if asked."""
        out = []
        for i, call in enumerate(tool_calls(reply, parallel)):
            fn = call["function"]
            out.append(self.chunk({"tool_calls": [{"index": i, "id": call["id"],
                                                   "type": "function", "function": {
                                                       "name": fn["name"], "arguments": ""}}]}))
            out.append(self.chunk({"tool_calls": [{"index": i, "function": {
                "arguments": fn["arguments"]}}]}))
        finish = FINISH.get(reply.get("finish_reason"), "stop")
        if finish == "tool_calls" and not out:
            finish = "stop"
        out.append(self.chunk({}, finish))
        if self.include_usage:
            out.append({"id": self.rid, "object": "chat.completion.chunk",
                        "created": self.created, "model": self.alias,
                        "system_fingerprint": "lmx", "choices": [], "usage": usage(reply)})
        return out


def completion_fields(body):
    """(prompt, n_predict, stop list, options) of a /v1/completions request."""
    if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
        raise bad_param("n", "n and best_of must be 1")
    if body.get("echo") or body.get("logprobs") is not None or body.get("suffix"):
        raise bad_param("echo" if body.get("echo") else "logprobs" if
                        body.get("logprobs") is not None else "suffix",
                        "echo, logprobs and suffix are not supported by this gateway")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad_param("prompt", "prompt must be one non-empty string")
    n_predict = body.get("max_tokens", 16)
    if isinstance(n_predict, bool) or not isinstance(n_predict, int):
        raise bad_param("max_tokens", "max_tokens must be an integer", "invalid_type")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_param("stop", "stop must be a string or a list of non-empty strings")
    stream = body.get("stream", False)
    opts = body.get("stream_options") or {}
    return prompt, n_predict, stop, {"stream": bool(stream),
                                     "include_usage": bool(opts.get("include_usage"))}


def text_completion(rid, alias, created, text, finish, use):
    """A text_completion object (one choice)."""
    return {"id": rid, "object": "text_completion", "created": created, "model": alias,
            "system_fingerprint": "lmx",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": use}


class StopScanner:
    """Cut streamed text at the first of some stop strings, holding back what could still
    become one (the gateway applies stop strings to DECODE, which has none)."""

    def __init__(self, stops):
        self.stops = stops
        self.held = ""
        self.hit = False
        self.keep = max((len(s) for s in stops), default=1) - 1

    def feed(self, text):
        """The text that can be sent now; sets .hit once a stop string appears."""
        if self.hit:
            return ""
        self.held += text
        cuts = [self.held.find(s) for s in self.stops if s in self.held]
        if cuts:
            self.hit = True
            out, self.held = self.held[:min(cuts)], ""
            return out
        cut = max(0, len(self.held) - self.keep)
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def flush(self):
        """What is still held at the end (no stop string came)."""
        out, self.held = ("" if self.hit else self.held), ""
        return out

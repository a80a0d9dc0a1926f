"""The Python client an agent program imports: one DEALER socket to the broker.

    with Client("ipc:///tmp/lmx.sock") as c:
        c.register("smol", "smol")
        print(c.decode("smol", "Hello, my name is", 24)["text"])
"""
import collections
import itertools

import zmq

from lmx.common import protocol
from lmx.common.config import DEFAULT_ENDPOINT
from lmx.common.errors import LmxError
from lmx.common.sockets import make_socket


KEYED = frozenset({"REGISTER", "DECODE", "CHAT"})    # the verbs that carry a quotas key


class LmxTimeout(TimeoutError):
    """No reply arrived within the timeout."""


class Client:
    """A connection to an lmx broker; not thread-safe (one per thread, like its socket)."""

    def __init__(self, endpoint=DEFAULT_ENDPOINT, timeout=60.0, ctx=None, curve=None, key=None):
        """curve: (client_public, client_secret, server_public) for a tcp:// broker; key: a
        client key of the broker's quotas file, sent with every REGISTER, DECODE and CHAT."""
        self.endpoint = endpoint
        self.timeout = timeout
        self.key = key
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self._sock = make_socket(self._ctx, zmq.DEALER, endpoint, curve=curve)
        self._ids = itertools.count(1)
        self._waiting = {}            # request id -> replies received but not yet read

    @property
    def socket(self):
        """The DEALER socket, for a zmq.Poller over many clients in one thread (read it with
        protocol.decode_reply; send() still assigns the request ids)."""
        return self._sock

    def send(self, verb, **fields):
        """Send one request without waiting; return its id (for replies() and CANCEL)."""
        msg_id = next(self._ids)
        if self.key is not None and verb.upper() in KEYED:
            fields.setdefault("key", self.key)
        self._sock.send_multipart(protocol.encode_request(verb, msg_id, **fields))
        self._waiting[msg_id] = collections.deque()
        return msg_id

    def replies(self, msg_id, timeout=None):
        """Yield the replies to request msg_id, partial ones first, ending with the final one.

        Replies to other requests of this client that arrive meanwhile are kept for them.
        The timeout applies to each wait, so a long stream is fine while tokens flow."""
        wait = self.timeout if timeout is None else timeout
        box = self._waiting.setdefault(msg_id, collections.deque())
        try:
            while True:
                while not box:
                    if not self._sock.poll(int(wait * 1000) + 1):
                        raise LmxTimeout(f"no reply to request {msg_id} from {self.endpoint} "
                                         f"within {wait:g} s")
                    reply = protocol.decode_reply(self._sock.recv_multipart())
                    if reply.get("id") in self._waiting:
                        self._waiting[reply["id"]].append(reply)
                    # else: a late reply to a request given up on: dropped
                reply = box.popleft()
                yield reply
                if reply.get("status") != "partial":
                    return
        finally:
            self._waiting.pop(msg_id, None)

    def call(self, verb, timeout=None, **fields):
        """Send one request and return its final reply dict, ok or error; LmxTimeout if none."""
        msg_id = self.send(verb, **fields)
        for reply in self.replies(msg_id, timeout):
            if reply.get("status") != "partial":
                return reply

    def request(self, verb, timeout=None, **fields):
        """Like call(), but raise LmxError on an error reply."""
        reply = self.call(verb, timeout=timeout, **fields)
        if reply.get("status") != "ok":
            raise LmxError.from_reply(reply)
        return reply

    def register(self, agent, model, n_ctx=None, progress=None, **context):
        """Admit `agent` on `model` (a table key or a GGUF path); context: flash_attn, type_k,
        type_v, swa_full. progress: called with each load fraction (0.0 to 1.0, the last 1.0)
        when this REGISTER loads the model (nothing when it is loaded already)."""
        fields = {"agent": agent, "model": model, **context}
        if n_ctx is not None:
            fields["n_ctx"] = n_ctx
        if progress is None:
            return self.request("REGISTER", **fields)
        for reply in self.replies(self.send("REGISTER", progress=True, **fields)):
            if reply.get("status") == "partial":
                progress(reply["progress"])
            elif reply.get("status") != "ok":
                raise LmxError.from_reply(reply)
            else:
                return reply

    def decode(self, agent, prompt, n_predict, deadline_ms=None):
        """Greedy-decode up to n_predict tokens after `prompt`, continuing the conversation."""
        extra = {"deadline_ms": deadline_ms} if deadline_ms is not None else {}
        return self.request("DECODE", agent=agent, prompt=prompt, n_predict=n_predict, **extra)

    def decode_stream(self, agent, prompt, n_predict, deadline_ms=None):
        """Like decode(), but yield each token's partial reply as it comes, then the final
        reply (status "ok"); raise LmxError on an error reply."""
        extra = {"deadline_ms": deadline_ms} if deadline_ms is not None else {}
        msg_id = self.send("DECODE", agent=agent, prompt=prompt, n_predict=n_predict,
                           stream=True, **extra)
        for reply in self.replies(msg_id):
            if reply.get("status") == "error":
                raise LmxError.from_reply(reply)
            yield reply

    def chat(self, agent, messages, **params):
        """Send chat messages; return the final reply (content, tool_calls, finish_reason,
        prompt/completion/cached tokens, ...). params: max_tokens, temperature, top_p, top_k,
        min_p, repeat_penalty, presence_penalty, frequency_penalty, seed, stop,
        response_format, grammar, tools, tool_choice, truncate, deadline_ms."""
        return self.request("CHAT", agent=agent, messages=messages, **params)

    def chat_stream(self, agent, messages, **params):
        """Like chat(), but yield each partial reply (its `delta` text) as it comes, then the
        final reply; raise LmxError on an error reply."""
        msg_id = self.send("CHAT", agent=agent, messages=messages, stream=True, **params)
        for reply in self.replies(msg_id):
            if reply.get("status") == "error":
                raise LmxError.from_reply(reply)
            yield reply

    def cancel(self, agent, request):
        """Stop DECODE `request` (the id send() returned) of `agent`."""
        return self.request("CANCEL", agent=agent, request=request)

    def unregister(self, agent):
        """Release the agent and everything booked for it."""
        return self.request("UNREGISTER", agent=agent)

    def status(self):
        """The broker's STATUS reply."""
        return self.request("STATUS")

    def list_agents(self):
        """The broker's LIST reply's agents."""
        return self.request("LIST")["agents"]

    def close(self):
        """Close the socket (and the context if this client made it)."""
        self._sock.close(0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""The Python client an agent program imports: one DEALER socket to the broker.

    with Client("ipc:///tmp/lmx.sock") as c:
        c.register("smol", "smol")
        print(c.decode("smol", "Hello, my name is", 24)["text"])
"""
import itertools
import time

import zmq

from lmx.common import protocol
from lmx.common.config import DEFAULT_ENDPOINT
from lmx.common.errors import LmxError
from lmx.common.sockets import make_socket


class LmxTimeout(TimeoutError):
    """No reply arrived within the timeout."""


class Client:
    """A connection to an lmx broker; not thread-safe (one per thread, like its socket)."""

    def __init__(self, endpoint=DEFAULT_ENDPOINT, timeout=60.0, ctx=None, curve=None):
        """curve: (client_public, client_secret, server_public) for a tcp:// broker."""
        self.endpoint = endpoint
        self.timeout = timeout
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self._sock = make_socket(self._ctx, zmq.DEALER, endpoint, curve=curve)
        self._ids = itertools.count(1)

    def call(self, verb, timeout=None, **fields):
        """Send one request and return its reply dict, ok or error; LmxTimeout if none."""
        msg_id = next(self._ids)
        self._sock.send_multipart(protocol.encode_request(verb, msg_id, **fields))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                raise LmxTimeout(f"no reply to {verb} from {self.endpoint} "
                                 f"within {self.timeout if timeout is None else timeout:g} s")
            reply = protocol.decode_reply(self._sock.recv_multipart())
            if reply.get("id") == msg_id:
                return reply
            # A late reply to an earlier request that timed out: drop it.

    def request(self, verb, timeout=None, **fields):
        """Like call(), but raise LmxError on an error reply."""
        reply = self.call(verb, timeout=timeout, **fields)
        if reply.get("status") != "ok":
            raise LmxError.from_reply(reply)
        return reply

    def register(self, agent, model, n_ctx=None, **context):
        """Admit `agent` on `model` (a table key or a GGUF path); context: flash_attn, type_k,
        type_v, swa_full."""
        fields = {"agent": agent, "model": model, **context}
        if n_ctx is not None:
            fields["n_ctx"] = n_ctx
        return self.request("REGISTER", **fields)

    def decode(self, agent, prompt, n_predict):
        """Greedy-decode up to n_predict tokens after `prompt`, continuing the conversation."""
        return self.request("DECODE", agent=agent, prompt=prompt, n_predict=n_predict)

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

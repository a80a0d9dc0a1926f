"""The gateway's one DEALER socket to the broker, shared by every HTTP request (asyncio).

    HTTP handlers --open(verb)--> BrokerLink --[CHAT id=7]-->  broker ROUTER
                  <--queue 7----  dispatcher <--[partial|ok|error id=7]--

Each request gets a fresh id and an asyncio.Queue; one dispatcher task reads every reply and
puts it in its request's queue (replies to requests given up on are dropped). Frames are built
and parsed by lmx.common.protocol only. The socket is IMMEDIATE, so a send with no broker
connected fails at once (Unreachable) instead of waiting in a queue; a monitor task notices a
lost connection and fails every pending request, so no HTTP client hangs on a dead broker.
"""
import asyncio
import itertools
import logging

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from lmx.common import protocol
from lmx.common.errors import LmxError
from lmx.common.sockets import make_socket

log = logging.getLogger("lmx.gateway")

UNREACHABLE = "BROKER_UNREACHABLE"      # the gateway's own code: no broker to talk to
TIMEOUT = "GATEWAY_TIMEOUT"             # no reply within the request timeout


def gateway_error(code, message):
    """A reply dict in the broker's error shape, for failures the gateway itself sees."""
    return {"status": "error", "code": code, "reason": "", "message": message}


class Pending:
    """One request in flight: its id, agent and the queue its replies arrive in."""

    __slots__ = ("id", "verb", "agent", "queue", "done")

    def __init__(self, msg_id, verb, agent):
        self.id, self.verb, self.agent = msg_id, verb, agent
        self.queue = asyncio.Queue()
        self.done = False


class BrokerLink:
    """A DEALER client of the broker multiplexing many concurrent requests by id."""

    def __init__(self, endpoint, curve=None):
        self.endpoint = endpoint
        self.ctx = zmq.asyncio.Context()
        self.sock = make_socket(self.ctx, zmq.DEALER, endpoint, curve=curve,
                                setup=lambda s: s.setsockopt(zmq.IMMEDIATE, 1))
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED |
                                                    zmq.EVENT_DISCONNECTED)
        self.connected = False
        self._ids = itertools.count(1)
        self._pending = {}               # id -> Pending
        self._tasks = set()

    def start(self):
        """Start the dispatcher and the connection monitor (call inside the event loop)."""
        for coro in (self._dispatch(), self._watch()):
            self._spawn(coro)

    def _spawn(self, coro):
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self):
        """Stop the tasks and close the sockets."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()

    def open(self, verb, agent=None, **fields):
        """Send one request; return its Pending. Raises LmxError(UNREACHABLE) at once when no
        broker is connected."""
        msg_id = next(self._ids)
        if agent is not None:
            fields["agent"] = agent
        self._send(protocol.encode_request(verb, msg_id, **fields))
        pending = Pending(msg_id, verb, agent)
        self._pending[msg_id] = pending
        return pending

    def _send(self, frames):
        future = self.sock.send_multipart(frames, flags=zmq.DONTWAIT)
        try:
            future.result()              # DONTWAIT: already resolved
        except zmq.Again:
            raise LmxError(UNREACHABLE, f"the broker at {self.endpoint} is not reachable "
                           "(no connection)") from None

    async def next_reply(self, pending, timeout):
        """The next reply of a request (partial or final); a TIMEOUT error reply if none
        comes within timeout seconds."""
        try:
            reply = await asyncio.wait_for(pending.queue.get(), timeout)
        except asyncio.TimeoutError:
            reply = gateway_error(TIMEOUT, f"no reply from the broker within {timeout:g} s")
        if reply.get("status") != "partial":
            self.finish(pending)
        return reply

    def ready_replies(self, pending):
        """The replies already queued for a request, without waiting (a final one among
        them ends it)."""
        out = []
        while not pending.queue.empty():
            out.append(pending.queue.get_nowait())
            if out[-1].get("status") != "partial":
                self.finish(pending)
                break
        return out

    async def call(self, verb, timeout, agent=None, **fields):
        """Send one request and return its final reply dict (ok or error, never raises)."""
        try:
            pending = self.open(verb, agent, **fields)
        except LmxError as err:
            return gateway_error(err.code, err.message)
        while True:
            reply = await self.next_reply(pending, timeout)
            if reply.get("status") != "partial":
                return reply

    def finish(self, pending):
        """Stop routing replies to this request."""
        pending.done = True
        self._pending.pop(pending.id, None)

    def cancel(self, pending):
        """CANCEL a request still running and drop its replies (its HTTP client is gone);
        never waits or raises."""
        if pending.done:
            return
        self.finish(pending)
        self.request_cancel(pending)

    def request_cancel(self, pending):
        """Send CANCEL for a request, keeping its replies (its final reply still comes)."""
        try:
            self._send(protocol.encode_request("CANCEL", next(self._ids), agent=pending.agent,
                                               request=pending.id))
            log.info("gateway: cancel request %s of agent %s", pending.id, pending.agent)
        except LmxError:
            pass                         # no broker: nothing runs there

    async def _dispatch(self):
        """Read every reply and hand it to its request's queue."""
        while True:
            frames = await self.sock.recv_multipart()
            try:
                reply = protocol.decode_reply(frames)
            except LmxError as err:
                log.warning("gateway: unreadable reply from the broker: %s", err)
                continue
            pending = self._pending.get(reply.get("id"))
            if pending is not None:
                pending.queue.put_nowait(reply)

    async def _watch(self):
        """Track the connection; fail every pending request when it drops."""
        while True:
            event = parse_monitor_message(await self.monitor.recv_multipart())["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected = True
                log.info("gateway: connected to the broker at %s", self.endpoint)
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False
                log.warning("gateway: lost the broker at %s; failing %d requests",
                            self.endpoint, len(self._pending))
                lost = gateway_error(UNREACHABLE, f"lost the connection to the broker at "
                                     f"{self.endpoint}")
                for pending in list(self._pending.values()):
                    pending.queue.put_nowait(dict(lost, id=pending.id))

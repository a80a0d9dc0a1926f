"""What goes into the broker's core (events) and what comes out of it (actions).

The server loop turns socket traffic, process exits and its clock into events, calls
``Core.handle(event)``, and carries out the actions it gets back, in order. Times are
arguments: ``now`` is monotonic seconds, ``wall`` is Unix time (for what LIST shows).
"""
from dataclasses import dataclass
from typing import Optional

from lmx.common.jobs import DeviceReading, Result, StreamingInfo


# -- events ------------------------------------------------------------------------------

@dataclass
class ClientRequest:
    """A validated request from a client (protocol.decode_message's Message)."""

    identity: bytes
    msg_id: object
    verb: str
    fields: dict
    now: float
    wall: float


@dataclass
class WorkerReady:
    """The worker said READY (its first message after a start)."""

    pid: int
    device: DeviceReading
    now: float
    streaming: Optional[StreamingInfo] = None
    dev: int = 0                      # the broker's device index (server.py maps names)
    name: Optional[str] = None        # the worker's name (a remote one keeps its device by it)
    remote: bool = False


@dataclass
class WorkerHeartbeat:
    """Any other message from the worker counts as one; a HEARTBEAT also carries a reading."""

    device: Optional[DeviceReading]
    now: float
    dev: int = 0


@dataclass
class WorkerResult:
    """A job finished at the worker."""

    job_id: int
    result: Result
    now: float
    wall: float


@dataclass
class WorkerToken:
    """A streamed token of a running DECODE."""

    job_id: int
    index: int
    token: int
    text: str
    now: float


@dataclass
class WorkerProgress:
    """How far the worker is in loading a REGISTER job's model (0.0 to 1.0)."""

    job_id: int
    fraction: float
    now: float


@dataclass
class WorkerStarting:
    """The server started a new worker process (after a SpawnWorker)."""

    now: float
    dev: int = 0


@dataclass
class WorkerLost:
    """The worker process exited (the server saw it), or the server gave up on it."""

    why: str
    now: float
    dev: int = 0


@dataclass
class ClientSlow:
    """Replies to this client piled up past the server's limit: it reads too slowly."""

    identity: bytes
    now: float


@dataclass
class Tick:
    """Time passed: deadlines, liveness."""

    now: float
    wall: float


# -- actions -----------------------------------------------------------------------------

@dataclass
class Reply:
    """Send a reply (ok, partial or error fields, without the envelope) to a client.

    status_rev: set on STATUS replies; the server may reuse frames packed for that revision."""

    identity: bytes
    msg_id: object
    fields: dict
    status_rev: Optional[int] = None


@dataclass
class SendJob:
    """Send a job to the worker (verb and the job record's fields)."""

    job_id: int
    verb: str
    fields: dict
    dev: int = 0                      # the device whose worker runs it


@dataclass
class CancelJob:
    """Ask the worker to stop a job at its next token, or drop it before it starts."""

    job_id: int
    dev: int = 0


@dataclass
class KillWorker:
    """The worker stopped answering: kill its process (it must not keep device memory)."""

    why: str
    dev: int = 0


@dataclass
class SpawnWorker:
    """Start the device's local worker after delay_s seconds (back-off after a loss)."""

    delay_s: float
    dev: int = 0


@dataclass
class Log:
    """A log line (level is a logging level name)."""

    level: str
    text: str

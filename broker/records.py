"""What the broker keeps per agent and per loaded model."""
import time
from dataclasses import dataclass, field

VERSION = "0.1.0"


@dataclass
class Agent:
    """One registered agent as the broker books it (its context; the weights are the model's)."""

    agent: str
    model: str
    path: str
    n_ctx: int
    booked_bytes: int
    source: str
    spec: dict = field(default_factory=dict)
    owner: bytes = b""                  # the client identity that registered it
    estimated_bytes: int = None
    measured_bytes: int = None
    state: str = "registering"          # registering -> ready -> leaving
    registered_at: float = field(default_factory=time.time)
    last_active: float = None
    decodes: int = 0
    generated_tokens: int = 0
    context_reset: bool = False         # tell the next DECODE its conversation was lost
    live: bool = True                   # its context is booked (parked agents book nothing)
    outstanding: int = 0                # its DECODEs queued or running at the worker
    last_used: float = 0.0              # monotonic time of its last DECODE (LRU parking)


@dataclass
class ModelBooking:
    """A model's weights, booked once while any agent uses it."""

    path: str
    fingerprint: str
    booked_bytes: int
    estimated_bytes: int
    source: str
    agents: set = field(default_factory=set)
    measured_bytes: int = None

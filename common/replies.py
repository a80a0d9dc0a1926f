"""What the broker answers a client: one typed record per verb (README's protocol table).

Every ok reply is one of these records' ``to_wire()`` plus the envelope (``v``, ``id``,
``status``); an error reply is ``LmxError.fields()``. Clients get plain maps; tests and the
gateway may rebuild a record with ``from_wire``.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from lmx.common.records import Record


@dataclass
class RegisterReply(Record):
    agent: str
    path: str
    n_ctx: int
    booked_bytes: int              # its context
    estimate_source: str
    model_booked_bytes: int
    weights_source: str
    estimate: dict
    model_loaded: bool
    model_refs: int
    load_ms: float
    kv_swap_parked: List[str] = field(default_factory=list)   # idle agents parked for it
    ledger_max_bytes: int = 0      # its device's ledger
    ledger_allocated_bytes: int = 0
    device: int = 0                # the device it was placed on
    device_name: Optional[str] = None


@dataclass
class UnregisterReply(Record):
    agent: str
    released_bytes: int
    model_freed: bool
    ledger_max_bytes: int = 0
    ledger_allocated_bytes: int = 0


@dataclass
class DecodeReply(Record):
    agent: str
    prompt_tokens: int
    generated_tokens: int
    stopped_on_eos: bool
    stopped_by: Optional[str]      # "cancel", "deadline", "slow_reader" or None
    elapsed_ms: float
    kv_swap_evicted: Optional[str]  # the first of kv_swap_parked (kept for v1.0 clients)
    kv_swap_parked: List[str]       # every idle agent parked to make this agent live
    kv_swap_restored: bool
    batch: int
    text: str
    tokens: List[int]
    swap_ms: float
    prompt_ms: float
    gen_ms: float
    ttft_ms: Optional[float]
    queue_ms: Optional[float]
    n_past: int
    broker_ms: float
    context_reset: bool = False    # true once, after a restart lost this agent's context


@dataclass
class PartialReply(Record):
    """One streamed token (status "partial"), before the final reply."""

    agent: str
    index: int
    token: int
    text: str


@dataclass
class LoadProgress(Record):
    """How far the model a REGISTER (with progress) is loading has come (status "partial"):
    llama.cpp's progress, 0.0 to 1.0, non-decreasing, the last one 1.0."""

    agent: str
    progress: float


@dataclass
class ClientQuota(Record):
    """One quotas client as STATUS shows it: {quota: limit or None} and {quota: its use}."""

    limits: Dict[str, Optional[int]]
    use: Dict[str, int]


@dataclass
class ChatPartial(Record):
    """A streamed piece of a CHAT's content (status "partial"): never part of a stop string."""

    agent: str
    index: int
    delta: str


@dataclass
class ChatReply(Record):
    """A CHAT's final reply: the assistant message and why it ended, with DECODE's timings."""

    agent: str
    content: str
    tool_calls: list               # [{id, type: "function", function: {name, arguments}}]
    finish_reason: str             # stop, length, tool_calls, cancelled, deadline
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int             # prompt tokens reused from the agent's KV
    truncated_tokens: int          # dropped by truncate: "middle"
    seed: Optional[int]
    elapsed_ms: float
    swap_ms: float
    prompt_ms: float
    gen_ms: float
    ttft_ms: Optional[float]
    queue_ms: Optional[float]
    broker_ms: float
    kv_swap_evicted: Optional[str]
    kv_swap_parked: List[str]
    kv_swap_restored: bool
    batch: int
    n_past: int
    context_reset: bool = False


@dataclass
class CancelReply(Record):
    agent: str
    request: object
    cancelled: str                 # "queued" (dropped by the broker) or "sent" (to the worker)


@dataclass
class AgentRecord(Record):
    """One agent as LIST shows it."""

    agent: str
    model: str
    path: str
    n_ctx: int
    spec: dict
    state: str                     # registering, ready, restoring, leaving
    residence: str                 # live, parked_ram, parked_disk, parked_empty
    live: bool
    booked_bytes: int              # its context while live
    booked_now_bytes: int          # what the ledger holds for it now (0 while parked)
    estimated_bytes: Optional[int]
    measured_bytes: Optional[int]
    source: str
    parked_bytes: int
    parked_pinned: bool
    parked_on_disk: bool
    batch: int
    n_past: int
    queue_depth: int               # its requests queued, waiting for room or running
    decodes: int
    generated_tokens: int
    parks: int
    owner: str
    registered_at: float
    last_active: Optional[float]
    client: str = "default"        # the quotas client that registered it
    device: int = 0                # the device whose worker holds it
    device_name: Optional[str] = None


@dataclass
class AgentState(Record):
    """The short per-agent view STATUS carries."""

    residence: str
    booked_now_bytes: int
    parked_bytes: int
    queue_depth: int
    generated_tokens: int
    last_active: Optional[float]
    device: int = 0


@dataclass
class DeviceRecord(Record):
    """One device as STATUS shows it: its worker, its reading and its own ledger."""

    device: int                    # the broker's index (REGISTER's `device` takes it)
    name: str                      # local:N, or the name a remote worker announced
    remote: bool
    worker_state: str
    worker_pid: Optional[int]
    worker_restarts: int
    kind: Optional[str]            # cpu, cuda (null until its first READY)
    device_name: Optional[str]     # the GPU's name (NVML) or "cpu (declared size)"
    source: Optional[str]
    gpu_index: Optional[int]
    total_bytes: Optional[int]
    used_bytes: Optional[int]      # NVML (null on CPU)
    free_bytes: Optional[int]
    worker_process_bytes: Optional[int]
    ledger_max_bytes: int
    ledger_allocated_bytes: int
    ledger_percent_cap_bytes: int
    external_bytes: Optional[int]
    bookings: Dict[str, int]
    agents: List[str]              # registered on it
    live_agents: List[str]
    models: List[str]              # paths whose weights are booked on it
    waiting_for_room: int
    context_builds: int


@dataclass
class ModelRecord(Record):
    path: str
    agents: int
    booked_bytes: int
    estimated_bytes: Optional[int] = None
    measured_bytes: Optional[int] = None
    source: Optional[str] = None
    context_booked_bytes: int = 0
    worker_refs: int = 0
    device: int = 0             # weights are booked per device: one record per device


@dataclass
class GroupRecord(Record):
    """One group context as STATUS shows it: its model, seats, seats used, how often the
    worker built it, and what the ledger books for it (compute and free seats)."""

    group: int
    model: str
    seats: int
    seats_used: int
    rebuilds: int               # builds after the first (each a change of capacity)
    seat_bytes: int
    booked_bytes: int
    members: List[str] = field(default_factory=list)
    device: int = 0


@dataclass
class StatusReply(Record):
    version: str
    protocol: List[int]
    endpoint: str
    ledger_max_bytes: int
    ledger_allocated_bytes: int
    admission_percent: int
    ledger_percent_cap_bytes: int
    external_bytes: Optional[int]
    bookings: Dict[str, int]
    device_kind: Optional[str]
    device_name: Optional[str]
    device_source: Optional[str]
    device_total_bytes: Optional[int]
    device_used_bytes: Optional[int]
    device_free_bytes: Optional[int]
    worker_pid: Optional[int]
    worker_state: str
    worker_restarts: int
    worker_process_bytes: Optional[int]
    streaming_available: bool
    streaming_reason: Optional[str]
    live_agents: List[str]
    batch_groups: List[int]
    parked_ram_bytes: int
    park_ram_budget: int
    waiting_for_room: int
    agent_states: Dict[str, AgentState]
    models: List[ModelRecord]
    agents: int
    queue_depth: int
    inflight: int
    groups: List[GroupRecord] = field(default_factory=list)
    context_builds: int = 0     # contexts the broker's workers built, since it started
    devices: List[DeviceRecord] = field(default_factory=list)


@dataclass
class ListReply(Record):
    agents: List[AgentRecord]


@dataclass
class HelpReply(Record):
    protocol: List[int]
    verbs: dict

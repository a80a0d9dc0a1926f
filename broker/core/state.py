"""What the broker's core keeps: agents, model bookings, requests (ops) and per-agent lanes."""
import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from lmx.common import config as cfg
from lmx.common import protocol
from lmx.common.quotas import DEFAULT_CLIENT

VERSION = "0.2.0"


@dataclass
class BrokerConfig:
    """Everything the broker is started with (lmx-broker's options)."""

    endpoint: str = cfg.DEFAULT_ENDPOINT
    worker_endpoint: str = ""
    table: dict = field(default_factory=dict)
    admission_percent: int = cfg.DEFAULT_ADMISSION_PERCENT
    spawn_worker: bool = True
    worker: cfg.WorkerConfig = field(default_factory=cfg.WorkerConfig)
    worker_start_timeout: float = 120.0
    worker_overhead: Optional[int] = None   # None: measured on CUDA (640 MiB until then), 0 on CPU
    heartbeat_s: float = cfg.DEFAULT_HEARTBEAT_S
    liveness: int = cfg.DEFAULT_LIVENESS
    queue_depth: int = cfg.DEFAULT_QUEUE_DEPTH
    max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES
    default_n_ctx: int = cfg.DEFAULT_N_CTX
    max_n_ctx: int = cfg.MAX_N_CTX
    max_n_predict: int = cfg.MAX_N_PREDICT
    max_prompt_bytes: int = cfg.MAX_PROMPT_BYTES
    state_dir: str = ""                # journal, measured.json, parked/ ("" keeps them in memory)
    model_dirs: tuple = ()             # REGISTER paths must lie under one of these
    max_prompt_tokens: int = cfg.DEFAULT_MAX_PROMPT_TOKENS
    max_agents_per_client: int = cfg.DEFAULT_MAX_AGENTS_PER_CLIENT
    curve_secret_key: Optional[str] = None
    curve_clients: Optional[str] = None
    park_to_disk: bool = True          # parked state may go to files (state_dir/parked)
    park_ram: int = 4 << 30            # host bytes for parked state (the broker's budget)
    max_live_contexts: int = 0         # 0: as many as the ledger allows
    admit_by_parking: bool = False     # REGISTER may park idle agents to make room
    swap_grace_s: float = 0.02         # a swap waits out a burst of requests (room.py)
    measure_margin_percent: int = 5    # booking after reconciliation = measured + this
    others_margin: int = 256 << 20     # kept free below what other processes hold
    chat_templates: dict = field(default_factory=dict)   # model path -> template text
    quotas: Optional[object] = None    # common.quotas.QuotaConfig (--quotas); None: no quotas
    workers: list = field(default_factory=list)   # one WorkerConfig per local device ([]:
                                                  # `worker` alone, named local:0)
    gpus: tuple = ()                              # --gpus: each spawned worker sees only its
                                                  # own (CUDA_VISIBLE_DEVICES)
    remote_endpoint: Optional[str] = None         # tcp:// where remote workers connect
    curve_workers: Optional[str] = None           # folder of the remote workers' public keys

    def local_workers(self):
        """The WorkerConfig of each local device, in device order (none without spawning)."""
        if not self.spawn_worker:
            return []
        return list(self.workers) or [dataclasses.replace(
            self.worker, name=self.worker.name or "local:0")]


@dataclass
class Agent:
    """One registered agent as the broker books it (its context; the weights are the model's).

    live: its context is booked. The worker's facts (where its parked state is, n_past) are
    copied from every result that concerns it, for LIST and for the park budget."""

    name: str
    model: str
    path: str
    n_ctx: int
    spec: dict
    owner: bytes
    booked_bytes: int                   # its seat's booking while live (seats.py)
    estimated_bytes: Optional[int]
    source: str
    registered_at: float
    measured_bytes: Optional[int] = None
    state: str = "registering"          # registering -> ready (-> restoring -> ready) -> leaving
    live: bool = True                   # it holds a seat (booked under agent:NAME)
    parked: Optional[str] = None        # "ram" or "disk" while the worker holds a parked state
    parked_bytes: int = 0
    parked_pinned: bool = False
    unparkable: bool = False            # its last PARK did not fit the host-RAM budget
    n_past: int = 0
    batch: int = 0
    parks: int = 0
    decodes: int = 0
    generated_tokens: int = 0
    last_active: Optional[float] = None     # wall time of its last DECODE
    last_used: float = 0.0                  # monotonic time of its last DECODE (LRU parking)
    context_reset: bool = False         # tell the next DECODE its conversation was lost
    compute_bytes: int = 0              # its group's compute buffer (the estimate's split)
    gid: Optional[int] = None           # the group it has a seat in while live
    client: str = DEFAULT_CLIENT        # the quotas client that registered it (its key's)
    dev: int = 0                        # the device whose worker holds its slot


@dataclass
class ModelBooking:
    """A model's weights, booked once while any agent uses it."""

    path: str
    fingerprint: str
    booked_bytes: int
    estimated_bytes: int
    source: str
    agents: set = field(default_factory=set)
    measured_bytes: Optional[int] = None


@dataclass
class Op:
    """One request that touches an agent: a client's REGISTER, UNREGISTER or DECODE, or the
    broker's own PARK or RESTORE. It holds its agent's lane from start to finish."""

    verb: str
    agent: str
    fields: dict
    t0: float
    identity: Optional[bytes] = None    # None: the broker's own op
    msg_id: object = None
    deadline: Optional[float] = None
    job_id: Optional[int] = None        # the worker job it is waiting for
    sent_at: Optional[float] = None
    victims: list = field(default_factory=list)    # room.Steps to make room for it, in order
    parked: list = field(default_factory=list)     # agents parked for it so far
    estimate: object = None             # REGISTER: its Estimate
    for_op: Optional["Op"] = None       # PARK, RESIZE: the op it makes room for
    seat: Optional[dict] = None         # its agent's placement, sent with the job
    step: object = None                 # PARK, RESIZE: the room.Step it carries out
    held: bool = False                  # waiting out a burst before it parks anyone (room.py)
    slow: bool = False                  # its client reads too slowly: partials dropped
    dev: int = 0                        # the device whose worker runs it

    @property
    def internal(self):
        return self.identity is None


@dataclass
class Lane:
    """The ops of one agent name, applied one at a time in arrival order."""

    queue: collections.deque = field(default_factory=collections.deque)
    active: Optional[Op] = None

    @property
    def idle(self):
        return self.active is None and not self.queue

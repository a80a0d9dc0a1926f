"""The broker <-> worker contract: every job, every result, every reading, as a typed record.

The broker sends a job as a request whose verb is the job's ``VERB`` and whose id is the job
id; the worker answers each job with exactly one RESULT (same id) whose fields are
``status`` ("ok" or "error"), the error fields on an error (``code``, ``reason``, ``message``,
numbers), the verb's result record on success, and always ``slot`` (the job's agent as the
worker holds it after the job, or None when it has no slot) and ``engine`` (the worker's
summary). A streaming DECODE also gets TOKEN events before its RESULT, and a REGISTER with
``progress`` that loads its model gets PROGRESS events (``LoadFraction``) before its RESULT.
"""
from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional

from lmx.common.records import Record


# -- jobs (broker -> worker) -------------------------------------------------------------

@dataclass
class RegisterJob(Record):
    """Acquire the model (refcounted) and create the agent's slot; resume: adopt its state
    parked on disk before a restart."""

    VERB: ClassVar[str] = "REGISTER"
    agent: str
    path: str
    spec: dict
    resume: bool = False
    seat: Optional[dict] = None       # the broker's placement: {"group", "capacity"}
    progress: bool = False            # send PROGRESS events while loading its model


@dataclass
class UnregisterJob(Record):
    """Free the agent's sequence or parked state, its slot and its model reference."""

    VERB: ClassVar[str] = "UNREGISTER"
    agent: str


@dataclass
class ParkJob(Record):
    """Save the agent's sequence and free its seat. The broker's policy travels with the job:
    at most ram_bytes of host memory for this state, else a file if disk is true, else refuse
    (LIMIT / PARK_BUDGET) and stay live; shrink: then resize its group to that many seats (0
    frees the context), None keeps the free seat."""

    VERB: ClassVar[str] = "PARK"
    agent: str
    ram_bytes: int
    disk: bool
    shrink: Optional[int] = None


@dataclass
class ResizeJob(Record):
    """Shrink a group's context to capacity seats (0 frees it): the broker needs the bytes
    of its free seats. Members keep their sequences."""

    VERB: ClassVar[str] = "RESIZE"
    group: int
    capacity: int


@dataclass
class DecodeJob(Record):
    """Greedy-decode up to n_predict tokens after prompt; deadline_ms counts from receipt."""

    VERB: ClassVar[str] = "DECODE"
    agent: str
    prompt: str
    n_predict: int
    max_prompt_tokens: Optional[int] = None
    stream: bool = False
    deadline_ms: Optional[int] = None
    seat: Optional[dict] = None       # where to seat a parked agent: {"group", "capacity"}


@dataclass
class Sampling(Record):
    """One agent's sampler chain: penalties, top-k, top-p, min-p, temperature, dist(seed);
    greedy (argmax) when temperature is 0. seed None: the worker picks one."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: Optional[int] = None


@dataclass
class ChatJob(Record):
    """Render the messages with the chat template, reuse the KV prefix the agent already
    holds, decode only the new tokens, then sample up to max_tokens with the agent's chain.

    template: the operator's template text (None: the model's tokenizer.chat_template);
    response_format: {type: text|json_object|json_schema, json_schema: {schema, ...}};
    grammar: GBNF text; tool_choice: "none", "auto", "required" or {"type": "function",
    "function": {"name": ...}}; truncate: None or "middle"."""

    VERB: ClassVar[str] = "CHAT"
    agent: str
    messages: list
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: list = field(default_factory=list)
    response_format: Optional[dict] = None
    grammar: Optional[str] = None
    tools: Optional[list] = None
    tool_choice: object = "auto"
    template: Optional[str] = None
    truncate: Optional[str] = None
    stream: bool = False
    deadline_ms: Optional[int] = None
    max_prompt_tokens: Optional[int] = None
    seat: Optional[dict] = None       # where to seat a parked agent: {"group", "capacity"}


@dataclass
class ExportJob(Record):
    """Read up to size bytes, from offset, of a parked agent's saved state (RAM or file): the
    broker moves it to another device's worker, chunk by chunk."""

    VERB: ClassVar[str] = "EXPORT"
    agent: str
    offset: int
    size: int


@dataclass
class ImportJob(Record):
    """One chunk of a state another worker exported. The first creates the agent's slot
    (parked, no seat: its model acquired); the last (offset + len(data) == total) makes the
    bytes its parked state in host memory, with its tokens and pending tokens, so its next
    DECODE or CHAT restores it into a seat as any parked agent."""

    VERB: ClassVar[str] = "IMPORT"
    agent: str
    path: str
    spec: dict
    offset: int
    total: int
    data: bytes = b""
    tokens: Optional[list] = None
    pending: Optional[list] = None


@dataclass
class CancelJob(Record):
    """Out of band: stop that job at its next token (or drop it before it starts)."""

    VERB: ClassVar[str] = "CANCEL"
    job: int


JOB_TYPES = {cls.VERB: cls for cls in (RegisterJob, UnregisterJob, ParkJob, ResizeJob,
                                       DecodeJob, ChatJob, CancelJob, ExportJob, ImportJob)}


@dataclass
class LoadFraction(Record):
    """A PROGRESS event (its id: the REGISTER job's): how much of the model llama.cpp has
    loaded, 0.0 to 1.0 (throttled by the worker; the last one is 1.0)."""

    fraction: float


# -- readings ------------------------------------------------------------------------------

@dataclass
class StreamingInfo(Record):
    """Whether the layer streamer can run on the worker's device."""

    available: bool = False
    reason: Optional[str] = None


@dataclass
class DeviceReading(Record):
    """One reading of the worker's device: NVML on a GPU, the declared size on CPU."""

    kind: str = "cpu"
    source: str = "declared"
    name: str = ""
    total_bytes: int = 0
    used_bytes: Optional[int] = None
    free_bytes: Optional[int] = None
    process_bytes: Optional[int] = None     # this worker process's own device bytes
    index: Optional[int] = None
    nvml_total_bytes: Optional[int] = None


@dataclass
class SlotState(Record):
    """One agent as the worker holds it: facts, never decisions."""

    agent: str
    model: str = ""
    n_ctx: int = 0
    n_past: int = 0             # tokens in its KV (or its parked state), pending one included
    live: bool = False          # it has a sequence in a group's context
    parked: Optional[str] = None    # "ram", "disk", or None (live, or nothing to keep)
    parked_bytes: int = 0
    parked_pinned: bool = False
    batch: int = 0              # agents seated in its group while live
    parks: int = 0
    decodes: int = 0
    generated: int = 0


@dataclass
class ModelState(Record):
    """A loaded model: its refcount and llama.cpp's buffer sizes."""

    refs: int = 0
    buffers: dict = field(default_factory=dict)


@dataclass
class Measured(Record):
    """What llama.cpp really allocated for a model or a context."""

    device_bytes: int = 0
    nvml_delta: Optional[int] = None
    buffers: dict = field(default_factory=dict)

    @property
    def nbytes(self):
        """The larger of llama.cpp's buffer report and NVML's change of the process."""
        return max(self.device_bytes or 0, self.nvml_delta or 0)


@dataclass
class GroupState(Record):
    """One group's context: its seats, how many are taken, how often it was built, and what
    its last build measured."""

    group: int
    model: str = ""
    seats: int = 0
    used: int = 0
    builds: int = 0
    measured: Optional[Measured] = None


@dataclass
class EngineSummary(Record):
    """The worker's engine after a job: what STATUS and LIST show of the worker."""

    live_agents: List[str] = field(default_factory=list)
    groups: List[int] = field(default_factory=list)     # members per shared context
    known_device_bytes: int = 0       # llama.cpp's device buffers: models, contexts
    process_bytes: Optional[int] = None
    parked_ram_bytes: int = 0
    models: Dict[str, ModelState] = field(default_factory=dict)
    seats: List[GroupState] = field(default_factory=list)
    context_builds: int = 0           # every context the worker built since it started


# -- results (worker -> broker), per job verb ------------------------------------------------

@dataclass
class RegisterResult(Record):
    model_loaded: bool = False
    model_refs: int = 0
    resumed: bool = False
    load_ms: float = 0.0
    n_vocab: int = 0
    buffers: dict = field(default_factory=dict)
    model_measured: Optional[Measured] = None


@dataclass
class ExportResult(Record):
    data: bytes = b""
    total: int = 0                    # the whole state's bytes (0: nothing to keep)
    tokens: Optional[list] = None     # with the first chunk: what its KV holds
    pending: Optional[list] = None


@dataclass
class ImportResult(RegisterResult):
    done: bool = False                # the last chunk: the agent is parked here now


@dataclass
class UnregisterResult(Record):
    model_freed: bool = False


@dataclass
class ParkResult(Record):
    parked: Optional[str] = None      # "ram", "disk", or None (it had no state)
    parked_bytes: int = 0


@dataclass
class ResizeResult(Record):
    seats: int = 0                    # the group's seats now (0: freed)


@dataclass
class RunStats(Record):
    """What every DECODE and CHAT result says of its run: timings, swap, batch, length."""

    elapsed_ms: float = 0.0
    swap_ms: float = 0.0
    prompt_ms: float = 0.0
    gen_ms: float = 0.0
    ttft_ms: Optional[float] = None
    kv_swap_restored: bool = False
    batch: int = 0                    # the most agents in one of its llama_decode steps
    n_past: int = 0


@dataclass
class DecodeResult(RunStats):
    prompt_tokens: int = 0
    generated_tokens: int = 0
    stopped_on_eos: bool = False
    stopped_by: Optional[str] = None  # "cancel", "deadline" or None
    text: str = ""
    tokens: List[int] = field(default_factory=list)


@dataclass
class ChatResult(RunStats):
    """A CHAT's reply: the message, why it ended, token counts (and RunStats)."""

    content: str = ""
    tool_calls: list = field(default_factory=list)   # [{id, type: function, function:
                                                     #   {name, arguments (a JSON string)}}]
    finish_reason: str = "stop"       # stop, length, tool_calls, cancelled, deadline
    prompt_tokens: int = 0            # the whole rendered prompt
    completion_tokens: int = 0
    cached_tokens: int = 0            # prompt tokens reused from the agent's KV
    truncated_tokens: int = 0         # dropped by truncate: "middle"
    seed: Optional[int] = None        # the seed the chain used


RESULT_TYPES = {"REGISTER": RegisterResult, "UNREGISTER": UnregisterResult,
                "EXPORT": ExportResult, "IMPORT": ImportResult,
                "PARK": ParkResult, "RESIZE": ResizeResult, "DECODE": DecodeResult, "CHAT": ChatResult}


@dataclass
class Result(Record):
    """A RESULT event: the status, the error fields or the verb's result, the agent's slot
    and the engine summary. ``out`` is rebuilt by the broker with RESULT_TYPES[job verb]."""

    status: str
    slot: Optional[SlotState] = None
    engine: Optional[EngineSummary] = None
    error: Optional[dict] = None      # code, reason, message and numbers (status "error")
    out: Optional[dict] = None        # the verb's result record as a map (status "ok")

    @property
    def ok(self):
        return self.status == "ok"

"""Configuration shared by the broker and the worker: sizes, the model table, defaults, and
the worker's configuration (WorkerConfig: what the broker starts lmx-worker with)."""
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

DEFAULT_ENDPOINT = f"ipc:///tmp/lmx-{os.getuid()}/lmx.sock"   # a private (0700) directory
DEFAULT_VRAM_TOTAL = 8 << 30           # the embedded default: a CPU worker with a declared 8 GiB
DEFAULT_ADMISSION_PERCENT = 90
DEFAULT_N_CTX = 2048
MAX_N_CTX = 1 << 20                   # the largest n_ctx an agent may ask for (ctxspec.py)
MAX_N_PREDICT = 4096
MAX_PROMPT_BYTES = 256 << 10
DEFAULT_QUEUE_DEPTH = 256
DEFAULT_HEARTBEAT_S = 1.0
DEFAULT_LIVENESS = 2                  # silent heartbeat intervals before a peer is declared dead
DEFAULT_MAX_PROMPT_TOKENS = 8192
DEFAULT_MAX_AGENTS_PER_CLIENT = 32
AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4,
          "tb": 1000**4, "tib": 1 << 40}


def parse_size(text):
    """'8GiB', '400 MiB', '1.5GB' or '123' -> bytes (int); ValueError on anything else."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 8GiB, 400MiB, 123456)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n):
    """Bytes -> a short human string (MiB/GiB), for logs and the probe."""
    if n is None:
        return "-"
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class TableEntry:
    """One operator-declared model: its key, resolved path and booked bytes per agent."""

    key: str
    path: str
    bytes: int


def load_model_table(path):
    """Read 'key path bytes' lines; relative paths resolve against the table's folder."""
    table = {}
    base = Path(path).resolve().parent
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"{path}:{lineno}: expected 'key path bytes', got {line!r}")
        key, model_path, size = parts
        if key in table:
            raise ValueError(f"{path}:{lineno}: duplicate key {key!r}")
        try:
            nbytes = parse_size(size)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from None
        resolved = str((base / os.path.expanduser(model_path)).resolve())
        table[key] = TableEntry(key, resolved, nbytes)
    return table


def default_threads():
    """Threads for llama.cpp: the cores this process may really use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass
class WorkerConfig:
    """Everything lmx-worker is started with: the broker passes it whole as
    ``--config JSON`` (``argv()``); the worker's individual options take their defaults from
    these fields and override them when given on the command line."""

    broker: str = ""                      # the broker's worker endpoint
    gpu_index: int = 0                    # NVML index of the GPU
    force_cpu: bool = False               # run llama.cpp on the CPU even if a GPU is present
    threads: Optional[int] = None         # llama.cpp threads; None: the cores this process may use
    vram_total: Optional[int] = None      # declared device bytes (CPU: the size; GPU: a cap)
    simulate_others: Optional[str] = None  # CPU only: file with the bytes "other processes" hold
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    liveness: int = DEFAULT_LIVENESS      # silent intervals before the broker is declared gone
    max_batch: int = 256                  # seats per group context (one llama_decode batch)
    quantum: int = 4                      # batched steps a group runs per turn, at most
    turn_tokens: int = 512                # tokens a group evaluates per turn, at most
    park_dir: Optional[str] = None        # parked state files (None: host memory only)
    log_level: str = "INFO"
    name: Optional[str] = None            # how the broker knows this worker's device (None:
                                          # HOST:gpuN or HOST:cpu)
    curve_secret_key: Optional[str] = None   # tcp broker: this worker's zmq.auth secret key
    curve_server_key: Optional[str] = None   # tcp broker: the broker's public key file

    def to_json(self):
        """The configuration as one JSON object (what --config takes)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """Parse to_json()'s output; fields left out keep their defaults. ValueError on
        anything that is not a JSON object of known fields."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("worker config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown worker config field(s): {', '.join(unknown)}")
        return cls(**data)

    def argv(self):
        """lmx-worker's arguments for exactly this configuration."""
        return ["--config", self.to_json()]

"""Per-agent booking estimates: the operator table first, else a conservative GGUF bound.

The conservative bound (for models not in the table) is deliberately an over-estimate; it reads
only GGUF metadata (broker/ggufmeta.py, memory-mapped, no weights), never the GPU:

    n_ctx'   = n_ctx rounded up to a multiple of 256            (llama.cpp pads the KV cache)
    weights  = file size                                         (all tensors on the device)
    kv       = L x n_ctx' x (max Hkv) x (Dk + Dv) x 2 bytes      (f16; every layer full attention,
                                                                  no sliding-window savings)
    compute  = 4 V T_out + 8 E T + 4 T H n_ctx' + 4 T n_ctx' + 4 T (3F + 4E)
               with T = n_ubatch = 512 and T_out = 1            (the sum of llama.cpp's graph peaks,
                                                                  attention scores without flash attn)
    total    = weights + kv + compute + 32 MiB margin

When the metadata lacks the keys above (an architecture this bound does not know), the fallback
is 2 x file size + n_ctx' x 128 KiB, and the estimate says `source: fallback`.
The measured-reconciliation estimator is a later step; this one only has to never be low.
"""
import os
from dataclasses import dataclass, field
from functools import lru_cache

from lmx.broker.ggufmeta import GGUFFormatError, read_metadata
from lmx.common.errors import Code, LmxError, Reason

N_UBATCH = 512
MARGIN = 32 << 20
FALLBACK_PER_TOKEN = 128 << 10
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Estimate:
    """Bytes to book for one agent, where the figure came from, and its parts."""

    path: str
    bytes: int
    source: str                 # "table", "conservative" or "fallback"
    parts: dict = field(default_factory=dict)


def pad_ctx(n_ctx):
    """n_ctx rounded up to llama.cpp's KV padding of 256 cells."""
    return -(-n_ctx // 256) * 256


def check_gguf_file(path):
    """Raise MODEL_ERROR unless path is a readable file that starts with the GGUF magic."""
    if not os.path.isfile(path):
        raise LmxError(Code.MODEL_ERROR, f"model file not found: {path}", Reason.NOT_FOUND,
                       path=path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise LmxError(Code.MODEL_ERROR, f"cannot read {path}: {exc.strerror}",
                       Reason.NOT_FOUND, path=path) from None
    if magic != GGUF_MAGIC:
        raise LmxError(Code.MODEL_ERROR, f"{path} is not a GGUF file (magic {magic!r})",
                       Reason.NOT_GGUF, path=path)


def _max(meta, key, default=None):
    """A metadata number, taking the max of per-layer arrays."""
    value = meta.get(key, default)
    if isinstance(value, list):
        return max(value) if value else default
    return value


@lru_cache(maxsize=64)
def _shape(path, _mtime_ns, _size):
    """The metadata numbers the bound needs, or None if the architecture lacks them."""
    try:
        meta = read_metadata(path)
    except (GGUFFormatError, OSError) as exc:
        raise LmxError(Code.MODEL_ERROR, f"{path} is a corrupt GGUF: {exc}", Reason.CORRUPT,
                       path=path) from None
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise LmxError(Code.MODEL_ERROR, f"{path} has no general.architecture",
                       Reason.CORRUPT, path=path)
    n_layer = _max(meta, f"{arch}.block_count")
    n_embd = _max(meta, f"{arch}.embedding_length")
    n_head = _max(meta, f"{arch}.attention.head_count")
    n_vocab = _max(meta, f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    if None in (n_layer, n_embd, n_head, n_vocab) or not n_head:
        return None
    return dict(arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                n_head_kv=_max(meta, f"{arch}.attention.head_count_kv", n_head),
                d_k=_max(meta, f"{arch}.attention.key_length", n_embd // n_head),
                d_v=_max(meta, f"{arch}.attention.value_length", n_embd // n_head),
                n_ff=_max(meta, f"{arch}.feed_forward_length", 0), n_vocab=int(n_vocab))


def conservative(path, n_ctx):
    """The documented upper bound for a GGUF that is not in the operator table."""
    check_gguf_file(path)
    st = os.stat(path)
    shape = _shape(path, st.st_mtime_ns, st.st_size)
    ctx = pad_ctx(n_ctx)
    if shape is None:
        total = 2 * st.st_size + ctx * FALLBACK_PER_TOKEN
        return Estimate(path, total, "fallback", {"weights": 2 * st.st_size,
                                                  "kv": ctx * FALLBACK_PER_TOKEN})
    t = N_UBATCH
    kv = shape["n_layer"] * ctx * shape["n_head_kv"] * (shape["d_k"] + shape["d_v"]) * 2
    e, h, f, v = shape["n_embd"], shape["n_head"], shape["n_ff"], shape["n_vocab"]
    compute = 4 * v + 8 * e * t + 4 * t * h * ctx + 4 * t * ctx + 4 * t * (3 * f + 4 * e)
    parts = {"weights": st.st_size, "kv": kv, "compute": compute, "margin": MARGIN}
    return Estimate(path, sum(parts.values()), "conservative", parts)


def estimate(model, n_ctx, table):
    """Resolve `model` (table key or path) and return the Estimate to book for one agent."""
    entry = table.get(model)
    if entry is None:
        path = os.path.realpath(os.path.expanduser(model))
        entry = next((e for e in table.values() if e.path == path), None)
    if entry is not None:
        check_gguf_file(entry.path)
        return Estimate(entry.path, entry.bytes, "table", {"table_key": entry.key})
    if os.sep not in model and not model.endswith(".gguf") and not os.path.exists(model):
        raise LmxError(Code.MODEL_ERROR, f"{model!r} is neither a model table key nor a file "
                       f"(known keys: {', '.join(sorted(table)) or 'none'})",
                       Reason.UNKNOWN_KEY, model=model)
    return conservative(os.path.realpath(os.path.expanduser(model)), n_ctx)

"""The context an agent asks for at REGISTER: one spec that the broker estimates and the worker builds.

Defaults (documented in the README) favour memory: flash attention on (its compute buffer does
not grow with n_ctx), sliding-window layers keep only their window (`swa_full` off), only the
last token's logits are kept (`n_outputs_max` 1), every layer offloaded on a GPU.
"""
from dataclasses import asdict, dataclass, fields

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from lmx.common.config import MAX_N_CTX  # noqa: F401  -- re-exported: callers import it here
from lmx.common.errors import Code, LmxError, Reason


def _kv_type(name):
    qtype = GGMLQuantizationType[name.upper()]
    return (int(qtype), *GGML_QUANT_SIZES[qtype])


# KV cache types: name -> (GGML type id, block elements, block bytes), from the gguf package.
KV_TYPES = {name: _kv_type(name)
            for name in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")}


def kv_row_bytes(kv_type, n):
    """Bytes of one KV row of n elements in kv_type."""
    _, block, size = KV_TYPES[kv_type]
    return n // block * size


@dataclass(frozen=True)
class ContextSpec:
    """llama.cpp context parameters lmx controls (the rest stay llama.cpp's defaults)."""

    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq: int = 1
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    swa_full: bool = False
    n_outputs_max: int = 1
    n_gpu_layers: int = -1

    def as_dict(self):
        """Plain fields, for the wire and the measurement cache key."""
        return asdict(self)

    @classmethod
    def from_fields(cls, given, defaults=None):
        """Build from REGISTER fields over defaults; BAD_REQUEST on any bad value."""
        base = asdict(defaults or cls())
        for f in fields(cls):
            if given.get(f.name) is not None:
                base[f.name] = given[f.name]
        spec = cls(**base)
        spec.validate()
        return spec

    def validate(self):
        """Raise BAD_REQUEST unless llama.cpp can build this context."""
        def bad(field, why):
            raise LmxError(Code.BAD_REQUEST, f"{field} {why}", Reason.BAD_VALUE, field=field)
        for name in ("n_ctx", "n_batch", "n_ubatch", "n_seq", "n_outputs_max", "n_gpu_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(name, "must be an integer")
        for name in ("flash_attn", "swa_full"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        if not 64 <= self.n_ctx <= MAX_N_CTX:
            bad("n_ctx", f"must be in [64, {MAX_N_CTX}]")
        if not 1 <= self.n_ubatch <= self.n_batch <= 8192:
            bad("n_batch", "and n_ubatch must satisfy 1 <= n_ubatch <= n_batch <= 8192")
        if not 1 <= self.n_seq <= 64:
            bad("n_seq", "must be in [1, 64]")
        if not self.n_seq <= self.n_outputs_max <= self.n_batch:
            # llama.cpp aborts the process (GGML_ASSERT in output_reserve) when n_seq exceeds it
            bad("n_outputs_max", "must be in [n_seq, n_batch]")
        if self.n_gpu_layers < -1:
            bad("n_gpu_layers", "must be -1 (all) or >= 0")
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in KV_TYPES:
                bad(name, f"must be one of {', '.join(KV_TYPES)}")
        if KV_TYPES[self.type_v][1] > 1 and not self.flash_attn:
            bad("type_v", "quantized V cache needs flash_attn (llama.cpp refuses it otherwise)")

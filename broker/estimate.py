"""What the broker books for a REGISTER: the model's weights (once per loaded model) and the
agent's context, each from the best source it has.

Sources, best first:
- `measured`: what the worker reported for the same file fingerprint and parameters before
  (broker/measured.py), plus the reconciliation margin;
- `table` (weights only): the operator table's bytes for the model;
- `estimator`: broker/estimator.py from the GGUF's metadata and tensor infos;
- `fallback`: for metadata the estimator cannot read (an unknown architecture), a documented
  conservative bound: weights = 2 x file size, context = n_ctx' x 128 KiB + 64 MiB.
"""
import hashlib
import os
from dataclasses import dataclass, field

from lmx.broker.access import check_model_path
from lmx.broker.estimator import UnknownShape, estimate as estimate_parts, pad, \
    shape_from_metadata
from lmx.broker.ggufmeta import GGUFFormatError, read_metadata
from lmx.common.ctxspec import KV_TYPES
from lmx.common.errors import Code, LmxError, Reason

GGUF_MAGIC = b"GGUF"
FALLBACK_PER_TOKEN = 128 << 10
FALLBACK_CONTEXT_BASE = 64 << 20
_SHAPES = {}


@dataclass
class Estimate:
    """Bytes to book for a model's weights and one agent's context, and where they came from."""

    path: str
    weights: int
    context: int
    weights_source: str
    context_source: str
    fingerprint: str
    estimated: dict = field(default_factory=dict)     # the estimator's breakdown, if any

    @property
    def bytes(self):
        return self.weights + self.context


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


def fingerprint(path):
    """A cheap identity for a model file: sha256 of its size, first and last MiB."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(size - (1 << 20), 0))
        digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:32]


def _shape(path):
    """The file's Shape (cached by path, size and mtime), or None if unknown; CORRUPT on junk."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _SHAPES:
        try:
            meta = read_metadata(path, with_tensors=True)
        except (GGUFFormatError, OSError) as exc:
            raise LmxError(Code.MODEL_ERROR, f"{path} is a corrupt GGUF: {exc}",
                           Reason.CORRUPT, path=path) from None
        if not isinstance(meta.get("general.architecture"), str):
            raise LmxError(Code.MODEL_ERROR, f"{path} has no general.architecture",
                           Reason.CORRUPT, path=path)
        try:
            _SHAPES[key] = shape_from_metadata(meta)
        except UnknownShape:
            _SHAPES[key] = None
    return _SHAPES[key]


def _check_kv_blocks(shape, spec):
    """A quantized KV type needs head sizes its block divides (llama.cpp refuses otherwise)."""
    for name, kv_type, dim in (("type_k", spec.type_k, shape.d_k), ("type_v", spec.type_v,
                                                                    shape.d_v)):
        block = KV_TYPES[kv_type][1]
        if dim % block:
            raise LmxError(Code.BAD_REQUEST, f"{name} {kv_type} needs a head size divisible by "
                           f"{block}; this model's is {dim}", Reason.BAD_VALUE, field=name)


def resolve(model, table, model_dirs=None):
    """(path, table entry or None) for a table key or a GGUF path under model_dirs.

    model_dirs None skips the access check (the estimator's own tools); the broker always
    passes its configured list (empty: table keys only)."""
    entry = table.get(model)
    if entry is None:
        path = os.path.realpath(os.path.expanduser(model))
        entry = next((e for e in table.values() if e.path == path), None)
    if entry is not None:
        return entry.path, entry
    if os.sep not in model and not model.endswith(".gguf"):
        raise LmxError(Code.MODEL_ERROR, f"{model!r} is neither a model table key nor a path "
                       f"(known keys: {', '.join(sorted(table)) or 'none'})",
                       Reason.UNKNOWN_KEY, model=model)
    if model_dirs is not None:
        return check_model_path(os.path.expanduser(model), model_dirs), None
    return os.path.realpath(os.path.expanduser(model)), None


def estimate(model, spec, table, device="cpu", measured=None, model_dirs=None):
    """The Estimate for one agent on `model` with ContextSpec `spec` on a 'cuda'/'cpu' device."""
    path, entry = resolve(model, table, model_dirs)
    check_gguf_file(path)
    shape = _shape(path)
    fp = fingerprint(path)
    if shape is None:
        ctx = pad(spec.n_ctx, 256) * FALLBACK_PER_TOKEN + FALLBACK_CONTEXT_BASE
        est = Estimate(path, 2 * os.path.getsize(path), ctx, "fallback", "fallback", fp)
    else:
        _check_kv_blocks(shape, spec)
        parts = estimate_parts(shape, spec, device)
        est = Estimate(path, parts.weights_device, parts.context_device, "estimator",
                       "estimator", fp, parts.as_dict())
    if entry is not None:
        est.weights, est.weights_source = entry.bytes, "table"
    if measured is not None:
        got = measured.lookup_weights(fp, device, spec)
        if got is not None and entry is None:
            est.weights, est.weights_source = got, "measured"
        got = measured.lookup_context(fp, device, spec)
        if got is not None:
            est.context, est.context_source = got, "measured"
    return est

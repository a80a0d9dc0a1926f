"""Device bytes of a GGUF model and one context, from metadata alone (llama.cpp 0.3.36 rules).

Pure: reads no weights, touches no GPU, knows no sockets. Each rule cites the llama.cpp source
(bundled with llama-cpp-python 0.3.36) it follows:

- context sizing (src/llama-context.cpp, constructor): n_ctx = 0 means the trained context;
  n_ctx is padded to a multiple of 256; n_batch = min(n_ctx, n_batch), n_ubatch =
  min(n_batch, n_ubatch); n_seq > 1 gives n_seq KV streams of pad(n_ctx / n_seq, 256) cells.
- KV cache (src/llama-kv-cache.cpp, src/llama-kv-cache-iswa.cpp): bytes = sum over layers of
  cells(layer) x (row(type_k, Dk*Hkv(layer)) + row(type_v, Dv*Hkv(layer))). Without flash
  attention V is stored transposed and its rows use the largest Dv*Hkv of any layer. SWA layers
  hold pad(min(n_ctx_seq, n_swa + n_ubatch), 256) cells per stream unless swa_full.
- SWA layers (src/llama-hparams.cpp set_swa_pattern, models/<arch>.cpp): a per-layer array
  `{arch}.attention.sliding_window_pattern`, else a period p (gemma2 2, gemma3 6, cohere2 4,
  llama4 4, overridable by an integer key) where layer il is SWA when il % p < p - 1.
- weights (src/llama-model.cpp load_tensors): token_embd stays on the host; with n_gpu_layers
  ngl (-1 = all) layers il >= max(L + 1 - ngl, 0) go to the device, the output layer counted as
  il = L; tied embeddings (no output.weight) are copied to the output layer's device. On CUDA
  each tensor is rounded up to 128 bytes and quantized rows are padded to 512 elements.
- output buffer (llama_context::output_reserve): V x max(n_outputs_max, n_seq) x 4 bytes,
  allocated in host memory (pinned on CUDA), so it is reported but not booked as device bytes.
- compute buffer: an upper bound of the graph allocator's peak, calibrated against llama.cpp's
  own reports (see compute_bytes).
"""
import math
from dataclasses import asdict, dataclass

from gguf import GGML_QUANT_SIZES

from lmx.common.ctxspec import KV_TYPES, kv_row_bytes

SWA_PERIOD = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "llama4": 4}
CUDA_OVERHEAD = 640 << 20      # CUDA context + cuBLAS workspace, once per worker process
MIB = 1 << 20
SLACK = 96 << 10               # small tensors and alignment in the compute buffer
# GGML type id -> (block elements, block bytes); every type the gguf package knows.
GGML_SIZES = {int(qtype): sizes for qtype, sizes in GGML_QUANT_SIZES.items()}


class UnknownShape(ValueError):
    """The metadata lacks what the estimator needs (an architecture it cannot read)."""


@dataclass(frozen=True)
class Shape:
    """What memory depends on, read from GGUF metadata."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple        # per layer
    d_k: int
    d_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int
    swa_layers: tuple       # per layer: True if sliding-window
    tensors: tuple          # (name, ne, ggml_type)

    @property
    def tied_output(self):
        return not any(name == "output.weight" for name, _, _ in self.tensors)


def _per_layer(value, n_layer, default):
    if value is None:
        value = default
    if isinstance(value, list):
        if len(value) != n_layer:
            raise UnknownShape(f"per-layer array of {len(value)} for {n_layer} layers")
        return tuple(int(v) for v in value)
    return (int(value),) * n_layer


def _swa_layers(meta, arch, n_layer):
    n_swa = int(meta.get(f"{arch}.attention.sliding_window") or 0)
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if n_swa <= 0 or (arch not in SWA_PERIOD and pattern is None):
        return 0, (False,) * n_layer
    if isinstance(pattern, list):
        return n_swa, tuple(bool(p) for p in pattern[:n_layer])
    p = int(pattern) if pattern is not None else SWA_PERIOD[arch]
    return n_swa, tuple(p == 0 or il % p < p - 1 for il in range(n_layer))


def shape_from_metadata(meta):
    """A Shape from read_metadata(path, with_tensors=True); UnknownShape if keys are missing."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise UnknownShape("no general.architecture")
    get = lambda k, d=None: meta.get(f"{arch}.{k}", d)  # noqa: E731
    n_layer, n_embd = get("block_count"), get("embedding_length")
    heads = get("attention.head_count")
    n_vocab = get("vocab_size") or meta.get("tokenizer.ggml.tokens")
    if None in (n_layer, n_embd, heads, n_vocab):
        raise UnknownShape(f"{arch}: missing block_count/embedding_length/head_count/vocab")
    n_head = max(heads) if isinstance(heads, list) else int(heads)
    if n_head <= 0:
        raise UnknownShape(f"{arch}: head_count is 0")
    n_swa, swa = _swa_layers(meta, arch, n_layer)
    ff = get("feed_forward_length", 0)
    return Shape(arch=arch, n_layer=int(n_layer), n_embd=int(n_embd), n_head=n_head,
                 n_head_kv=_per_layer(get("attention.head_count_kv"), n_layer, n_head),
                 d_k=int(get("attention.key_length", n_embd // n_head)),
                 d_v=int(get("attention.value_length", n_embd // n_head)),
                 n_ff=max(ff) if isinstance(ff, list) else int(ff), n_vocab=int(n_vocab),
                 n_ctx_train=int(get("context_length", 4096)), n_swa=n_swa, swa_layers=swa,
                 tensors=tuple(meta.get("GGUF.tensors", ())))


def pad(n, to):
    """n rounded up to a multiple of `to`."""
    return -(-n // to) * to


def tensor_bytes(ne, ggml_type, cuda=False):
    """Bytes of one tensor; on CUDA rows of quantized types pad to 512 and sizes to 128."""
    if ggml_type not in GGML_SIZES:
        raise UnknownShape(f"unknown GGML type {ggml_type}")
    block, size = GGML_SIZES[ggml_type]
    row = ne[0] if ne else 1
    rows = math.prod(ne[1:]) if len(ne) > 1 else 1
    nbytes = row // block * size * rows
    if cuda and block > 1 and row % 512:
        nbytes += (pad(row, 512) - row) // block * size     # MMQ row padding, once per tensor
    return pad(nbytes, 128) if cuda else nbytes


def _layer_of(name, n_layer):
    if name.startswith("blk."):
        return int(name.split(".")[1])
    if name.startswith(("output", "cls")):
        return n_layer
    return -1                                               # input layer (token_embd, ...)


def weight_bytes(shape, n_gpu_layers, cuda):
    """(device, host) bytes of the weights."""
    ngl = shape.n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    start = max(shape.n_layer + 1 - ngl, 0)
    device = host = 0
    for name, ne, ggml_type in shape.tensors:
        il = _layer_of(name, shape.n_layer)
        on_device = cuda and il >= start
        nbytes = tensor_bytes(ne, ggml_type, on_device)
        if on_device:
            device += nbytes
        else:
            host += nbytes
        if name == "token_embd.weight" and shape.tied_output and cuda and shape.n_layer >= start:
            device += tensor_bytes(ne, ggml_type, True)     # tied output copy
    return device, host


@dataclass(frozen=True)
class Sizing:
    """llama.cpp's effective context sizes for a spec (cells are per KV stream)."""

    n_ctx: int
    n_batch: int
    n_ubatch: int
    swa_cells: int
    n_outputs: int
    n_ctx_seq: int = 0
    streams: int = 1


def sizing(shape, spec):
    """Apply llama.cpp's padding and clamping to a ContextSpec.

    lmx builds non-unified KV caches (llama.cpp's default): n_seq streams of
    n_ctx_seq = pad(n_ctx / n_seq, 256) cells each.
    """
    n_ctx = pad(spec.n_ctx or shape.n_ctx_train, 256)
    n_batch = min(n_ctx, spec.n_batch)
    n_ubatch = min(n_batch, spec.n_ubatch)
    n_ctx_seq = n_ctx if spec.n_seq == 1 else pad(n_ctx // spec.n_seq, 256)
    swa = n_ctx_seq if spec.swa_full else pad(min(n_ctx_seq, shape.n_swa + n_ubatch), 256)
    return Sizing(n_ctx, n_batch, n_ubatch, swa, min(spec.n_outputs_max, n_batch), n_ctx_seq,
                  spec.n_seq)


def kv_bytes(shape, spec, size):
    """Bytes of the KV cache (K and V of every layer)."""
    dv_max = max(shape.d_v * h for h in shape.n_head_kv)
    total = 0
    for il in range(shape.n_layer):
        cells = size.streams * (size.swa_cells if shape.swa_layers[il] else size.n_ctx_seq)
        hkv = shape.n_head_kv[il]
        v_row = shape.d_v * hkv if spec.flash_attn else dv_max
        total += cells * (kv_row_bytes(spec.type_k, shape.d_k * hkv) +
                          kv_row_bytes(spec.type_v, v_row))
    return total


def compute_bytes(shape, spec, size, cuda=True):
    """Upper bound of the compute buffer: the largest of the graph's peaks.

    The three peaks (logits, attention, FFN) follow the activations alive at once in
    llama.cpp's graphs: the FFN peak holds the gate/up/down activations (3F), three
    embedding-wide tensors and the attention output (H x Dv wide when that exceeds E), plus the
    masks. Calibrated on SmolLM2, Gemma 3 and generated llama/qwen2 shapes on the CPU backend
    (benchmarks/estimate_accuracy.py, tests/test_estimator.py). A quantized K cache adds the Q
    conversion (CPU flash attention) or f16 copies of K and V (CUDA flash attention).
    """
    t, e, h = size.n_ubatch, shape.n_embd, shape.n_head
    n_kv = size.n_ctx_seq
    per_cell = 2 if spec.flash_attn else 4
    masks = n_kv * t * per_cell + (size.swa_cells * t * per_cell if any(shape.swa_layers) else 0)
    c_out = 4 * size.n_outputs * shape.n_vocab + 8 * e * t
    c_attn = (0 if spec.flash_attn else 4 * t * h * n_kv) + masks + \
        4 * t * (3 * e + 3 * h * shape.d_k)
    c_ffn = 4 * t * (3 * shape.n_ff + 3 * e + max(e, h * shape.d_v)) + masks
    if any(shape.swa_layers) and not spec.flash_attn:
        # iSWA graphs without flash attention keep the SWA layers' scores next to the FFN peak
        c_ffn += 4 * t * h * min(n_kv, shape.n_swa)
    extra = SLACK
    if KV_TYPES[spec.type_k][1] > 1 and spec.flash_attn:
        # Q converted to q8_1 for the dot products
        extra += t * h * shape.d_k * 36 // 32
        if cuda:
            extra += n_kv * (shape.d_k + shape.d_v) * max(shape.n_head_kv) * 2
    return max(c_out, c_attn, c_ffn) * 102 // 100 + extra


@dataclass(frozen=True)
class Breakdown:
    """Bytes of one model and one context; device_total is what the ledger books."""

    weights_device: int
    weights_host: int
    kv: int
    compute: int
    output_host: int
    overhead: int
    n_ctx: int

    @property
    def context_device(self):
        """What one agent's context costs on the device."""
        return self.kv + self.compute

    @property
    def device_total(self):
        return self.weights_device + self.context_device + self.overhead

    def as_dict(self):
        return dict(asdict(self), context_device=self.context_device,
                    device_total=self.device_total)


def estimate(shape, spec, device="cuda"):
    """The breakdown for this shape and ContextSpec on a 'cuda' or 'cpu' device.

    On 'cpu' the CPU backend stands in for the device: every weight counts (mapped from the file),
    nothing is duplicated, and there is no CUDA overhead.
    """
    cuda = device == "cuda"
    size = sizing(shape, spec)
    w_dev, w_host = weight_bytes(shape, spec.n_gpu_layers if cuda else 0, cuda)
    if not cuda:
        w_dev, w_host = w_host, 0
    return Breakdown(weights_device=w_dev, weights_host=w_host, kv=kv_bytes(shape, spec, size),
                     compute=compute_bytes(shape, spec, size, cuda),
                     output_host=4 * shape.n_vocab * max(size.n_outputs, spec.n_seq),
                     overhead=CUDA_OVERHEAD if cuda else 0, n_ctx=size.n_ctx)

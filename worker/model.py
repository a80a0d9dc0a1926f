"""What the engine is built from: a loaded model, an agent's slot, and small helpers."""
import llama_cpp  # noqa: I001  -- before numpy (CUDA load order), as everywhere in the worker

import codecs
import ctypes
import logging
import os
import time

log = logging.getLogger("lmx.worker")
TRACE = os.environ.get("LMX_TRACE_STEPS") == "1"   # a debug line per step and per park


def device_bytes(buffers, cuda):
    """Sum of llama.cpp's device buffers: model, KV and compute, never the host output buffer.

    On a CPU worker the CPU backend stands in for the device, so its buffers count.
    """
    total = 0
    for key, nbytes in buffers.items():
        dev, kind = key.split()
        if kind == "output" or "_Host" in dev or (cuda and dev.startswith("CPU")):
            continue
        total += nbytes
    return total


try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def trim_heap():
    """Give freed heap back to the OS (glibc keeps it in per-thread arenas otherwise)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class Emitter:
    """Calls on_token with whole UTF-8 characters, and notes when the first token came."""

    def __init__(self, model, on_token, first):
        self.model, self.on_token, self.first = model, on_token, first
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def __call__(self, index, token):
        self.mark()
        if self.on_token is not None:
            self.on_token(index, token, self.decoder.decode(self.model.piece(token)))

    def mark(self):
        """The first token came now (its streaming may follow later: Engine.emit_pending)."""
        if not self.first:
            self.first.append(time.perf_counter())


class LoadProgress:
    """llama.cpp's progress callback for one model load (llama_model_params.progress_callback,
    called inside llama_model_load_from_file), throttled: send(fraction) when MIN_STEP more is
    loaded or MIN_GAP_S passed since the last send, never a smaller fraction, and 1.0 once.
    Keep the object alive during the load: it holds the ctypes callback."""

    MIN_STEP = 0.05
    MIN_GAP_S = 0.1

    def __init__(self, send, clock=time.monotonic):
        self.send, self.clock = send, clock
        self.last, self.at = None, None          # the last fraction sent, and when
        self.c_callback = llama_cpp.llama_progress_callback(self._called)

    def _called(self, fraction, _user_data):
        try:
            self.offer(float(fraction))
        except Exception:  # raising into C would return false and abort the load
            log.exception("worker: sending load progress failed")
        return True

    def offer(self, fraction):
        """One reading from llama.cpp: send it if the throttle lets it through."""
        fraction = min(max(fraction, 0.0), 1.0)
        if self.last is not None and (fraction <= self.last or (
                fraction < 1.0 and fraction - self.last < self.MIN_STEP and
                self.clock() - self.at < self.MIN_GAP_S)):
            return
        self.last, self.at = fraction, self.clock()
        self.send(fraction)

    def finish(self):
        """The load succeeded: make sure 1.0 was said."""
        self.offer(1.0)


def nvml_delta(before, after):
    return None if before is None or after is None else after - before


class Model:
    """One loaded GGUF, shared by every agent on it."""

    def __init__(self, path, ptr, load_ms, buffers, nvml_delta):
        self.path = path
        self.nvml_delta = nvml_delta
        self.ptr = ptr
        self.vocab = llama_cpp.llama_model_get_vocab(ptr)
        self._pieces = {}         # (token, special) -> bytes
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        raw = llama_cpp.llama_model_chat_template(ptr, None)
        self.chat_template = raw.decode("utf-8", "replace") if raw else None
        self.bos_text = self._special_text(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_text = self._special_text(llama_cpp.llama_vocab_eos(self.vocab))
        self.n_swa = llama_cpp.llama_model_n_swa(ptr)
        self.refs = 0
        self.load_ms = load_ms
        self.buffers = buffers

    def _special_text(self, token):
        # A vocab without that token reports -1: the template then gets "".
        return self.piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def tokenize(self, text, add_bos, special=False):
        """Text -> token ids; special: parse special-token text (a rendered chat template)."""
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_bos, special)
        return list(buf[:n])

    def piece(self, token, special=False):
        """One token's bytes (special: control tokens as their text, else as nothing);
        remembered per token (the stream asks for every token of every agent)."""
        key = (token, special)
        got = self._pieces.get(key)
        if got is None:
            got = self._pieces[key] = self._piece(token, special)
        return got

    def _piece(self, token, special):
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]


class Slot:
    """One agent: its model, its context size, its conversation and its parked state."""

    def __init__(self, agent, model, spec):
        self.agent = agent
        self.model = model
        self.spec = spec
        self.n_ctx = spec.n_ctx
        self.tokens = []         # exactly the tokens in its KV cache, in order (prefix reuse)
        self.pending = []        # sampled but not yet evaluated (the last token of a reply)
        self.group = None        # the Group it is live in (seats.py), and its seat there
        self.seq = None
        self.parked = None       # HostBuffer with llama_state_seq_get_data output
        self.parked_bytes = 0
        self.on_disk = False     # parked state only in a file (a PARK sent it to disk)
        self.disk_copy = None    # parkdisk.Pending: the parked buffer's copy not yet written
        self.parks = 0
        self.decodes = 0
        self.generated = 0

    @property
    def n_past(self):
        """Tokens already in the KV cache."""
        return len(self.tokens)

"""llama.cpp in one process: models shared by refcount, one slot per agent, one live context.

An agent switch parks the live context's state in host memory with the low-level
``llama_state_get_data`` (pinned memory on CUDA), frees that context, and builds (or restores
with ``llama_state_set_data``) the next agent's context. Decode is greedy and driven here, token
by token, with ``llama_decode``; the high-level ``Llama`` class is not used (its save_state copies
the whole logits history).
"""
import llama_cpp  # noqa: I001  -- must precede numpy: the CUDA load segfaulted otherwise

import collections
import ctypes
import logging
import os
import time

import numpy as np

from lmx.common.ctxspec import KV_TYPES
from lmx.common.errors import Code, LmxError, Reason
from lmx.worker import parkdisk
from lmx.worker.device import HostBuffer
from lmx.worker.model import Model, Slot, Emitter, nvml_delta, trim_heap, device_bytes
from lmx.worker.llamalog import LlamaLog

log = logging.getLogger("lmx.worker")
FLASH_ATTN = {True: 1, False: 0}     # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED


class Engine:
    """Models, slots and the one live context of this worker."""

    def __init__(self, n_threads, gpu, pinned, process_bytes=None, park_dir=None, max_live=1):
        self.process_bytes = process_bytes or (lambda: None)   # NVML reading of this process
        self.max_live = max(1, max_live)  # contexts kept live at once (every one is booked)
        self.standby = collections.OrderedDict()   # agent -> (slot, ctx): live, not current
        self.park_dir = park_dir          # also park to disk here (survives restarts)
        if park_dir:
            os.makedirs(park_dir, mode=0o700, exist_ok=True)
        self.n_threads = n_threads
        self.gpu = gpu
        self.pinned = pinned
        self.models = {}
        self.slots = {}
        self.loads = 0
        self._one = (llama_cpp.llama_token * 1)()
        self.live = None          # the Slot whose context is live
        self.ctx = None
        self.llama_log = LlamaLog()
        llama_cpp.llama_backend_init()

    # -- models -------------------------------------------------------------------------

    def _acquire(self, path):
        model = self.models.get(path)
        if model is None:
            params = llama_cpp.llama_model_default_params()
            params.n_gpu_layers = -1 if self.gpu else 0
            self.llama_log.reset()
            before = self.process_bytes()
            t0 = time.perf_counter()
            ptr = llama_cpp.llama_model_load_from_file(path.encode(), params)
            if not ptr:
                why = self.llama_log.last_error() or "llama.cpp returned no model"
                raise LmxError(Code.MODEL_ERROR, f"llama.cpp could not load {path}: {why}",
                               Reason.LOAD_FAILED, path=path)
            model = Model(path, ptr, (time.perf_counter() - t0) * 1000,
                          self.llama_log.buffers(), nvml_delta(before, self.process_bytes()))
            if not self.loads:
                # The first load in a process also creates the CUDA context: its NVML delta is
                # not the model's (the broker books the context as the worker's overhead).
                model.nvml_delta = None
            self.loads += 1
            self.models[path] = model
            log.info("worker: loaded %s in %.0f ms", path, model.load_ms)
        model.refs += 1
        return model

    def _release(self, model):
        model.refs -= 1
        if model.refs == 0:
            llama_cpp.llama_model_free(model.ptr)
            del self.models[model.path]
            trim_heap()
            log.info("worker: freed %s", model.path)
            return True
        return False

    # -- agents -------------------------------------------------------------------------

    def register(self, agent, path, spec, resume=False):
        """Acquire the model (refcounted) and create the agent's slot (spec: ContextSpec).

        resume: pick up the agent's state parked on disk before a restart, if it matches."""
        if agent in self.slots:
            raise LmxError(Code.AGENT_EXISTS, f"agent {agent!r} already has a slot")
        fresh = path not in self.models
        model = self._acquire(path)
        slot = self.slots[agent] = Slot(agent, model, spec)
        resumed = resume and self._resume(slot)
        if not resume and self.park_dir:
            parkdisk.remove(self.park_dir, agent)         # a new agent of an old name
        return {"model_loaded": fresh, "model_refs": model.refs, "resumed": resumed,
                "load_ms": round(model.load_ms, 1) if fresh else 0.0,
                "buffers": model.buffers, "n_vocab": model.n_vocab,
                "model_measured": {"device_bytes": device_bytes(model.buffers, self.gpu),
                                   "nvml_delta": model.nvml_delta}}

    def _disk_key(self, slot):
        return {"model": slot.model.path, "model_size": os.path.getsize(slot.model.path),
                "spec": slot.spec.as_dict()}

    def _resume(self, slot):
        """Load parked state from disk into host memory; True if there was a valid one."""
        found = self.park_dir and parkdisk.load(self.park_dir, slot.agent, self._disk_key(slot))
        if not found:
            return False
        raw, meta = found
        buf = HostBuffer(len(raw), self.pinned)
        ctypes.memmove(buf.data, raw, len(raw))
        slot.parked, slot.parked_bytes = buf, len(raw)
        slot.n_past, slot.pending = meta["n_past"], meta["pending"]
        log.info("worker: resumed %s from disk (%d tokens)", slot.agent, slot.n_past)
        return True

    def unregister(self, agent):
        """Free the agent's context or parked state, its slot, and its model reference."""
        slot = self._slot(agent)
        if self.live is slot:
            self._free_ctx()
        elif agent in self.standby:
            llama_cpp.llama_free(self.standby.pop(agent)[1])
        self._drop_parked(slot)
        if self.park_dir:
            parkdisk.remove(self.park_dir, agent)
        del self.slots[agent]
        return {"model_freed": self._release(slot.model)}

    def _slot(self, agent):
        slot = self.slots.get(agent)
        if slot is None:
            raise LmxError(Code.UNKNOWN_AGENT, f"no agent {agent!r} on this worker")
        return slot

    # -- contexts -----------------------------------------------------------------------

    def _ctx_params(self, spec):
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = spec.n_ctx
        p.n_batch = spec.n_batch
        p.n_ubatch = spec.n_ubatch
        p.n_seq_max = spec.n_seq
        p.n_outputs_max = spec.n_outputs_max
        p.swa_full = spec.swa_full
        p.flash_attn_type = FLASH_ATTN[spec.flash_attn]
        p.type_k = KV_TYPES[spec.type_k][0]
        p.type_v = KV_TYPES[spec.type_v][0]
        p.n_threads = p.n_threads_batch = self.n_threads
        p.no_perf = True
        return p

    def _new_ctx(self, slot):
        self.llama_log.reset()
        before = self.process_bytes()
        ctx = llama_cpp.llama_init_from_model(slot.model.ptr, self._ctx_params(slot.spec))
        if not ctx:
            why = self.llama_log.last_error() or "llama_init_from_model returned NULL"
            raise LmxError(Code.MODEL_ERROR, f"cannot create a {slot.n_ctx}-token context for "
                           f"{slot.agent!r}: {why}", Reason.CONTEXT_FAILED)
        self.ctx, self.live = ctx, slot
        slot.ctx_buffers = self.llama_log.buffers()
        slot.measured = {"device_bytes": device_bytes(slot.ctx_buffers, self.gpu),
                         "nvml_delta": nvml_delta(before, self.process_bytes()),
                         "buffers": slot.ctx_buffers}

    def _free_ctx(self):
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
        self.ctx = self.live = None

    def _park(self, slot, ctx):
        """Save a context's state to host memory (and disk), free the context; return the agent."""
        if slot.n_past:
            size = llama_cpp.llama_state_get_size(ctx)
            buf = HostBuffer(size, self.pinned)
            written = llama_cpp.llama_state_get_data(ctx, buf.data, size)
            slot.parked, slot.parked_bytes = buf, written
            if self.park_dir:
                parkdisk.save(self.park_dir, slot.agent, ctypes.string_at(buf.data, written),
                              dict(self._disk_key(slot), n_past=slot.n_past,
                                   pending=slot.pending))
        llama_cpp.llama_free(ctx)
        return slot.agent

    def _make_room(self):
        """Move the current context to standby, then park the least recently used contexts
        until at most max_live - 1 wait there; return the last agent parked, or None."""
        if self.live is not None:
            self.standby[self.live.agent] = (self.live, self.ctx)
            self.ctx = self.live = None
        evicted = None
        while len(self.standby) > self.max_live - 1:
            _, (slot, ctx) = self.standby.popitem(last=False)
            evicted = self._park(slot, ctx)
        return evicted

    def _drop_parked(self, slot):
        if slot.parked is not None:
            slot.parked.free()
        slot.parked, slot.parked_bytes = None, 0

    def _activate(self, slot):
        """Make slot's context current; return (evicted agent or None, restored?).

        A context still live in standby is switched to without a swap; otherwise the least
        recently used live context is parked if max_live are live already."""
        if self.live is slot:
            return None, False
        if slot.agent in self.standby:
            _, ctx = self.standby.pop(slot.agent)
            self._make_room()
            self.ctx, self.live = ctx, slot
            return None, False
        evicted = self._make_room()
        self._new_ctx(slot)
        if slot.parked is None:
            return evicted, False
        read = llama_cpp.llama_state_set_data(self.ctx, slot.parked.data, slot.parked_bytes)
        self._drop_parked(slot)
        if self.park_dir:
            parkdisk.remove(self.park_dir, slot.agent)    # the live context is the truth now
        if read == 0:
            slot.n_past, slot.pending = 0, []
            raise LmxError(Code.INTERNAL, f"restoring {slot.agent!r} failed; its context was "
                           "reset")
        return evicted, True

    # -- decode -------------------------------------------------------------------------

    def _eval(self, tokens):
        step = min(self.live.spec.n_batch, self.live.n_ctx)
        for i in range(0, len(tokens), step):
            chunk = tokens[i:i + step]
            if len(chunk) == 1:           # the decode loop: reuse one array, no allocation
                self._one[0] = chunk[0]
                arr = self._one
            else:
                arr = (llama_cpp.llama_token * len(chunk))(*chunk)
            rc = llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(arr, len(chunk)))
            if rc != 0:
                raise LmxError(Code.INTERNAL, f"llama_decode failed with {rc}")
            self.live.n_past += len(chunk)

    def _argmax(self, n_vocab):
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def decode(self, *args, **kwargs):
        """Run decode_steps() to the end and return its result."""
        steps = self.decode_steps(*args, **kwargs)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def decode_steps(self, agent, prompt, n_predict, max_prompt_tokens=None, on_token=None,
                     should_stop=None):
        """Greedy-decode up to n_predict tokens after prompt, continuing the conversation.

        A generator: it yields after each generated token, so a scheduler can run other agents
        in between, and returns the result dict. on_token(index, token, text) is called for
        every generated token (text holds only complete UTF-8 characters); should_stop() is
        asked after each token and returns a reason ("cancel", "deadline") or None."""
        t0 = time.perf_counter()
        slot = self._slot(agent)
        model = slot.model
        prompt_tokens = model.tokenize(prompt, add_bos=model.add_bos and slot.n_past == 0
                                       and not slot.pending)
        if not prompt_tokens:
            raise LmxError(Code.BAD_REQUEST, "prompt has no tokens", Reason.BAD_VALUE)
        if max_prompt_tokens and len(prompt_tokens) > max_prompt_tokens:
            raise LmxError(Code.LIMIT, f"prompt has {len(prompt_tokens)} tokens, the limit is "
                           f"{max_prompt_tokens}", Reason.PROMPT_TOKENS,
                           prompt_tokens=len(prompt_tokens), limit=max_prompt_tokens)
        feed = slot.pending + prompt_tokens
        need = slot.n_past + len(feed) + n_predict
        if need > slot.n_ctx:
            raise LmxError(Code.CONTEXT_FULL, f"{slot.n_past} tokens in context + "
                           f"{len(feed)} new + n_predict {n_predict} > n_ctx {slot.n_ctx}",
                           n_past=slot.n_past, n_ctx=slot.n_ctx, needed=need)
        built = self.live is not slot and agent not in self.standby
        evicted, restored = self._activate(slot)
        t_swap = time.perf_counter()
        slot.pending = []
        self._eval(feed)
        t_prompt = time.perf_counter()
        first = []
        emit = Emitter(model, on_token, first)
        out, eos, stopped_by = yield from self._generate(slot, n_predict, emit, should_stop)
        t_end = time.perf_counter()
        slot.decodes += 1
        slot.generated += len(out)
        text = b"".join(model.piece(t) for t in out)
        return {"prompt_tokens": len(prompt_tokens), "generated_tokens": len(out),
                "stopped_on_eos": eos, "elapsed_ms": round((t_end - t0) * 1000, 2),
                "swap_ms": round((t_swap - t0) * 1000, 2),
                "prompt_ms": round((t_prompt - t_swap) * 1000, 2),
                "gen_ms": round((t_end - t_prompt) * 1000, 2),
                "kv_swap_evicted": evicted, "kv_swap_restored": restored,
                "stopped_by": stopped_by,
                "ttft_ms": round((first[0] - t0) * 1000, 2) if first else None,
                "n_past": slot.n_past + len(slot.pending),
                "text": text.decode("utf-8", "replace"), "tokens": out,
                "context_measured": slot.measured if built else None}

    def _generate(self, slot, n_predict, emit, should_stop):
        """Sample greedily; the last sampled token stays pending until the next turn.

        Yields between tokens while the newest token is still pending, so that whatever ran
        meanwhile (even a park and restore, which keeps no logits) leaves nothing to redo.
        Returns (tokens, stopped on end-of-generation, early-stop reason or None)."""
        vocab, n_vocab = slot.model.vocab, slot.model.n_vocab
        out = []
        while True:
            tok = self._argmax(n_vocab)
            slot.pending = [tok]
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                return out, True, None  # the end-of-turn token is not part of the reply
            out.append(tok)
            emit(len(out) - 1, tok)
            if len(out) >= n_predict:
                return out, False, None
            reason = should_stop() if should_stop else None
            if reason:
                return out, False, reason
            yield
            self._activate(slot)        # another agent may have run in between
            slot.pending = []
            self._eval([tok])

    # -- reporting ----------------------------------------------------------------------

    def summary(self):
        """What STATUS shows of this worker: models with refs, agents, the live one."""
        known = sum(device_bytes(m.buffers, self.gpu) for m in self.models.values())
        live = ([self.live] if self.live is not None else []) + [s for s, _ in
                                                                 self.standby.values()]
        known += sum(s.measured["device_bytes"] for s in live if s.measured)
        return {"live_agent": self.live.agent if self.live else None,
                "live_agents": [s.agent for s in live],
                "known_device_bytes": known, "process_bytes": self.process_bytes(),
                "models": {p: {"refs": m.refs, "buffers": m.buffers}
                           for p, m in self.models.items()},
                "slots": {a: {"model": s.model.path, "n_ctx": s.n_ctx, "n_past": s.n_past,
                              "measured_bytes": s.measured and s.measured["device_bytes"],
                              "parked_bytes": s.parked_bytes,
                              "live": s is self.live or a in self.standby,
                              "parked_on_disk": bool(s.parked and self.park_dir),
                              "parked_pinned": bool(s.parked and s.parked.pinned),
                              "decodes": s.decodes, "generated": s.generated}
                          for a, s in self.slots.items()}}

    def close(self):
        """Free every context, parked buffer and model."""
        self._free_ctx()
        for _, ctx in self.standby.values():
            llama_cpp.llama_free(ctx)
        self.standby.clear()
        for slot in list(self.slots.values()):
            self._drop_parked(slot)
        for model in list(self.models.values()):
            llama_cpp.llama_model_free(model.ptr)
        self.slots.clear()
        self.models.clear()

"""A CHAT's sampler chain: grammar, penalties, top-k, top-p, min-p, temperature, dist(seed).

One llama.cpp chain per Run, freed when the Run ends. ``llama_sampler_sample(chain, ctx, i)``
reads the logits of output row i of the last llama_decode (so every agent of a batch samples
its own row of the one shared decode) and accepts the token into the chain (penalty history,
RNG). The chain's RNG is its own, so the same seed over the same logits gives the same tokens
whether the agent ran alone or in a batch.

A grammar is applied as llama.cpp's common_sampler applies it: the chain samples freely, the
grammar checks only the chosen token, and only a rejected token costs a pass of the grammar
over the whole vocabulary and a second draw (a grammar over ~50k tokens costs ~10 ms a token
on CPU; one token costs microseconds). Both passes are numpy copies and llama.cpp calls, never
Python loops over the vocabulary.
"""
import llama_cpp  # noqa: I001  -- before numpy (CUDA load order), as everywhere in the worker

import ctypes
import random
import re

import numpy as np

from lmx.common.errors import Code, LmxError, Reason

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
# llama.cpp treats this seed as "pick one at random": never hand it over as a real seed.
LLAMA_DEFAULT_SEED = 0xFFFFFFFF


def pick_seed(seed):
    """The seed the chain uses: the request's, or a random 32-bit one (reported back)."""
    return random.randrange(0, LLAMA_DEFAULT_SEED) if seed is None else int(seed)


def trigger_pattern(trigger):
    """A lazy grammar's pattern: llama.cpp matches it against the whole output so far and
    feeds the grammar from the first group on, so the trigger may come after any text."""
    return r"^[\s\S]*?(" + re.escape(trigger) + r")[\s\S]*"


class Chain:
    """One llama.cpp sampler chain built from a Sampling record (and an optional grammar)."""

    def __init__(self, model, sampling, seed, grammar=None, field="grammar"):
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self.ptr = llama_cpp.llama_sampler_chain_init(params)
        self.seed, self.grammar = seed, None
        try:
            if grammar is not None:
                self.grammar = _grammar(model, *grammar)
                if not self.grammar:
                    raise LmxError(Code.BAD_REQUEST, f"llama.cpp could not build the {field} "
                                   "grammar", Reason.BAD_VALUE, field=field)
                self._cur = np.zeros(model.n_vocab, TOKEN_DATA)
                self._ids = np.arange(model.n_vocab, dtype=np.int32)
                self._one = (llama_cpp.llama_token_data * 1)()
            self._add_samplers(model, sampling)
        except BaseException:
            self.free()
            raise

    def _add(self, sampler, field="sampling"):
        if not sampler:
            raise LmxError(Code.BAD_REQUEST, f"llama.cpp could not build the {field} sampler",
                           Reason.BAD_VALUE, field=field)
        llama_cpp.llama_sampler_chain_add(self.ptr, sampler)   # the chain owns it now

    def _add_samplers(self, model, s):
        if (s.repeat_penalty != 1.0 or s.frequency_penalty != 0.0
                or s.presence_penalty != 0.0) and s.penalty_last_n != 0:
            # llama-cpp-python 0.3.36 declares a leading n_vocab that llama.cpp's C function
            # (int32 last_n, float repeat, float freq, float present) no longer has: the
            # first int lands in last_n, so last_n goes in both int places.
            self._add(llama_cpp.llama_sampler_init_penalties(
                s.penalty_last_n, s.penalty_last_n, s.repeat_penalty, s.frequency_penalty,
                s.presence_penalty))
        if s.temperature <= 0:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        if s.top_k and s.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(s.top_k))
        if s.top_p is not None and s.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p:
            self._add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(s.temperature))
        self._add(llama_cpp.llama_sampler_init_dist(self.seed))

    def sample(self, ctx, index):
        """Sample output row `index` of the last decode (-1: the last row) and accept it."""
        if self.grammar is None:
            return llama_cpp.llama_sampler_sample(self.ptr, ctx, index)
        logits = llama_cpp.llama_get_logits_ith(ctx, index)
        tok = self._draw(logits, grammar_first=False)
        one = self._one
        one[0].id, one[0].logit, one[0].p = tok, 1.0, 0.0
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(
            llama_cpp.llama_token_data_array(one, 1, -1, False)))
        if not np.isfinite(one[0].logit):      # the grammar rejects it: draw among the valid
            tok = self._draw(logits, grammar_first=True)
        llama_cpp.llama_sampler_accept(self.grammar, tok)
        llama_cpp.llama_sampler_accept(self.ptr, tok)
        return tok

    def _draw(self, logits, grammar_first):
        """One pass of the chain (after the grammar, if asked) over every token's logit."""
        cur = self._cur
        cur["id"] = self._ids          # samplers sort in place: ids in order again
        cur["logit"] = np.ctypeslib.as_array(logits, shape=(len(cur),))
        cur["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(
            cur.ctypes.data_as(llama_cpp.llama_token_data_p), len(cur), -1, False)
        if grammar_first:
            llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(arr))
        llama_cpp.llama_sampler_apply(self.ptr, ctypes.byref(arr))
        return int(arr.data[arr.selected].id)

    def free(self):
        """Free the chain, every sampler in it and the grammar (idempotent)."""
        if self.ptr:
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


def _grammar(model, gbnf, trigger=None):
    """A grammar sampler: from the first token, or lazy until `trigger` appears."""
    if trigger is None:
        return llama_cpp.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
    patterns = (ctypes.c_char_p * 1)(trigger_pattern(trigger).encode())
    return llama_cpp.llama_sampler_init_grammar_lazy_patterns(
        model.vocab, gbnf.encode(), b"root", patterns, 1, None, 0)

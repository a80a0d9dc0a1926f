"""Decoding on the engine's groups: a DECODE's Run, and one token for every running agent of a
group per llama_decode (mixed into Engine).

Each step evaluates the pending token of every running agent of a group in one llama_decode,
and chunks of newcomers' prompts in a second one (batchplan.py plans both so that each is one
ubatch): continuous batching, so a newcomer's long prompt rides along with the running agents'
tokens instead of stalling them. Every greedy row's argmax at once, every sampled (CHAT) row
through its own chain. A prompt whose last chunk went in gets its first token in the same step.
The sampled token stays pending until the next step, so
whatever happens between steps (a park, a resize) loses nothing.
"""
import llama_cpp  # noqa: I001  -- must precede numpy: the CUDA load segfaulted otherwise

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lmx.common.errors import Code, LmxError, Reason
from lmx.common.jobs import DecodeResult
from lmx.worker import batchplan
from lmx.worker.model import TRACE, Emitter


def run_stats(run, t_first):
    """The RunStats fields of a finished DECODE or CHAT (and its slot's counters, bumped)."""
    slot, t_end = run.slot, time.perf_counter()
    slot.decodes += 1
    slot.generated += len(run.out)
    t_prompt = run.t_prompt or t_end
    return dict(elapsed_ms=round((t_end - run.t0) * 1000, 2),
                swap_ms=round((run.t_live - run.t0) * 1000, 2),
                prompt_ms=round((t_prompt - run.t_live) * 1000, 2),
                gen_ms=round((t_end - t_prompt) * 1000, 2),
                ttft_ms=round((t_first - run.t0) * 1000, 2) if t_first else None,
                kv_swap_restored=run.restored, batch=run.batch,
                n_past=slot.n_past + len(slot.pending))


SAMPLER_THREADS = max(1, min(8, len(os.sched_getaffinity(0))))
log = logging.getLogger("lmx.worker")


def _sample_part(ctx, chains, rows):
    return [chain.sample(ctx, i) for chain, i in zip(chains, rows)]


def _unfill(group, fillers):
    """Remove the filler tokens from their seats (their cells only)."""
    if fillers:
        mem = llama_cpp.llama_get_memory(group.ctx)
        for seq, pos in fillers:
            llama_cpp.llama_memory_seq_rm(mem, seq, pos, -1)


class Run:
    """One DECODE in progress: its slot, what it generated, its clocks."""

    def __init__(self, slot, prompt_tokens, n_predict, emit, should_stop, t0):
        self.slot, self.n_predict, self.emit, self.should_stop = slot, n_predict, emit, should_stop
        self.prompt_tokens = prompt_tokens
        self.out = []
        self.t0, self.t_live, self.t_prompt = t0, None, None
        self.restored = False
        self.batch = 0              # the most agents in one of its llama_decode batches
        self.result = None          # its DecodeResult, set when it finishes
        self.eos = False
        self.stopped_by = None

    chain = None                    # greedy: no sampler chain (a CHAT's Run has one)

    @property
    def agent(self):
        return self.slot.agent

    def take(self, engine, tok):
        """The sampled token; True if the run is done."""
        return engine._take(self, tok)

    def go_live(self, engine):
        """Nothing to do once live: the prompt is already pending."""

    def close(self):
        """Nothing to free: a DECODE holds no native resources."""


class DecodeMixin:
    """start / prepare / step: the Engine's decode, over its slots and groups."""

    def start(self, agent, prompt, n_predict, max_prompt_tokens=None, on_token=None,
              should_stop=None):
        """Check and tokenize a DECODE; return its Run (nothing runs yet).

        on_token(index, token, text) is called for every generated token (text holds only
        complete UTF-8 characters); should_stop() is asked after each token and returns a
        reason ("cancel", "deadline") or None."""
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
        run = Run(slot, prompt_tokens, n_predict, Emitter(model, on_token, []), should_stop,
                  t0)
        run.prior = slot.pending       # what to put back if it never runs
        slot.pending = feed            # evaluated by the next step
        return run

    def decode(self, agent, prompt, n_predict, max_prompt_tokens=None, on_token=None,
               should_stop=None):
        """Run one DECODE alone to its end and return its DecodeResult (tests, tools)."""
        return self.run_alone(self.start(agent, prompt, n_predict, max_prompt_tokens,
                                         on_token, should_stop))

    def run_alone(self, run):
        """Make a started run live, step it to its end, free it; its result (or the
        STATE_LOST error its restore raised)."""
        try:
            self.prepare([run])
            lost = self.lost.pop(run.agent, None)
            if lost is not None:
                raise lost
            while run.result is None:
                self.step([run])
            return run.result
        finally:
            run.close()

    def run_all(self, runs):
        """Make started runs live and step them together to their ends (tests, tools); their
        results by agent. A run whose restore failed is answered by its STATE_LOST error."""
        try:
            self.prepare(runs)
            done = {}
            for run in runs:
                lost = self.lost.pop(run.agent, None)
                if lost is not None:
                    raise lost
            while runs:
                for run in self.step(runs):
                    done[run.agent] = run.result
                runs = [r for r in runs if r.result is None]
            return done
        finally:
            for run in runs:
                run.close()

    def prepare(self, runs, seats=None):
        """Seat every run's agent (restoring parked state) before its first step; seats:
        agent -> the broker's placement. A run whose state could not be restored (its agent in
        self.lost) must be answered with that STATE_LOST error by the caller, never stepped."""
        fresh = [r for r in runs if r.t_live is None]
        restored = set(self.make_live([r.slot for r in fresh], seats))
        now = time.perf_counter()
        for run in fresh:
            run.t_live = now
            run.restored = run.agent in restored
            if run.agent not in self.lost:
                run.go_live(self)

    def step(self, runs):
        """One step for every run (all live): per group the pending token of each running
        agent in one llama_decode, then chunks of newcomers' prompts in another (each one
        ubatch: batchplan.py); return the runs that finished (their .result, a DecodeResult or
        ChatResult, is set). step_tokens: the tokens it evaluated (fillers included)."""
        self.step_tokens = 0
        by_group = {}
        for run in runs:
            by_group.setdefault(id(run.slot.group), []).append(run)
        finished = []
        for group_runs in by_group.values():
            group = group_runs[0].slot.group
            rows = batchplan.rows_batch(group_runs)
            # the rows' fillers first: planning the prompts moves their tokens into the slots
            rows = batchplan.contiguous(group, rows) if rows else None
            fresh = [run for run in group_runs if len(run.slot.pending) > 1]
            prompts = (batchplan.prompt_batch(group, fresh, group.spec.n_ubatch,
                                              fillers=self.gpu) if fresh else None)
            width = (sum(1 for item in rows[0] if item[3] is not None) if rows else 0) + (
                len(prompts[2]) if prompts else 0)
            for run in group_runs:
                run.batch = max(run.batch, width)
            if rows:
                finished += self._run_batch(group, *rows)
            if prompts:
                finished += self._run_batch(group, prompts[0], prompts[1])
        return finished

    def _run_batch(self, group, items, fillers):
        """Decode one planned batch, remove its fillers, give each row its token; the runs
        that finished."""
        t0 = time.perf_counter()
        self.step_tokens += len(items)
        try:
            self._decode_batch(group, items)
        finally:
            _unfill(group, fillers)
        if self.on_launch is not None:
            self.on_launch()    # llama_decode returned with the GPU at work: stream meanwhile
        rows = [item[3] for item in items if item[3] is not None]
        t1 = time.perf_counter()
        picks = self._picks(group, rows) if rows else []
        now = time.perf_counter()
        if TRACE:
            log.info("step: group %s rows %d tokens %d fillers %d decode %.2f ms picks %.2f ms",
                     group.gid, len(rows), len(items), len(fillers), (t1 - t0) * 1000,
                     (now - t1) * 1000)
        finished = []
        for run, tok in zip(rows, picks):
            if run.t_prompt is None:
                run.t_prompt = now
            if run.take(self, tok):
                finished.append(run)
        return finished

    def _picks(self, group, rows):
        """Each row's token: one vectorized argmax over the greedy (DECODE) rows, and each
        sampled (CHAT) row through its own chain at its output in the batch (outputs are in
        batch order, one per row)."""
        greedy = [i for i, r in enumerate(rows) if r.chain is None]
        picks = [None] * len(rows)
        if greedy:
            # every output's logits in one array, one argmax
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(group.ctx),
                                           shape=(len(rows), group.model.n_vocab))
            if len(greedy) < len(rows):
                logits = logits[greedy]
            for i, tok in zip(greedy, logits.argmax(axis=1).tolist()):
                picks[i] = tok
        sampled = [i for i, r in enumerate(rows) if r.chain is not None]
        at = self._out_index
        for i, tok in zip(sampled, self._sample_rows(group.ctx, [rows[i].chain for i in sampled],
                                                     [at[i] for i in sampled])):
            picks[i] = tok
        return picks

    def _sample_rows(self, ctx, chains, rows):
        """Each chain samples its own row. ctypes releases the GIL in llama.cpp's samplers,
        so rows are split across a few threads (a chain and its row belong to one thread;
        the chains are independent, so the tokens are what one thread would pick)."""
        if len(rows) < 2 or any(c.grammar is not None for c in chains):
            return [c.sample(ctx, i) for c, i in zip(chains, rows)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(SAMPLER_THREADS, thread_name_prefix="lmx-sample")
        parts = min(SAMPLER_THREADS, len(rows))
        jobs = [self._pool.submit(_sample_part, ctx, chains[k::parts], rows[k::parts])
                for k in range(parts)]
        picks = [None] * len(rows)
        for k, job in enumerate(jobs):
            picks[k::parts] = job.result()
        return picks

    def _decode_batch(self, group, items):
        """llama_decode one batch of (seq, pos, token, run or None: whether its logits are
        kept); self._out_index: the batch index of each output, in order (what a sampler
        chain reads)."""
        n = len(items)
        if n > group.spec.n_batch:        # llama.cpp would abort the process (GGML_ASSERT)
            raise LmxError(Code.INTERNAL, f"a batch of {n} tokens is larger than n_batch "
                           f"{group.spec.n_batch} (a worker bug); not decoded")
        if n > self._batch_size:
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
            self._batch_size = max(n, 512)
            self._batch = llama_cpp.llama_batch_init(self._batch_size, 0, 1)
        b = self._batch
        self._out_index = []
        for i, (seq, pos, tok, run) in enumerate(items):
            out = run is not None
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = out
            if out:
                self._out_index.append(i)
        b.n_tokens = n
        rc = llama_cpp.llama_decode(group.ctx, b)
        if rc != 0:
            raise LmxError(Code.INTERNAL, f"llama_decode failed with {rc}")

    def _take(self, run, tok):
        """The sampled token stays pending (evaluated by the next step). True if done."""
        slot = run.slot
        slot.pending = [tok]
        if llama_cpp.llama_vocab_is_eog(slot.model.vocab, tok):
            run.eos = True      # the end-of-turn token is not part of the reply
        else:
            run.out.append(tok)
            if self.on_launch is None:
                run.emit(len(run.out) - 1, tok)
            else:               # streamed while the GPU computes the next step
                run.emit.mark()
                self._emits.append((run.emit, len(run.out) - 1, tok))
            if len(run.out) < run.n_predict:
                run.stopped_by = run.should_stop() if run.should_stop else None
                if run.stopped_by is None:
                    return False
        self._finish(run)
        return True

    def emit_pending(self):
        """Stream the DECODE tokens taken since the last call (with on_launch set, a step's
        tokens are streamed while the GPU computes the next one)."""
        emits, self._emits = self._emits, []
        for emit, index, tok in emits:
            emit(index, tok)

    def _finish(self, run):
        first = run.emit.first
        text = b"".join(run.slot.model.piece(t) for t in run.out)
        run.result = DecodeResult(
            prompt_tokens=len(run.prompt_tokens), generated_tokens=len(run.out),
            stopped_on_eos=run.eos, stopped_by=run.stopped_by,
            text=text.decode("utf-8", "replace"), tokens=list(run.out),
            **run_stats(run, first[0] if first else None))

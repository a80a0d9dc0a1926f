"""CHAT on the engine: a ChatRun rides the same steps, groups and batches as a DECODE (mixed
into Engine).

start_chat renders and tokenizes the whole conversation (chatprompt.py) and builds the run's
sampler chain (sampling.py) before anything is decoded. Once the agent is live (after any
restore), the run keeps the longest common prefix of the tokens in the agent's KV and the new
prompt, removes the rest from its sequence and leaves only the new tokens to evaluate; the
slot's pending token (the last reply's end-of-turn) is dropped, since the template renders the
reply and its end-of-turn itself. Each step samples the run's own row of the shared batch with
its chain. The reply's text passes a StopScanner (a stop string ends it and is never sent) and,
with tools, a second one that holds back everything from the tool-call trigger on, so a
streamed delta never carries a partial stop string or tool-call markup.
"""
import llama_cpp  # noqa: I001  -- before numpy (CUDA load order), as everywhere in the worker

import codecs
import time

from lmx.common import chat
from lmx.common.jobs import ChatResult, Sampling
from lmx.worker import chatprompt
from lmx.worker import grammar as gram
from lmx.worker.decode import run_stats
from lmx.worker.sampling import Chain, pick_seed

FINISH = {"cancel": "cancelled", "deadline": "deadline"}


def common_prefix(held, new, most):
    """How many leading tokens `held` and `new` share, at most `most`."""
    n = min(len(held), len(new), most)
    i = 0
    while i < n and held[i] == new[i]:
        i += 1
    return i


class ChatRun:
    """One CHAT in progress: its slot, prompt, chain, reply so far and clocks."""

    def __init__(self, slot, job, prompt, chain, on_token, should_stop, t0):
        self.slot, self.job, self.chain = slot, job, chain
        self.prompt_tokens, self.truncated = prompt.tokens, prompt.truncated
        self.tools_on = prompt.tools_on
        self.on_token, self.should_stop = on_token, should_stop
        self.out, self.parts = [], []
        self.cached = 0
        self.t0, self.t_live, self.t_prompt, self.t_first = t0, None, None, None
        self.restored = False
        self.batch = 0
        self.result = None          # its ChatResult, set when it finishes
        self.prior = slot.pending   # start_chat changes nothing in the slot before go_live
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.stops = chat.StopScanner(list(job.stop or []))
        self.hold = chat.StopScanner([gram.TOOL_CALL_TRIGGER]) if self.tools_on else None
        self.held_back = False      # the tool-call trigger was seen: no more deltas

    @property
    def agent(self):
        return self.slot.agent

    def go_live(self, engine):
        """Keep the KV prefix the new prompt shares (at least one token left to evaluate, for
        its logits), remove the rest from the sequence, and leave the new tokens pending."""
        slot, prompt = self.slot, self.prompt_tokens
        keep = common_prefix(slot.tokens, prompt, len(prompt) - 1)
        if keep < len(slot.tokens):
            keep = _cut(slot, keep)
        del slot.tokens[keep:]
        slot.pending = prompt[keep:]
        self.cached = keep

    def take(self, engine, tok):
        """The sampled token (already accepted by the chain); True if the run is done."""
        self.slot.pending = [tok]   # evaluated by the next step (or dropped by the next CHAT)
        if self.t_first is None:
            self.t_first = time.perf_counter()
        model = self.slot.model
        if llama_cpp.llama_vocab_is_eog(model.vocab, tok):
            return self._done("stop")      # the end-of-turn token is not part of the reply
        self.out.append(tok)
        text, stopped = self.stops.feed(self.decoder.decode(model.piece(tok)))
        self._emit(text, tok)
        if stopped:
            return self._done("stop", stopped=True)
        if len(self.out) >= self.job.max_tokens:
            return self._done("length")
        why = self.should_stop() if self.should_stop else None
        return self._done(FINISH[why]) if why else False

    def _emit(self, text, tok):
        """Add text to the reply, and stream what may be shown of it."""
        if not text:
            return
        self.parts.append(text)
        if self.on_token is None or self.held_back:
            return
        if self.hold is not None:
            text, self.held_back = self.hold.feed(text)
        if text:
            self.on_token(len(self.out) - 1, tok, text)

    def _done(self, reason, stopped=False):
        last = self.out[-1] if self.out else None
        if not stopped:     # what the stop scanner still holds is reply text after all
            tail = self.stops.feed(self.decoder.decode(b"", final=True))[0]
            self._emit(tail + self.stops.flush(), last)
        if self.hold is not None and not self.held_back and self.on_token is not None:
            rest = self.hold.flush()    # a "<" that never became the trigger
            if rest:
                self.on_token(max(len(self.out) - 1, 0), last, rest)
        content, calls = "".join(self.parts), []
        if self.tools_on:
            content, calls = chat.parse_tool_calls(content)
            if calls and reason in ("stop", "length"):
                reason = "tool_calls"
        self.result = self._result(content, calls, reason)
        self.close()
        return True

    def _result(self, content, calls, reason):
        return ChatResult(
            content=content, tool_calls=calls, finish_reason=reason,
            prompt_tokens=len(self.prompt_tokens), completion_tokens=len(self.out),
            cached_tokens=self.cached, truncated_tokens=self.truncated, seed=self.chain.seed,
            **run_stats(self, self.t_first))

    def close(self):
        """Free the sampler chain (every way a run ends comes here; idempotent)."""
        self.chain.free()


def _cut(slot, keep):
    """Remove positions keep.. of the slot's sequence; the tokens kept (0 when the cache
    cannot keep a partial sequence)."""
    mem = llama_cpp.llama_get_memory(slot.group.ctx)
    model = slot.model
    if keep and model.n_swa and not slot.spec.swa_full:
        # A sliding-window cache has dropped cells older than its window: tokens after `keep`
        # would attend to cells that are gone, so the prompt is evaluated whole.
        low = llama_cpp.llama_memory_seq_pos_min(mem, slot.seq)
        if low > max(0, keep - model.n_swa):
            keep = 0
    if keep and llama_cpp.llama_memory_seq_rm(mem, slot.seq, keep, -1):
        return keep
    llama_cpp.llama_memory_seq_rm(mem, slot.seq, -1, -1)     # the whole sequence never fails
    return 0


class ChatMixin:
    """start_chat / chat over the Engine's slots (steps are DecodeMixin's)."""

    def start_chat(self, agent, job, on_token=None, should_stop=None):
        """Check, render and tokenize a CHAT, build its chain; return its Run (nothing runs
        yet, nothing in the slot changes until it is live).

        on_token(index, token, delta) is called with each piece of reply text that may be
        shown; should_stop() is asked after each token ("cancel", "deadline" or None)."""
        t0 = time.perf_counter()
        slot = self._slot(agent)
        prompt = chatprompt.build(slot.model, slot, job)
        sampling = job.sampling or Sampling()
        seed = pick_seed(sampling.seed)
        chain = Chain(slot.model, sampling, seed, prompt.grammar and prompt.grammar[:2],
                      prompt.grammar[2] if prompt.grammar else "grammar")
        try:
            return ChatRun(slot, job, prompt, chain, on_token, should_stop, t0)
        except BaseException:
            chain.free()
            raise

    def chat(self, agent, job, on_token=None, should_stop=None):
        """Run one CHAT alone to its end and return its ChatResult (tests, tools)."""
        return self.run_alone(self.start_chat(agent, job, on_token, should_stop))

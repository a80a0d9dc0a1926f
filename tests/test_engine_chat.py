"""CHAT on the worker's engine, in-process with the real SmolLM2 (and Gemma) on CPU: prefix
reuse across turns, parks and restarts, seeded sampling alone and batched, structured output,
tool calls, stop strings, templates and context overflow."""
import json

import pytest

from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError, Reason
from lmx.common.jobs import ChatJob, ChatResult, Sampling

GREEDY = Sampling(temperature=0)
BIG = 1 << 40
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}


def job(agent, messages, max_tokens=64, sampling=GREEDY, **kw):
    return ChatJob(agent, list(messages), max_tokens, sampling=sampling, **kw)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False, park_dir=str(tmp_path_factory.mktemp("park")))
    yield eng
    eng.close()


@pytest.fixture
def agents(engine, smol_path):
    """Register agents on SmolLM2 by name (n_ctx 1024 unless given); unregister them after."""
    made = []

    def make(name, n_ctx=1024, path=None, **spec):
        engine.register(name, path or smol_path, ContextSpec(n_ctx=n_ctx, **spec))
        made.append(name)
        return name
    yield make
    for name in made:
        if name in engine.slots:
            engine.unregister(name)


def _together(eng, jobs, on_token=None):
    """Run several CHATs (one per agent) through start_chat/prepare/step together."""
    return eng.run_all([eng.start_chat(j.agent, j, on_token=on_token) for j in jobs])


def _conversation(eng, agent, turns, max_tokens=96):
    """Each user turn in order with the replies so far; every ChatResult."""
    messages, out = [SYSTEM], []
    for text in turns:
        messages.append(user(text))
        res = eng.chat(agent, job(agent, messages, max_tokens))
        assert isinstance(res, ChatResult) and res.finish_reason == "stop", res
        messages.append(assistant(res.content))
        out.append(res)
    return messages, out


TURNS = ["What is the capital of France?", "And of Italy?", "Which one is bigger?"]


def test_three_turns_reuse_the_previous_prompt_and_reply(engine, agents):
    """Turn N+1 reuses exactly turn N's prompt and reply: the reply's tokens re-render to the
    same tokens, and only its end-of-turn token (never evaluated) and the new turn are new."""
    agents("t")
    _, res = _conversation(engine, "t", TURNS)
    assert res[0].cached_tokens == 0
    for prev, cur in zip(res, res[1:]):
        assert cur.cached_tokens == prev.prompt_tokens + prev.completion_tokens
        assert cur.prompt_tokens > cur.cached_tokens
    assert engine.slot_state("t").n_past == res[-1].n_past


def test_reuse_gives_the_reply_a_fresh_agent_gives(engine, agents):
    """Reusing the KV prefix changes nothing: an edited earlier message reuses exactly up to
    the edit, and the reply equals that of an agent that evaluates the whole prompt."""
    from lmx.worker import chatprompt
    from lmx.worker.chatrun import common_prefix
    agents("e")
    agents("fresh")
    messages, res = _conversation(engine, "e", TURNS[:2])
    edited = [SYSTEM, user("What is the capital of Spain?")] + messages[2:]
    model = engine.slots["e"].model
    held = list(engine.slots["e"].tokens)
    new = chatprompt.tokens_of(model, model.chat_template, edited, None)
    got = engine.chat("e", job("e", edited))
    assert got.cached_tokens == common_prefix(held, new, len(new) - 1)
    assert 0 < got.cached_tokens < res[-1].prompt_tokens
    ref = engine.chat("fresh", job("fresh", edited))
    assert ref.cached_tokens == 0 and ref.prompt_tokens == got.prompt_tokens
    assert got.content == ref.content


@pytest.mark.parametrize("where", ["ram", "disk"])
def test_reuse_after_a_park(engine, agents, where):
    agents("p")
    messages, res = _conversation(engine, "p", TURNS[:1])
    parked = engine.park("p", BIG if where == "ram" else 0, True)
    assert parked.parked == where
    messages.append(user(TURNS[1]))
    got = engine.chat("p", job("p", messages))
    assert got.kv_swap_restored
    assert got.cached_tokens == res[0].prompt_tokens + res[0].completion_tokens


def test_reuse_after_a_worker_restart_from_disk(smol_path, tmp_path):
    """The parked file carries the KV's tokens: a new engine resumes it and reuses them."""
    from lmx.worker.engine import Engine
    first = Engine(2, gpu=False, pinned=False, park_dir=str(tmp_path))
    try:
        first.register("r", smol_path, ContextSpec(n_ctx=1024))
        messages, res = _conversation(first, "r", TURNS[:1])
        assert first.park("r", 0, True).parked == "disk"
        second = Engine(2, gpu=False, pinned=False, park_dir=str(tmp_path))
        try:
            assert second.register("r", smol_path, ContextSpec(n_ctx=1024),
                                   resume=True).resumed
            messages.append(user(TURNS[1]))
            got = second.chat("r", job("r", messages))
            assert got.kv_swap_restored
            assert got.cached_tokens == res[0].prompt_tokens + res[0].completion_tokens
        finally:
            second.close()
    finally:
        first.close()


QUESTIONS = ["Tell me a short story about a cat.", "Describe the sea.",
             "Write a haiku about rain.", "What do you like about mornings?"]


def _sampled(seed):
    return Sampling(temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, seed=seed)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch_of_four(engine, agents):
    for i in range(4):
        agents(f"b{i}")
    jobs = [job(f"b{i}", [SYSTEM, user(q)], 40, _sampled(1000 + i))
            for i, q in enumerate(QUESTIONS)]
    batched = _together(engine, jobs)
    assert all(r.batch == 4 for r in batched.values())
    for i, q in enumerate(QUESTIONS):
        agents("solo", n_batch=256)      # another spec: its own context, never b*'s batch
        alone = engine.chat("solo", job("solo", [SYSTEM, user(q)], 40, _sampled(1000 + i)))
        engine.unregister("solo")
        assert alone.batch == 1 and alone.seed == 1000 + i
        assert alone.content == batched[f"b{i}"].content, i
        assert alone.completion_tokens == batched[f"b{i}"].completion_tokens


def test_an_unseeded_chat_reports_the_seed_that_repeats_it(engine, agents):
    agents("u1")
    agents("u2")
    first = engine.chat("u1", job("u1", [SYSTEM, user(QUESTIONS[1])], 32, _sampled(None)))
    assert first.seed is not None
    again = engine.chat("u2", job("u2", [SYSTEM, user(QUESTIONS[1])], 32,
                                  _sampled(first.seed)))
    assert again.content == first.content


SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "pet": {"enum": ["cat", "dog", "none"]}},
          "required": ["name", "age", "pet"], "additionalProperties": False}


def test_json_schema_content_validates_for_twenty_seeds(engine, agents):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    names = [agents(f"j{i}") for i in range(4)]
    msgs = [SYSTEM, user("Invent a person and give their name, age and pet as JSON.")]
    for batch in range(5):
        jobs = [job(a, msgs, 96, _sampled(batch * 4 + i), response_format=fmt)
                for i, a in enumerate(names)]
        for res in _together(engine, jobs).values():
            assert res.finish_reason == "stop", res
            jsonschema.validate(json.loads(res.content), SCHEMA)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 32}},
                   "required": ["city"]}}}


def test_a_forced_tool_call_parses_into_tool_calls(engine, agents):
    agents("tool")
    deltas = []
    res = engine.chat("tool", job(
        "tool", [SYSTEM, user("What is the weather in Paris?")], 96, stream=True,
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        on_token=lambda i, t, text: deltas.append(text))
    assert res.finish_reason == "tool_calls", res
    assert len(res.tool_calls) == 1
    call = res.tool_calls[0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    assert "<tool_call>" not in "".join(deltas) and "<tool_call>" not in res.content


def test_stop_strings_end_the_reply_and_never_show(engine, agents):
    agents("full")
    agents("cut")
    msgs = [SYSTEM, user("Describe a sunny day at the beach.")]
    full = engine.chat("full", job("full", msgs, 64))
    words = full.content.split()
    assert len(words) >= 8, full.content
    stop = " ".join(words[4:6])         # spans tokens: held back until it is decided
    deltas = []
    cut = engine.chat("cut", job("cut", msgs, 64, stop=[stop, "zzzz"], stream=True),
                      on_token=lambda i, t, text: deltas.append(text))
    assert cut.finish_reason == "stop"
    assert stop not in cut.content and not any(stop in d for d in deltas)
    assert cut.content == full.content[:full.content.index(stop)]
    assert "".join(deltas) == cut.content


def test_length_cancel_and_deadline_finish_reasons(engine, agents):
    agents("f")
    msgs = [SYSTEM, user(QUESTIONS[0])]
    assert engine.chat("f", job("f", msgs, 3)).finish_reason == "length"
    calls = []

    def stop_after_two():
        calls.append(1)
        return "cancel" if len(calls) >= 2 else None
    res = engine.chat("f", job("f", msgs, 40), should_stop=stop_after_two)
    assert res.finish_reason == "cancelled" and res.completion_tokens == 2
    res = engine.chat("f", job("f", msgs, 40), should_stop=lambda: "deadline")
    assert res.finish_reason == "deadline" and res.completion_tokens == 1


def test_gemma_needs_a_template_and_works_with_chatml(engine, agents, gemma_path):
    agents("g", path=gemma_path)
    with pytest.raises(LmxError) as info:
        engine.chat("g", job("g", [user("Hello")], 8))
    assert info.value.code == Code.NO_CHAT_TEMPLATE
    assert engine.slot_state("g").n_past == 0 and not engine.slot_state("g").live
    res = engine.chat("g", job("g", [user("Hello")], 8, template="chatml"))
    assert res.completion_tokens >= 1 and res.prompt_tokens > 0
    again = engine.chat("g", job("g", [user("Hello"), assistant(res.content), user("Hi")], 8,
                                 template="chatml"))
    assert again.cached_tokens > 0          # Gemma's sliding-window cache: a short prompt


def test_bad_grammar_is_a_bad_request_before_any_decode(engine, agents):
    agents("bad")
    with pytest.raises(LmxError) as info:
        engine.chat("bad", job("bad", [user("Hi")], 8, grammar="root ::= nonsense ((("))
    assert (info.value.code, info.value.reason) == (Code.BAD_REQUEST, Reason.BAD_VALUE)
    assert info.value.details["field"] == "grammar"
    assert engine.slot_state("bad").n_past == 0 and not engine.slot_state("bad").live


def test_context_full_and_truncate_middle(engine, agents):
    agents("c", n_ctx=256)
    long = [SYSTEM]
    for i in range(12):
        long += [user(f"Question number {i}: what is {i} plus {i}?"),
                 assistant(f"The answer to question {i} is {2 * i}.")]
    long.append(user("And what is 7 plus 8?"))
    with pytest.raises(LmxError) as info:
        engine.chat("c", job("c", long, 32))
    err = info.value
    assert err.code == Code.CONTEXT_FULL
    assert err.details["n_ctx"] == 256 and err.details["max_tokens"] == 32
    assert err.details["prompt_tokens"] + 32 > 256
    res = engine.chat("c", job("c", long, 32, truncate="middle"))
    assert res.truncated_tokens > 0
    assert res.prompt_tokens + res.truncated_tokens == err.details["prompt_tokens"]
    assert res.prompt_tokens + 32 <= 256
    huge = [SYSTEM, user("word " * 400)]
    with pytest.raises(LmxError) as info:
        engine.chat("c", job("c", huge, 32, truncate="middle"))
    assert info.value.code == Code.CONTEXT_FULL


def test_the_scheduler_runs_a_streamed_chat(smol_path):
    """CHAT through the Scheduler: TOKENS events (one per step) carry the deltas, before the
    RESULT with its ChatResult."""
    import time
    import msgpack
    from lmx.common.jobs import RegisterJob, Result
    from lmx.worker.engine import Engine
    from lmx.worker.scheduler import Incoming, Scheduler

    class Frames:
        sent = []

        def send_multipart(self, frames):
            self.sent.append(msgpack.unpackb(frames[0]))
    eng, sock = Engine(2, gpu=False, pinned=False), Frames()
    sched, now = Scheduler(eng, sock, set()), time.monotonic()
    try:
        jobs = [RegisterJob("a", smol_path, ContextSpec(n_ctx=512).as_dict()),
                job("a", [SYSTEM, user(TURNS[0])], 32, stream=True),
                job("a", [SYSTEM, user("Hi")], 8, grammar="root ::= (((")]
        for i, j in enumerate(jobs, 1):
            sched._take(Incoming(i, j.VERB, j, now))
        while sched.waiting or sched.running:
            sched._round()
        results = {m["id"]: Result.from_wire(m) for m in sock.sent if m["verb"] == "RESULT"}
        chat = ChatResult.from_wire(results[2].out)
        deltas = [(i, t[3]) for i, m in enumerate(sock.sent) if m["verb"] == "TOKENS"
                  for t in m["tokens"] if t[0] == 2]
        assert "".join(text for _, text in deltas) == chat.content
        assert chat.completion_tokens >= 1
        result_at = next(i for i, m in enumerate(sock.sent) if m["verb"] == "RESULT" and
                         m["id"] == 2)
        assert deltas and max(i for i, _ in deltas) < result_at
        assert results[3].error["code"] == Code.BAD_REQUEST
        assert results[3].error["field"] == "grammar"
    finally:
        eng.close()


def test_tool_choice_auto_and_none(engine, agents):
    """auto: a lazy grammar (free text until "<tool_call>"); the markup is never streamed.
    none: the tools are not rendered and nothing is parsed."""
    agents("auto")
    deltas = []
    msgs = [SYSTEM, user("What is the weather in Paris? Use the tool.")]
    res = engine.chat("auto", job("auto", msgs, 96, stream=True, tools=[WEATHER],
                                  tool_choice="auto"),
                      on_token=lambda i, t, text: deltas.append(text))
    assert "<tool_call>" not in "".join(deltas) and "<tool_call>" not in res.content
    if res.finish_reason == "tool_calls":
        assert json.loads(res.tool_calls[0]["function"]["arguments"]) is not None
    else:
        assert "".join(deltas) == res.content
    none = engine.chat("auto", job("auto", msgs, 16, tools=[WEATHER], tool_choice="none"))
    assert none.tool_calls == [] and none.finish_reason in ("stop", "length")

"""CHAT through a real broker, its worker and llama.cpp with the real SmolLM2-135M-Instruct
(ChatML) and Gemma 3 270M (no template) on CPU."""
import json
import threading

import jsonschema
import pytest

from conftest import BrokerProc
from lmx.common.errors import Code, LmxError

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def chat_broker(tmp_path_factory, table):
    b = BrokerProc(tmp_path_factory.mktemp("chat"), ["--vram-table", str(table)])
    yield b
    b.stop()


def user(text):
    return {"role": "user", "content": text}


def test_three_turns_reuse_the_previous_prompt_and_reply(chat_broker):
    with chat_broker.client() as c:
        c.register("t", "smol", n_ctx=2048)
        try:
            messages = [{"role": "system", "content": "You are brief."}, user("Say hello.")]
            turns = []
            for follow_up in ("Now say goodbye.", "And thank you?", None):
                r = c.chat("t", messages, max_tokens=24, temperature=0)
                turns.append(r)
                messages = messages + [{"role": "assistant", "content": r["content"]}]
                if follow_up:
                    messages.append(user(follow_up))
            assert turns[0]["cached_tokens"] == 0
            for prev, cur in zip(turns, turns[1:]):
                # the previous prompt and reply are reused; a reply cut by max_tokens leaves
                # its last sampled token unevaluated (an end-of-turn token is never kept)
                cut = prev["finish_reason"] == "length"
                assert cur["cached_tokens"] == prev["prompt_tokens"] + \
                    prev["completion_tokens"] - cut, (prev, cur)
                assert cur["prompt_tokens"] > cur["cached_tokens"]
        finally:
            c.unregister("t")


def test_seeded_sampling_is_the_same_alone_and_in_a_batch_of_four(chat_broker):
    messages = [user("Write one sentence about the sea.")]
    params = dict(max_tokens=20, temperature=0.9, seed=1234)
    with chat_broker.client() as c:
        c.register("alone", "smol", n_ctx=512)
        alone = c.chat("alone", messages, **params)["content"]
        c.unregister("alone")
        names = [f"b{i}" for i in range(4)]
        for name in names:
            c.register(name, "smol", n_ctx=512)
        ids = {name: c.send("CHAT", agent=name, messages=messages, **params) for name in names}
        finals = {name: list(c.replies(i))[-1] for name, i in ids.items()}
        assert max(f["batch"] for f in finals.values()) > 1, "never batched: proves nothing"
        assert {f["content"] for f in finals.values()} == {alone}
        other = c.chat("b0", messages, max_tokens=20, temperature=0.9, seed=99)
        for name in names:
            c.unregister(name)
    assert alone and other["seed"] == 99


def test_json_schema_replies_parse_and_validate_for_twenty_seeds(chat_broker):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    with chat_broker.client() as c:
        c.register("j", "smol", n_ctx=1024)
        try:
            for seed in range(20):
                r = c.chat("j", [user("Invent a person. Reply in JSON.")], max_tokens=64,
                           response_format=fmt, seed=seed, temperature=0.8)
                assert r["finish_reason"] == "stop", r
                jsonschema.validate(json.loads(r["content"]), SCHEMA)
        finally:
            c.unregister("j")


def test_a_forced_tool_call_is_parsed_with_json_arguments(chat_broker):
    with chat_broker.client() as c:
        c.register("tool", "smol", n_ctx=1024)
        try:
            r = c.chat("tool", [user("What is the weather in Paris?")], tools=[WEATHER],
                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                       max_tokens=64, temperature=0)
            assert r["finish_reason"] == "tool_calls", r
            call = r["tool_calls"][0]
            assert call["type"] == "function" and call["function"]["name"] == "get_weather"
            assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
            assert call["id"]
        finally:
            c.unregister("tool")


def test_stop_strings_end_the_reply_and_never_appear_streamed_or_not(chat_broker):
    messages = [user("Write two sentences about the sea.")]
    with chat_broker.client() as c:
        c.register("s", "smol", n_ctx=1024)
        try:
            free = c.chat("s", messages, max_tokens=40, temperature=0)["content"]
            assert len(free) >= 8, free
            stop = free[len(free) // 2:len(free) // 2 + 3]    # from the middle of the reply
            plain = c.chat("s", messages, max_tokens=40, temperature=0, stop=[stop, "zzz"])
            assert plain["finish_reason"] == "stop" and stop not in plain["content"]
            assert plain["content"] == free[:free.index(stop)]
            parts = list(c.chat_stream("s", messages, max_tokens=40, temperature=0, stop=stop))
            deltas = "".join(p["delta"] for p in parts if p["status"] == "partial")
            assert stop not in deltas and deltas == parts[-1]["content"] == plain["content"]
        finally:
            c.unregister("s")


def test_no_template_is_refused_and_an_override_works(chat_broker, broker_factory, table):
    with chat_broker.client() as c:
        c.register("g", "gemma", n_ctx=512)
        try:
            with pytest.raises(LmxError) as info:
                c.chat("g", [user("Hi")], max_tokens=4)
            assert info.value.code == Code.NO_CHAT_TEMPLATE
        finally:
            c.unregister("g")
    other = broker_factory("--vram-table", str(table), "--chat-template", "gemma=chatml",
                           name="override")
    with other.client() as c:
        c.register("g", "gemma", n_ctx=512)
        r = c.chat("g", [user("The capital of France is")], max_tokens=8, temperature=0)
        assert r["completion_tokens"] > 0 and r["prompt_tokens"] > 5


BAD = [
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1 << 20}, "max_tokens"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"stop": ["ok", ""]}, "stop[1]"),
]


@pytest.mark.parametrize("change,field", BAD)
def test_bad_chat_input_names_the_field_and_decodes_nothing(chat_broker, change, field):
    with chat_broker.client() as c:
        c.register("bad", "smol", n_ctx=512)
        try:
            fields = dict({"agent": "bad", "messages": [user("hi")]}, **change)
            reply = c.call("CHAT", **fields)
            assert (reply["code"], reply["field"]) == (Code.BAD_REQUEST, field), reply
            assert c.request("LIST")["agents"][0]["decodes"] == 0
        finally:
            c.unregister("bad")


def test_a_bad_schema_or_grammar_is_refused_before_any_decode(chat_broker):
    with chat_broker.client() as c:
        c.register("gr", "smol", n_ctx=512)
        try:
            reply = c.call("CHAT", agent="gr", messages=[user("hi")], grammar="root ::= (((")
            assert (reply["code"], reply["field"]) == (Code.BAD_REQUEST, "grammar"), reply
            assert c.request("LIST")["agents"][0]["decodes"] == 0
        finally:
            c.unregister("gr")


def test_context_overflow_is_said_and_truncate_middle_keeps_system_and_newest(chat_broker):
    long = "word " * 150
    messages = [{"role": "system", "content": "Be brief."}] + [
        m for i in range(4) for m in (user(f"{i}: {long}"), {"role": "assistant",
                                                            "content": "ok"})] + [user("Bye")]
    with chat_broker.client() as c:
        c.register("o", "smol", n_ctx=512)
        try:
            with pytest.raises(LmxError) as info:
                c.chat("o", messages, max_tokens=16)
            err = info.value
            assert err.code == Code.CONTEXT_FULL and err.details["n_ctx"] == 512
            assert err.details["prompt_tokens"] > 400 and err.details["max_tokens"] == 16
            r = c.chat("o", messages, max_tokens=16, temperature=0, truncate="middle")
            assert r["truncated_tokens"] > 0
            assert r["prompt_tokens"] + 16 <= 512
        finally:
            c.unregister("o")


def test_prefix_reuse_survives_parking(tmp_path_factory, table):
    b = BrokerProc(tmp_path_factory.mktemp("chatpark"), [
        "--vram-table", str(table), "--max-live-contexts", "1"])
    try:
        with b.client() as c:
            c.register("p", "smol", n_ctx=1024)
            c.register("q", "smol", n_ctx=1024)
            messages = [user("Name a colour.")]
            first = c.chat("p", messages, max_tokens=12, temperature=0)
            c.chat("q", [user("Name a fruit.")], max_tokens=4, temperature=0)   # parks p
            assert {a["agent"]: a["residence"] for a in c.list_agents()}["p"] != "live"
            messages += [{"role": "assistant", "content": first["content"]},
                         user("Another one.")]
            second = c.chat("p", messages, max_tokens=12, temperature=0)
            assert second["kv_swap_restored"] is True
            assert second["cached_tokens"] == first["prompt_tokens"] + \
                first["completion_tokens"] - (first["finish_reason"] == "length")
    finally:
        b.stop()


def test_chats_of_many_clients_at_once(chat_broker):
    errors = []

    def one(i):
        try:
            with chat_broker.client() as c:
                c.register(f"m{i}", "smol", n_ctx=256)
                r = c.chat(f"m{i}", [user("Hi")], max_tokens=6, seed=i)
                assert r["completion_tokens"] >= 1
                c.unregister(f"m{i}")
        except Exception as exc:  # collected: a thread's assert would be lost
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_probe_chat_with_a_schema_and_streamed(chat_broker, tmp_path):
    import subprocess
    import sys
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    probe = [sys.executable, "-m", "lmx.common.probe", "--endpoint", chat_broker.endpoint]
    with chat_broker.client() as c:
        c.register("pr", "smol", n_ctx=1024)
        try:
            out = subprocess.run(probe + ["--json", "chat", "pr", "Invent a person.",
                                          "--json-schema", str(schema), "--max-tokens", "64",
                                          "--seed", "5"], capture_output=True, text=True,
                                 timeout=120)
            assert out.returncode == 0, out.stderr
            reply = json.loads(out.stdout)
            jsonschema.validate(json.loads(reply["content"]), SCHEMA)
            out = subprocess.run(probe + ["chat", "pr", "Say hi.", "--stream", "--system",
                                          "Be brief.", "--max-tokens", "8"],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and "finish_reason:" in out.stdout, out.stderr
        finally:
            c.unregister("pr")


def test_a_turn_after_a_tool_call_with_the_models_own_template(chat_broker):
    """What OpenAI clients send after a call: the assistant's tool_calls with content null,
    then the tool's result; SmolLM2's template knows no tools, so the calls become text."""
    messages = [user("What is the weather in Paris?"),
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    with chat_broker.client() as c:
        c.register("after", "smol", n_ctx=1024)
        try:
            r = c.chat("after", messages, tools=[WEATHER], max_tokens=24, temperature=0)
            assert r["completion_tokens"] > 0 and r["prompt_tokens"] > 40
        finally:
            c.unregister("after")

"""lmx-gateway end to end: a real broker (with its worker and llama.cpp, SmolLM2 and Gemma 3 on
CPU) and a real gateway process, driven by the real `openai` package (sync, async, streaming)
and, where the SDK hides the wire, by httpx."""
import asyncio
import json
import shutil
import subprocess
import sys

import httpx
import jsonschema
import openai
import pytest

from conftest import BrokerProc, wait_until
from lmx.gateway.launch import GatewayProc, free_port, toml_config
from lmx.gateway.sessions import agent_id
from test_chat_e2e import SCHEMA, WEATHER    # the same schema and tool as the CHAT tests

ALL_KEY, SMOL_KEY = "sk-test-every-model", "sk-test-smol-only"
LONG = "Tell a long story about a lighthouse keeper."     # greedy SmolLM2: 400+ tokens
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def user(text):
    return {"role": "user", "content": text}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, table):
    """One broker (gemma given the chatml template) and one gateway with two API keys."""
    folder = tmp_path_factory.mktemp("gateway")
    broker = BrokerProc(folder, ["--vram-table", str(table), "--chat-template",
                                 "gemma=chatml", "--max-agents-per-client", "64"])
    config = toml_config(
        {"smol": {"model": "smol", "n_ctx": 1024}, "gemma": {"model": "gemma", "n_ctx": 1024},
         "tiny": {"model": "smol", "n_ctx": 256}},
        keys=[("all", ALL_KEY, ["*"]), ("smol", SMOL_KEY, ["smol"])],
        gateway={"max_messages": 64, "max_body_bytes": 65536})
    try:
        gw = GatewayProc(folder, broker.endpoint, config)
    except BaseException:
        broker.stop()
        raise
    yield broker, gw
    gw.stop()
    broker.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack[1].url + "/v1", api_key=ALL_KEY, max_retries=0)


def agents(broker):
    with broker.client() as c:
        return {a["agent"]: a for a in c.list_agents()}


def test_chat_answers_and_the_second_turn_reuses_the_sessions_kv(client):
    messages = [{"role": "system", "content": "You are brief."}, user("Say hello.")]
    first = client.chat.completions.create(model="smol", messages=messages, max_tokens=12,
                                           temperature=0, user="turns")
    choice = first.choices[0]
    assert first.object == "chat.completion" and first.model == "smol"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = first.usage
    assert u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": choice.message.content},
                 user("Now say goodbye.")]
    second = client.chat.completions.create(model="smol", messages=messages, max_tokens=12,
                                            temperature=0, user="turns")
    assert second.usage.prompt_tokens_details.cached_tokens >= u.prompt_tokens


def test_models_list_shows_the_models_each_key_may_use(stack, client):
    assert {m.id for m in client.models.list()} == {"smol", "gemma", "tiny"}
    smol_only = openai.OpenAI(base_url=stack[1].url + "/v1", api_key=SMOL_KEY, max_retries=0)
    assert [m.id for m in smol_only.models.list()] == ["smol"]
    assert client.models.retrieve("gemma").owned_by == "lmx"
    with pytest.raises(openai.NotFoundError) as info:
        smol_only.chat.completions.create(model="gemma", messages=[user("hi")], max_tokens=2)
    assert info.value.code == "model_not_found"


def test_the_same_seed_gives_the_same_text_on_two_sessions(client):
    def ask(session, seed):
        return client.chat.completions.create(
            model="smol", messages=[user("Write one sentence about the sea.")], max_tokens=16,
            temperature=0.9, seed=seed, user=session).choices[0].message.content
    a, b = ask("seed-a", 1234), ask("seed-b", 1234)
    assert a and a == b


def test_json_schema_content_parses_and_validates(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    r = client.chat.completions.create(model="smol", messages=[user("Invent a person.")],
                                       max_tokens=64, response_format=fmt, seed=3,
                                       user="schema")
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_a_tool_call_round_trip_ends_in_an_answer(client):
    messages = [user("What is the weather in Paris?")]
    r = client.chat.completions.create(model="smol", messages=messages, tools=[WEATHER],
                                       tool_choice=FORCE_WEATHER, max_tokens=64,
                                       temperature=0, user="tools")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    city = json.loads(call.function.arguments)["city"]
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": f"Sunny in {city}"}]
    final = client.chat.completions.create(model="smol", messages=messages, tools=[WEATHER],
                                           tool_choice="none", max_tokens=24,
                                           temperature=0, user="tools")
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.usage.prompt_tokens_details.cached_tokens > 0


def test_streamed_tool_call_deltas_accumulate_like_openais(client):
    stream = client.chat.completions.create(
        model="smol", messages=[user("Weather in Rome?")], tools=[WEATHER],
        tool_choice=FORCE_WEATHER, max_tokens=64, temperature=0, stream=True,
        user="tool-stream")
    calls, finish = {}, None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for d in delta.tool_calls or []:
            slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = d.id or slot["id"]
            if d.function:
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["id"] and calls[0]["name"] == "get_weather"
    assert isinstance(json.loads(calls[0]["arguments"])["city"], str)


def test_a_stream_equals_the_plain_reply_and_ends_with_usage(client):
    messages = [user("Name three rivers.")]
    plain = client.chat.completions.create(model="smol", messages=messages, max_tokens=16,
                                           temperature=0, user="plain")
    chunks = list(client.chat.completions.create(
        model="smol", messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, user="streamed"))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        plain.choices[0].finish_reason


def test_sse_wire_ends_with_done(stack):
    with httpx.stream("POST", stack[1].url + "/v1/chat/completions", json={
            "model": "smol", "messages": [user("Hi")], "max_tokens": 4, "stream": True},
            headers={"Authorization": f"Bearer {ALL_KEY}"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert json.loads(data[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_gemma_answers_with_the_chatml_template_the_broker_gives_it(client):
    r = client.chat.completions.create(model="gemma", messages=[user("The capital of "
                                                                     "France is")],
                                       max_tokens=6, temperature=0)
    assert r.model == "gemma" and r.usage.completion_tokens > 0


def test_sixteen_concurrent_async_streams_all_complete(stack):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model="smol", messages=[user(f"Say a word about the number {i}.")], max_tokens=8,
            stream=True, stream_options={"include_usage": True}, seed=i, user=f"many-{i}")
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return text, finish, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=stack[1].url + "/v1", api_key=ALL_KEY,
                                    max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(16)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert all(finish in ("stop", "length") and usage.completion_tokens > 0
               for _, finish, usage in results), results
    assert sum(1 for a in agents(stack[0]) if a.startswith("gw-c-smol-")) >= 16


def test_completions_take_a_raw_prompt_and_reuse_a_prompt_that_extends(client):
    first = client.completions.create(model="smol", prompt="The capital of France is",
                                      max_tokens=6, user="raw")
    text = first.choices[0].text
    assert first.object == "text_completion" and text
    assert first.choices[0].finish_reason in ("stop", "length")
    second = client.completions.create(model="smol", prompt="The capital of France is" +
                                       text + " And", max_tokens=4, user="raw")
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    stopped = client.completions.create(model="smol", prompt="1, 2, 3, 4,", max_tokens=12,
                                        stop=["7"], user="raw")
    assert "7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_an_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[user("hi")])
    assert (info.value.status_code, info.value.code) == (404, "model_not_found")
    assert info.value.param == "model"


@pytest.mark.parametrize("change,param", [({"temperature": -1}, "temperature"),
                                          ({"n": 2}, "n"),
                                          ({"max_completion_tokens": 0},
                                           "max_completion_tokens"),
                                          ({"messages": [{"role": "wizard", "content": "x"}]},
                                           "messages[0].role")])
def test_a_bad_field_is_400_naming_the_param(client, change, param):
    kw = dict({"model": "smol", "messages": [user("hi")], "max_tokens": 4}, **change)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kw)
    assert info.value.status_code == 400 and info.value.param == param, info.value.body


def test_context_overflow_is_400_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[user("word " * 400)],
                                       max_tokens=16)
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in info.value.message


def test_a_wrong_key_is_401_and_limits_are_enforced(stack):
    bad = openai.OpenAI(base_url=stack[1].url + "/v1", api_key="sk-wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.code == "invalid_api_key"
    url, auth = stack[1].url + "/v1/chat/completions", {"Authorization": f"Bearer {ALL_KEY}"}
    r = httpx.post(url, headers=auth, json={"model": "smol", "messages": [
        user("x" * 70000)]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url, headers=auth, json={"model": "smol", "messages": [user("x")] * 65})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_no_cors_headers_unless_configured(stack):
    r = httpx.options(stack[1].url + "/v1/chat/completions", headers={
        "Origin": "http://evil.test", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(stack[1].url + "/v1/models", headers={
        "Origin": "http://evil.test", "Authorization": f"Bearer {ALL_KEY}"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_a_client_that_leaves_mid_stream_cancels_its_request(stack):
    body = {"model": "smol", "max_tokens": 900, "temperature": 0, "stream": True,
            "messages": [user(LONG)]}
    headers = {"Authorization": f"Bearer {ALL_KEY}", "X-Lmx-Session": "leaver"}
    with httpx.stream("POST", stack[1].url + "/v1/chat/completions", json=body,
                      headers=headers, timeout=60) as r:
        agent = r.headers["x-lmx-agent"]
        lines = r.iter_lines()
        for line in lines:
            if '"content"' in line and '"content":""' not in line:
                break                                   # one real token: now leave
    wait_until(lambda: agents(stack[0])[agent]["queue_depth"] == 0, 20,
               what="the cancelled CHAT to end")
    assert agents(stack[0])[agent]["generated_tokens"] < 900
    assert "cancel request" in stack[1].read_log()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [user(LONG)], "temperature": 0}),
    ("/v1/completions", {"prompt": "One, two, three, four, five, six,"})])
def test_a_client_that_gives_up_on_a_plain_request_cancels_it(stack, path, body):
    headers = {"Authorization": f"Bearer {ALL_KEY}", "X-Lmx-Session": "quitter"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack[1].url + path, json=dict(body, model="smol", max_tokens=900),
                   headers=headers, timeout=httpx.Timeout(30, read=1.0))
    agent = agent_id("gw", "all", "smol", "c" if "chat" in path else "t", "h:quitter")
    # (the agent may still be registering when the client gives up on a busy machine)
    wait_until(lambda: agents(stack[0]).get(agent, {}).get("queue_depth") == 0, 20,
               what="the abandoned request to end")
    assert 0 < agents(stack[0])[agent]["generated_tokens"] < 900


@pytest.fixture(scope="module")
def strict(tmp_path_factory, table, smol_path):
    """A broker with a queue of one, and a gateway with a 1 s idle timeout and a model whose
    context cannot fit the device."""
    folder = tmp_path_factory.mktemp("strict")
    huge = folder / "smol-copy.gguf"             # off the table: booked by the estimator
    shutil.copyfile(smol_path, huge)
    broker = BrokerProc(folder, ["--vram-table", str(table), "--queue-depth", "1"])
    config = toml_config({"smol": {"model": "smol", "n_ctx": 512},
                          "huge": {"model": str(huge), "n_ctx": 1 << 20}},
                         gateway={"idle_timeout_s": 1.0, "retry_after_s": 7})
    try:
        gw = GatewayProc(folder, broker.endpoint, config, name="strict")
    except BaseException:
        broker.stop()
        raise
    yield broker, gw, openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
    gw.stop()
    broker.stop()


def test_a_ledger_denial_is_503_with_retry_after_and_the_numbers(strict):
    with pytest.raises(openai.InternalServerError) as info:
        strict[2].chat.completions.create(model="huge", messages=[user("hi")], max_tokens=2)
    err = info.value
    assert err.status_code == 503 and err.response.headers["retry-after"] == "7"
    assert err.code == "vram_ledger_deny/cap"
    assert "requested" in err.message and "bytes" in err.message and "cap" in err.message


def test_a_full_queue_is_429(strict):
    async def one(client, i):
        try:
            await client.chat.completions.create(model="smol", messages=[user(f"Hi {i}")],
                                                 max_tokens=24, temperature=0)
            return 200
        except openai.RateLimitError as err:
            assert err.code == "rate_limit_exceeded"
            return err.status_code

    async def main():
        client = openai.AsyncOpenAI(base_url=strict[1].url + "/v1", api_key="none",
                                    max_retries=0, default_headers={"X-Lmx-Session": "busy"})
        try:
            return await asyncio.gather(*(one(client, i) for i in range(4)))
        finally:
            await client.close()

    codes = asyncio.run(main())
    assert 429 in codes and 200 in codes, codes


def test_an_idle_session_is_unregistered_after_the_timeout(strict):
    raw = strict[2].chat.completions.with_raw_response.create(
        model="smol", messages=[user("Hi")], max_tokens=2, user="idler")
    agent = raw.headers["x-lmx-agent"]
    assert raw.parse().usage.completion_tokens > 0
    wait_until(lambda: agent not in agents(strict[0]), 15, what=f"{agent} to be unregistered")


def test_an_unreachable_broker_is_503_and_cors_when_configured(tmp_path):
    config = toml_config({"smol": {"model": "smol"}}, cors=["http://app.test"])
    gw = GatewayProc(tmp_path, f"ipc://{tmp_path}/nobody.sock", config, name="dead")
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="smol", messages=[user("hi")])
        assert (info.value.status_code, info.value.code) == (503, "broker_unreachable")
        assert httpx.get(gw.url + "/health").status_code == 503
        r = httpx.options(gw.url + "/v1/chat/completions", headers={
            "Origin": "http://app.test", "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "http://app.test"
    finally:
        gw.stop()


def test_a_public_address_without_keys_is_refused(tmp_path):
    path = tmp_path / "open.toml"
    path.write_text(toml_config({"smol": {"model": "smol"}}))
    r = subprocess.run([sys.executable, "-m", "lmx.gateway.main", "--listen",
                        f"0.0.0.0:{free_port()}", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "without API keys" in r.stderr

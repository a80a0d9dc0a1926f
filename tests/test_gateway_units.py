"""The gateway's pure parts: config, request and reply translation, error mapping, stops."""
import pytest

from lmx.common.config import AGENT_ID_RE
from lmx.gateway import config, errors, translate
from lmx.gateway.errors import HttpError
from lmx.gateway.sessions import agent_id


def test_config_reads_models_keys_and_limits():
    cfg = config.from_dict({
        "gateway": {"idle_timeout_s": 5, "max_messages": 3},
        "models": {"smol": {"model": "smol", "n_ctx": 512, "flash_attn": False}},
        "keys": [{"name": "a", "key": "sk-0123456789", "models": ["smol"]}],
        "cors": {"allow_origins": ["http://x.test"]}})
    assert cfg.idle_timeout_s == 5.0 and cfg.max_messages == 3
    assert cfg.models["smol"].context == {"n_ctx": 512, "flash_attn": False}
    key = cfg.key_for("sk-0123456789")
    assert key.name == "a" and key.allows("smol") and not key.allows("gemma")
    assert cfg.key_for("sk-wrong") is None and cfg.cors_origins == ("http://x.test",)


@pytest.mark.parametrize("data,words", [
    ({"gateway": {"bogus": 1}}, "unknown gateway settings"),
    ({"models": {"m": {"n_ctx": 5}}}, "needs model"),
    ({"models": {"m": {"model": "m", "n_gpu": 1}}}, "unknown settings"),
    ({"keys": [{"key": "short"}]}, "8 characters"),
    ({"keys": [{"key_env": "LMX_NO_SUCH_VAR_SET"}]}, "not set"),
])
def test_config_errors_name_the_entry(data, words):
    with pytest.raises(config.ConfigError, match=words):
        config.from_dict(data)


def test_non_loopback_needs_keys():
    config.check_exposure(config.GatewayConfig(), "127.0.0.1")
    config.check_exposure(config.GatewayConfig(), "::1")
    with pytest.raises(config.ConfigError, match="without API keys"):
        config.check_exposure(config.GatewayConfig(), "0.0.0.0")
    assert config.parse_listen("[::1]:8000") == ("::1", 8000)


def test_agent_ids_follow_the_brokers_rule_and_separate_keys_models_and_sessions():
    ids = {agent_id("gw", k, m, kind, s) for k in ("", "a") for m in ("smol", "a/b c")
           for kind in "ct" for s in ("k", "u:x" * 100)}
    assert len(ids) == 16 and all(AGENT_ID_RE.fullmatch(i) for i in ids)


def test_chat_fields_map_openai_names():
    body = {"model": "m", "messages": [{"role": "developer", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "refusal": None, "tool_calls": [{}]}],
        "max_completion_tokens": 9, "temperature": 0.5, "seed": 3, "stop": ["x"],
        "response_format": {"type": "text"}, "stream": True,
        "stream_options": {"include_usage": True}, "parallel_tool_calls": False, "top_k": 5}
    fields, renames, opts = translate.chat_fields(body, 10)
    assert fields["messages"][0] == {"role": "system", "content": "ab"}
    assert "refusal" not in fields["messages"][1] and fields["messages"][1]["content"] is None
    assert fields["max_tokens"] == 9 and renames == {"max_tokens": "max_completion_tokens"}
    assert "response_format" not in fields and fields["top_k"] == 5
    assert opts == {"stream": True, "include_usage": True, "parallel_tool_calls": False}


@pytest.mark.parametrize("change,param", [
    ({"n": 3}, "n"), ({"messages": []}, "messages"), ({"messages": [{}] * 11}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"), ({"logprobs": True}, "logprobs"),
    ({"stream_options": "yes"}, "stream_options")])
def test_bad_chat_requests_name_the_param(change, param):
    body = dict({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, **change)
    with pytest.raises(HttpError) as info:
        translate.chat_fields(body, 10)
    assert (info.value.status, info.value.param) == (400, param)


REPLY = {"content": "", "finish_reason": "tool_calls", "prompt_tokens": 10,
         "completion_tokens": 4, "cached_tokens": 6, "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}


def test_a_reply_with_tool_calls_becomes_a_completion_and_stream_endings():
    done = translate.chat_completion(REPLY, "id1", "m", 0, parallel=False)
    msg = done["choices"][0]["message"]
    assert msg["content"] is None and [c["id"] for c in msg["tool_calls"]] == ["c1"]
    assert done["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                             "prompt_tokens_details": {"cached_tokens": 6}}
    chunks = translate.ChunkMaker("id1", "m", True).ending(REPLY)
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[:4]]
    assert [c["index"] for c in calls] == [0, 0, 1, 1]
    assert calls[0]["function"] == {"name": "f", "arguments": ""} and calls[0]["id"] == "c1"
    assert chunks[4]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["total_tokens"] == 14


@pytest.mark.parametrize("reply,status,code", [
    ({"code": "VRAM_LEDGER_DENY", "reason": "CAP", "requested_bytes": 1 << 31,
      "ledger_allocated_bytes": 0, "ledger_max_bytes": 1 << 30}, 503, "vram_ledger_deny/cap"),
    ({"code": "BUSY"}, 429, "rate_limit_exceeded"),
    ({"code": "CONTEXT_FULL", "n_ctx": 256, "prompt_tokens": 300, "max_tokens": 16}, 400,
     "context_length_exceeded"),
    ({"code": "MODEL_ERROR", "reason": "UNKNOWN_KEY"}, 404, "model_not_found"),
    ({"code": "BAD_REQUEST", "reason": "BAD_VALUE", "field": "top_p"}, 400, "bad_value"),
    ({"code": "BROKER_UNREACHABLE"}, 503, "broker_unreachable"),
    ({"code": "WORKER_LOST"}, 503, "worker_lost"),
    ({"code": "INTERNAL"}, 500, "internal")])
def test_broker_errors_map_to_openai_statuses(reply, status, code):
    err = errors.from_reply(dict(reply, status="error", message="m"), retry_after=9)
    assert (err.status, err.code) == (status, code)
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    if status == 503:
        assert err.headers["Retry-After"] == "9"
    if code == "vram_ledger_deny/cap":
        assert "2147483648 bytes" in body["message"] and "1073741824 bytes" in body["message"]
    if code == "context_length_exceeded":
        assert "maximum context length is 256 tokens" in body["message"]


def test_stop_scanner_cuts_at_the_first_stop_across_pieces():
    scan = translate.StopScanner(["END", "xy"])
    out = "".join(scan.feed(p) for p in ["Hel", "lo E", "N", "D more"])
    assert out == "Hello " and scan.hit
    scan = translate.StopScanner(["END"])
    assert "".join(scan.feed(p) for p in ["abc", "EN"]) + scan.flush() == "abcEN"
    assert not scan.hit

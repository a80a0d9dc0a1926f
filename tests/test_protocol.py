"""Protocol round trips and malformed input, without sockets."""
import msgpack
import pytest

from lmx.common import protocol
from lmx.common.errors import Code, LmxError, Reason


def roundtrip(verb, **fields):
    return protocol.decode_message(protocol.encode_request(verb, 7, **fields),
                                   protocol.CLIENT_VERBS)


@pytest.mark.parametrize("verb,fields", [
    ("HELP", {}), ("STATUS", {}), ("LIST", {}),
    ("REGISTER", {"agent": "a", "model": "smol"}),
    ("REGISTER", {"agent": "a", "model": "smol", "n_ctx": 4096}),
    ("REGISTER", {"agent": "a", "model": "m", "flash_attn": False, "type_k": "q8_0",
                  "type_v": "f16", "swa_full": True}),
    ("UNREGISTER", {"agent": "a"}),
    ("DECODE", {"agent": "a", "prompt": "hi", "n_predict": 3}),
])
def test_every_client_verb_round_trips(verb, fields):
    msg = roundtrip(verb, **fields)
    assert (msg.verb, msg.id, msg.fields) == (verb, 7, fields)


def test_worker_messages_round_trip():
    frames = protocol.encode_request("RESULT", 3, status="ok", text="x", engine={})
    msg = protocol.decode_message(frames, protocol.WORKER_EVENTS)
    assert msg.fields == {"status": "ok", "text": "x", "engine": {}}
    msg = protocol.decode_message(protocol.encode_request("REGISTER", 1, agent="a", path="/m",
                                                          spec={"n_ctx": 512}),
                                  protocol.WORKER_JOBS)
    assert msg.fields["path"] == "/m"


def test_reply_echoes_id_and_version():
    body = protocol.decode_reply(protocol.encode_reply("abc", text="t"))
    assert body["id"] == "abc" and body["status"] == "ok"
    assert tuple(body["v"]) == protocol.PROTOCOL_VERSION
    err = LmxError(Code.VRAM_LEDGER_DENY, "no", Reason.CAP, requested_bytes=5)
    body = protocol.decode_reply(protocol.encode_error(9, err))
    assert body["status"] == "error" and body["code"] == "VRAM_LEDGER_DENY"
    assert body["reason"] == "CAP" and body["requested_bytes"] == 5 and body["id"] == 9
    again = LmxError.from_reply(body)
    assert again.code == err.code and again.details["requested_bytes"] == 5


def pack(obj):
    return [msgpack.packb(obj)]


GOOD = {"v": [1, 0], "id": 1, "verb": "DECODE", "agent": "a", "prompt": "p", "n_predict": 1}


@pytest.mark.parametrize("frames,code,reason", [
    ([b"\xc1"], Code.BAD_FRAME, ""),
    (pack([1, 2]), Code.BAD_FRAME, ""),
    ([b"x", b"y"], Code.BAD_FRAME, ""),
    ([b"\x00" * (protocol.DEFAULT_MAX_FRAME_BYTES + 1)], Code.FRAME_TOO_LARGE, ""),
    (pack(dict(GOOD, v=[2, 0])), Code.BAD_VERSION, ""),
    (pack({k: v for k, v in GOOD.items() if k != "v"}), Code.BAD_VERSION, ""),
    (pack(dict(GOOD, verb="FROB")), Code.UNKNOWN_VERB, ""),
    (pack({k: v for k, v in GOOD.items() if k != "id"}), Code.BAD_REQUEST, Reason.MISSING_FIELD),
    (pack({k: v for k, v in GOOD.items() if k != "prompt"}), Code.BAD_REQUEST,
     Reason.MISSING_FIELD),
    (pack(dict(GOOD, n_predict="3")), Code.BAD_REQUEST, Reason.BAD_TYPE),
    (pack(dict(GOOD, n_predict=True)), Code.BAD_REQUEST, Reason.BAD_TYPE),
    (pack(dict(GOOD, id=[1])), Code.BAD_REQUEST, Reason.BAD_TYPE),
])
def test_malformed_input_raises_typed_errors(frames, code, reason):
    with pytest.raises(LmxError) as info:
        protocol.decode_message(frames, protocol.CLIENT_VERBS)
    assert info.value.code == code
    if reason:
        assert info.value.reason == reason


def test_error_keeps_the_request_id_when_it_was_readable():
    with pytest.raises(LmxError) as info:
        protocol.decode_message(pack(dict(GOOD, verb="FROB", id=42)), protocol.CLIENT_VERBS)
    assert info.value.msg_id == 42


def test_help_lists_every_verb():
    assert set(protocol.help_text()) == set(protocol.CLIENT_VERBS)


@pytest.mark.parametrize("n_static", [0, 3, 20])
def test_cached_reply_equals_a_fresh_one(n_static):
    static = {f"k{i}": [i, {"x": "y" * i}] for i in range(n_static)}
    cached = protocol.CachedReply(static)
    for msg_id in (1, "abc", 10**12):
        got = protocol.decode_reply(cached.frames(msg_id, uptime_s=1.5, requests=7))
        want = protocol.decode_reply(protocol.encode_reply(msg_id, uptime_s=1.5, requests=7,
                                                           **static))
        assert got == want and got["id"] == msg_id

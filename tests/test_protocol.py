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


# -- ids on errors, verbs, agent ids, the error tables ------------------------------------------

def decode_error(frames, verbs=protocol.CLIENT_VERBS, **kw):
    with pytest.raises(LmxError) as info:
        protocol.decode_message(frames, verbs, **kw)
    return info.value


@pytest.mark.parametrize("msg_id", [42, "req-1", -3, 10**18, "x" * 64])
def test_bad_frame_with_extra_frames_keeps_the_id_of_the_first(msg_id):
    err = decode_error(pack(dict(GOOD, id=msg_id)) + [b"extra"])
    assert err.code == Code.BAD_FRAME and err.msg_id == msg_id


def test_truncated_body_keeps_the_id_read_before_the_cut():
    raw = msgpack.packb({"v": [1, 0], "id": 5, "verb": "DECODE", "prompt": "x" * 100})
    err = decode_error([raw[:-10]])
    assert err.code == Code.BAD_FRAME and err.msg_id == 5


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("msg_id", [42, "req-1", "é" * 64])
def test_frame_too_large_keeps_the_id(first, msg_id):
    big = {"prompt": "x" * 5000, "extra": [list(range(50))] * 20, 7: {"nested": b"\0" * 300}}
    rest = {k: v for k, v in {**GOOD, **big}.items() if k != "id"}
    body = {"id": msg_id, **rest} if first else {**rest, "id": msg_id}
    assert (next(iter(body)) == "id") == first
    err = decode_error(pack(body), max_bytes=1000)
    assert err.code == Code.FRAME_TOO_LARGE and err.msg_id == msg_id
    assert err.details["max_frame_bytes"] == 1000


@pytest.mark.parametrize("bad_id", [True, None, 1.5, [1], "", "x" * 65, b"id", {"id": 1}])
def test_frame_too_large_ignores_an_invalid_id(bad_id):
    err = decode_error(pack(dict(GOOD, id=bad_id, prompt="x" * 2000)), max_bytes=1000)
    assert err.code == Code.FRAME_TOO_LARGE and err.msg_id is None


def test_id_peek_is_bounded_and_never_raises():
    many = {f"k{i}": i for i in range(protocol.ID_SCAN_MAX_KEYS + 10)}
    err = decode_error(pack(dict(many, id=9)), max_bytes=100)
    assert err.code == Code.FRAME_TOO_LARGE and err.msg_id is None   # id past the bound
    for raw in [b"\x8f", b"\xdf\xff\xff\xff\xff\xa2id", b"\x81\xa2id", b"\x81\xa2id\xda\xff",
                b"\x81\xa2id\xc1", b"\xc1" * 2000, b"\x91" * 2000, b"\x81\xa2i\xff\xff",
                b"\x82\x91" * 1000, b"\x81\xa2id\xa3\xff\xfe\xfd" + b"\0" * 2000]:
        for frames, kw in [([raw], {"max_bytes": 10}), ([raw, b""], {}), ([raw], {})]:
            err = decode_error(frames, **kw)
            assert err.code in (Code.BAD_FRAME, Code.FRAME_TOO_LARGE) and err.msg_id is None


def test_every_error_after_the_map_is_read_keeps_a_valid_id():
    assert decode_error(pack(dict(GOOD, v=[2, 0], id="r"))).msg_id == "r"
    assert decode_error(pack(dict(GOOD, prompt=3, id=8))).msg_id == 8
    assert decode_error(pack(dict(GOOD, id=True))).msg_id is None
    err = decode_error(pack(dict(GOOD, id="x" * 65)))
    assert err.msg_id is None and (err.reason, err.details["field"]) == (Reason.BAD_TYPE, "id")


@pytest.mark.parametrize("verb,reason", [
    (None, Reason.MISSING_FIELD), ("<missing>", Reason.MISSING_FIELD), (3, Reason.BAD_TYPE),
    (b"DECODE", Reason.BAD_TYPE), (["DECODE"], Reason.BAD_TYPE)])
def test_missing_or_ill_typed_verb_is_a_bad_request(verb, reason):
    body = dict(GOOD, id=11, verb=verb)
    if verb == "<missing>":
        del body["verb"]
    err = decode_error([msgpack.packb(body, use_bin_type=True)])
    assert (err.code, err.reason, err.details["field"], err.msg_id) == \
        (Code.BAD_REQUEST, reason, "verb", 11)


def test_unknown_string_verb_stays_unknown_and_verbs_are_case_insensitive():
    err = decode_error(pack(dict(GOOD, verb="y" * 10000)))
    assert err.code == Code.UNKNOWN_VERB and len(err.message) < 200
    msg = protocol.decode_message(pack(dict(GOOD, verb="deCode")), protocol.CLIENT_VERBS)
    assert msg.verb == "DECODE"


AGENT_VERBS = sorted(v for v, schema in protocol.CLIENT_VERBS.items() if "agent" in schema)
VALID_FIELDS = {"agent": "a", "model": "m", "prompt": "p", "n_predict": 1, "request": 1,
                "messages": [{"role": "user", "content": "hi"}]}


def agent_request(verb, agent):
    fields = {k: v for k, v in VALID_FIELDS.items()
              if k in protocol.CLIENT_VERBS[verb] and protocol.CLIENT_VERBS[verb][k].required}
    return protocol.encode_request(verb, 5, **dict(fields, agent=agent))


@pytest.mark.parametrize("verb", AGENT_VERBS)
@pytest.mark.parametrize("agent", ["", "-a", ".a", "_a", "a b", "a\n", "a/b", "é", "a\x00",
                                   "a" * 65])
def test_every_client_agent_field_is_checked(verb, agent):
    err = decode_error(agent_request(verb, agent))
    assert (err.code, err.reason, err.details["field"], err.msg_id) == \
        (Code.BAD_REQUEST, Reason.BAD_VALUE, "agent", 5)
    assert protocol.AGENT_ID_RULE in err.message


@pytest.mark.parametrize("verb", AGENT_VERBS)
@pytest.mark.parametrize("agent", ["a", "0", "a" * 64, "Z9_.:-x", "agent:1.2-b_c"])
def test_valid_agent_ids_pass(verb, agent):
    assert protocol.decode_message(agent_request(verb, agent),
                                   protocol.CLIENT_VERBS).fields["agent"] == agent


def test_a_long_agent_id_is_never_echoed_in_full():
    err = decode_error(agent_request("REGISTER", "a" * 100000))
    assert err.message == (f"agent id {'a' * 64 + '…'!r} (100000 chars) must be "
                           f"{protocol.AGENT_ID_RULE}")
    with pytest.raises(LmxError) as info:
        protocol.check_agent_id("b" * 65)
    assert "(65 chars)" in info.value.message and "b" * 65 not in info.value.message


def test_agent_ids_are_checked_for_client_verbs_only_by_default():
    frames = protocol.encode_request("PARK", 1, agent="not valid", ram_bytes=0, disk=False)
    assert protocol.decode_message(frames, protocol.WORKER_JOBS).fields["agent"] == "not valid"
    err = decode_error(frames, protocol.WORKER_JOBS, client=True)
    assert err.reason == Reason.BAD_VALUE


def test_error_tables():
    reasons = {k: v for k, v in vars(Reason).items() if not k.startswith("_")}
    codes = {k: v for k, v in vars(Code).items() if not k.startswith("_")}
    assert "LIVE_BUSY" not in reasons and "NONE" not in reasons
    assert all(k == v for k, v in reasons.items()) and all(k == v for k, v in codes.items())
    assert Code.STATE_LOST == "STATE_LOST"
    assert Reason.PARK_BUDGET == "PARK_BUDGET"


# -- hostile input at the protocol level (test_fuzz does the same through a broker) -------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | \
    st.floats(allow_nan=False) | st.text(max_size=70) | st.binary(max_size=20)
anything = st.recursive(scalars, lambda c: st.lists(c, max_size=4) |
                        st.dictionaries(st.text(max_size=8) | st.integers(-2**63, 2**63), c,
                                                       max_size=4),
                        max_leaves=12)
bodies = st.fixed_dictionaries(
    {}, optional={"v": st.sampled_from([[1, 0], [1, 7], [2, 0], [0], "1.0"]) | anything,
                  "id": st.integers(-2**63, 2**64 - 1) | st.text(max_size=70) | anything,
                  "verb": st.sampled_from(AGENT_VERBS + ["help", "RESULT"]) | anything,
                  "agent": st.text(max_size=200) | anything, "prompt": st.text(max_size=20),
                  "model": st.text(max_size=5), "n_predict": st.integers(-2, 5) | scalars,
                  "request": anything, "extra": anything})
frame_lists = st.lists(st.binary(max_size=64), min_size=0, max_size=3) | \
    anything.map(lambda o: [msgpack.packb(o)]) | bodies.map(lambda b: [msgpack.packb(b)]) | \
    bodies.map(lambda b: [msgpack.packb(b)[:-1]]) | \
    bodies.map(lambda b: [msgpack.packb(b), b"x"])


@settings(max_examples=800, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(frame_lists, st.sampled_from([None, 8, 64, protocol.DEFAULT_MAX_FRAME_BYTES]),
       st.sampled_from([protocol.CLIENT_VERBS, protocol.WORKER_JOBS, protocol.WORKER_EVENTS]))
def test_decode_only_raises_lmx_errors_with_a_valid_id(frames, max_bytes, verbs):
    try:
        msg = protocol.decode_message(frames, verbs, max_bytes=max_bytes)
    except LmxError as err:
        assert err.msg_id is None or protocol._valid_id(err.msg_id)
        assert isinstance(err.message, str) and len(err.message) < 1000
        msgpack.unpackb(protocol.encode_error(err.msg_id, err)[0], strict_map_key=False)
    else:
        assert protocol._valid_id(msg.id) and msg.verb in verbs


@settings(max_examples=500, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(bodies)
def test_too_large_frames_report_the_id_a_full_decode_reads(body):
    frames = [msgpack.packb(body)]
    try:
        want = protocol.decode_message(frames, protocol.CLIENT_VERBS, max_bytes=None).id
    except LmxError as err:
        want = err.msg_id
    assert decode_error(frames, max_bytes=0).msg_id == want
    assert decode_error(frames + [b""], max_bytes=None).msg_id == want

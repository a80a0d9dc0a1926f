"""The lmx wire protocol: the only module that builds or parses frames.

Sockets and frames::

    agent DEALER  ---- [body] ---->  ROUTER broker (client endpoint)
                  <--- [body] -----   (the ROUTER adds/strips the identity frame)
    worker DEALER ---- [body] ---->  ROUTER broker (worker endpoint)

Every message is exactly one frame, ``body``, a msgpack map::

    request   {"v": [1, 0], "id": 7, "verb": "DECODE", "agent": "smol", ...}
    partial   {"v": [1, 0], "id": 7, "status": "partial", "index": 0, "token": 42, "text": "Hi"}
    ok reply  {"v": [1, 0], "id": 7, "status": "ok", ...fields}
    error     {"v": [1, 0], "id": 7, "status": "error", "code": "VRAM_LEDGER_DENY",
               "reason": "CAP", "message": "...", ...numbers}

Envelope rules, checked by ``decode_message`` in this order:

- The body must be one frame (else ``BAD_FRAME``) of at most ``max_bytes`` (else
  ``FRAME_TOO_LARGE``) holding a msgpack map (else ``BAD_FRAME``).
- ``v`` is required: the protocol version (not the package version) as ``[major, minor]``
  ints. Anything else, or another major version, gets ``BAD_VERSION``; a newer minor is
  accepted.
- ``id`` is required: an int or a string of 1-64 characters, chosen by the sender and echoed
  in the reply (missing: ``BAD_REQUEST/MISSING_FIELD``, anything else:
  ``BAD_REQUEST/BAD_TYPE``, both with ``field: "id"``). Every error reply carries the id
  whenever it could be read, including ``BAD_FRAME`` (a map with an id followed by extra
  frames, or cut short after its id) and ``FRAME_TOO_LARGE`` (the id is picked out of the
  oversized body without decoding the rest).
- ``verb`` is required and case-insensitive (``decode`` means ``DECODE``): missing gets
  ``BAD_REQUEST/MISSING_FIELD``, not a string ``BAD_REQUEST/BAD_TYPE`` (``field: "verb"``),
  a string not in the table ``UNKNOWN_VERB``.
- Each verb's fields are then checked for presence and type (``BAD_REQUEST`` with
  ``MISSING_FIELD`` or ``BAD_TYPE`` and ``field``); for client verbs every ``agent`` field must
  also be a valid agent id (``AGENT_ID_RULE``, else ``BAD_REQUEST/BAD_VALUE``). Unknown extra
  fields are ignored, so minor versions can add fields.

Broker and worker speak the same shape: the broker sends jobs as requests (verbs REGISTER,
UNREGISTER, DECODE, HEARTBEAT, SHUTDOWN, and CANCEL out of band); the worker sends READY,
HEARTBEAT, TOKEN (a streamed token of the job in flight), PROGRESS (a REGISTER job's model
load) and RESULT, where a RESULT carries the job id and the reply fields (``status`` and the
rest). A streaming DECODE, and a REGISTER with ``progress`` that loads its model, get any
number of ``partial`` replies before the final one, all with the request's id.
"""
import msgpack

from lmx.common.config import AGENT_ID_RE
from lmx.common.errors import Code, LmxError, Reason

PROTOCOL_VERSION = (1, 2)   # 1.1: typed replies (kv_swap_parked, STATE_LOST, ...); 1.2: key,
                            # QUOTA, STATUS quotas, REGISTER progress
DEFAULT_MAX_FRAME_BYTES = 1 << 20
MAX_ID_LEN = 64
MAX_SHOWN_CHARS = 64        # error messages quote at most this much of a client's string
ID_SCAN_MAX_KEYS = 256      # entries looked at when picking the id out of a rejected body

# The agent id rule, in words: the one text every "bad agent id" message uses.
AGENT_ID_RULE = ("1-64 characters of letters, digits and _.:- starting with a letter or "
                 "digit")


class Field:
    """One field of a request: accepted types and whether it must be present."""

    def __init__(self, types, required=True):
        self.types = types if isinstance(types, tuple) else (types,)
        self.required = required


# What agents may send. Ranges (n_predict, n_ctx, id charset) are checked by the broker,
# which knows the configured limits.
CLIENT_VERBS = {
    "HELP": {},
    "STATUS": {},
    "LIST": {},
    "REGISTER": {"agent": Field(str), "model": Field(str), "n_ctx": Field(int, False),
                 "flash_attn": Field(bool, False), "type_k": Field(str, False),
                 "type_v": Field(str, False), "swa_full": Field(bool, False),
                 "key": Field(str, False), "progress": Field(bool, False),
                 "device": Field((int, str), False)},
    "UNREGISTER": {"agent": Field(str)},
    "DECODE": {"agent": Field(str), "prompt": Field(str), "n_predict": Field(int),
               "stream": Field(bool, False), "deadline_ms": Field(int, False),
               "key": Field(str, False)},
    "CHAT": {"agent": Field(str), "messages": Field(list), "max_tokens": Field(int, False),
             "temperature": Field((float, int), False), "top_p": Field((float, int), False),
             "top_k": Field(int, False), "min_p": Field((float, int), False),
             "repeat_penalty": Field((float, int), False),
             "presence_penalty": Field((float, int), False),
             "frequency_penalty": Field((float, int), False), "seed": Field(int, False),
             "stop": Field((str, list), False), "response_format": Field(dict, False),
             "grammar": Field(str, False), "tools": Field(list, False),
             "tool_choice": Field((str, dict), False), "truncate": Field(str, False),
             "stream": Field(bool, False), "deadline_ms": Field(int, False),
             "key": Field(str, False)},
    "CANCEL": {"agent": Field(str), "request": Field((int, str))},
}

# Broker -> worker jobs.
WORKER_JOBS = {
    "REGISTER": {"agent": Field(str), "path": Field(str), "spec": Field(dict),
                 "resume": Field(bool, False), "seat": Field(dict, False),
                 "progress": Field(bool, False)},
    "UNREGISTER": {"agent": Field(str)},
    # save its sequence to host memory or disk, free its seat (shrink: then resize the group)
    "PARK": {"agent": Field(str), "ram_bytes": Field(int), "disk": Field(bool),
             "shrink": Field(int, False)},
    "RESIZE": {"group": Field(int), "capacity": Field(int)},   # reclaim a group's free seats
    # move a parked agent to another device: its saved state, chunk by chunk, through the broker
    "EXPORT": {"agent": Field(str), "offset": Field(int), "size": Field(int)},
    "IMPORT": {"agent": Field(str), "path": Field(str), "spec": Field(dict),
               "offset": Field(int), "total": Field(int), "data": Field(bytes, False),
               "tokens": Field(list, False), "pending": Field(list, False)},
    "DECODE": {"agent": Field(str), "prompt": Field(str), "n_predict": Field(int),
               "max_prompt_tokens": Field(int, False), "stream": Field(bool, False),
               "deadline_ms": Field(int, False), "seat": Field(dict, False)},
    "CHAT": {"agent": Field(str), "messages": Field(list), "max_tokens": Field(int),
             "sampling": Field(dict, False), "stop": Field(list, False),
             "response_format": Field(dict, False), "grammar": Field(str, False),
             "tools": Field(list, False), "tool_choice": Field((str, dict), False),
             "template": Field(str, False), "truncate": Field(str, False),
             "stream": Field(bool, False), "deadline_ms": Field(int, False),
             "max_prompt_tokens": Field(int, False), "seat": Field(dict, False)},
    "CANCEL": {"job": Field(int)},             # out of band: stop that job at its next token
    "HEARTBEAT": {},
    "SHUTDOWN": {},
}

# Worker -> broker messages.
WORKER_EVENTS = {
    "READY": {"pid": Field(int), "device": Field(dict), "streaming": Field(dict, False),
              "name": Field(str, False)},     # the worker's name: its device at the broker
    "HEARTBEAT": {"device": Field(dict, False)},
    "RESULT": {"status": Field(str)},
    "TOKEN": {"index": Field(int), "token": Field(int), "text": Field(str)},
    # every streamed token of one step: [[job id, index, token, text], ...]
    "TOKENS": {"tokens": Field(list)},
    # a REGISTER job's model load (id: the job's), 0.0 to 1.0: jobs.LoadFraction
    "PROGRESS": {"fraction": Field((float, int))},
}

VERB_HELP = {
    "HELP": "list the verbs and their fields",
    "STATUS": "ledger, device totals, worker pid/state, agents and models",
    "LIST": "registered agents with their model, bytes and state",
    "REGISTER": "agent, model (table key or GGUF path), n_ctx?, flash_attn?, type_k?, type_v?, "
                "swa_full?, key? (a quotas client's key), progress? (partial replies carry the "
                "model's load progress), device? (an index or name from STATUS devices: pin it "
                "there): admit, place and build an agent",
    "UNREGISTER": "agent: release the agent's bytes, slot and model reference",
    "DECODE": "agent, prompt, n_predict, stream?, deadline_ms?, key?: greedy-decode continuing "
              "the agent's conversation; with stream, partial replies carry each token",
    "CHAT": "agent, messages, max_tokens?, temperature?, top_p?, top_k?, min_p?, "
            "repeat_penalty?, presence_penalty?, frequency_penalty?, seed?, stop?, "
            "response_format?, grammar?, tools?, tool_choice?, truncate?, stream?, deadline_ms?, "
            "key?: "
            "render the messages with the model's chat template, reuse the KV prefix, sample a "
            "reply (content, tool_calls, finish_reason); with stream, partial replies carry delta",
    "CANCEL": "agent, request (a DECODE's or CHAT's id): stop it at its next token, or drop it "
              "if queued",
}


class Message:
    """A decoded request or event: its verb, id and remaining fields."""

    __slots__ = ("verb", "id", "fields")

    def __init__(self, verb, msg_id, fields):
        self.verb = verb
        self.id = msg_id
        self.fields = fields

    def __repr__(self):
        return f"Message({self.verb!r}, id={self.id!r}, fields={sorted(self.fields)})"


def _pack(body):
    return [msgpack.packb(body, use_bin_type=True)]


def encode_request(verb, msg_id, **fields):
    """Frames for a request (or a worker event) with this verb and id."""
    return _pack(dict(fields, v=list(PROTOCOL_VERSION), id=msg_id, verb=verb))


def encode_reply(msg_id, **fields):
    """Frames for an ok reply; fields may override status (e.g. a forwarded error)."""
    body = {"status": "ok"}
    body.update(fields)
    body.update(v=list(PROTOCOL_VERSION), id=msg_id)
    return _pack(body)


class CachedReply:
    """An ok reply whose fields rarely change, packed once and sent with fresh dynamic fields.

    A msgpack map is a header (its entry count) followed by packed key/value pairs, so the
    static pairs are packed once; each send packs only the dynamic pairs, the version and id.
    Used for STATUS, which monitors poll often (it halves the broker's work per poll)."""

    def __init__(self, static_fields):
        body = {"status": "ok"}
        body.update(static_fields)
        self.count = len(body)
        self.static = b"".join(msgpack.packb(k) + msgpack.packb(v, use_bin_type=True)
                               for k, v in body.items())

    def frames(self, msg_id, **dynamic):
        """Frames for this reply to request msg_id, with the dynamic fields added."""
        tail = dict(dynamic, v=list(PROTOCOL_VERSION), id=msg_id)
        pairs = b"".join(msgpack.packb(k) + msgpack.packb(v, use_bin_type=True)
                         for k, v in tail.items())
        return [_map_header(self.count + len(tail)) + self.static + pairs]


def _map_header(n):
    if n < 16:
        return bytes([0x80 | n])
    if n < 1 << 16:
        return b"\xde" + n.to_bytes(2, "big")
    return b"\xdf" + n.to_bytes(4, "big")


def encode_error(msg_id, err):
    """Frames for an error reply built from an LmxError."""
    return encode_reply(msg_id, **err.fields())


def _valid_id(value):
    """Whether value may serve as a message id: an int (not a bool) or a 1-64 char string."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and 0 < len(value) <= MAX_ID_LEN)


def shown(value):
    """repr() of a client-supplied string, cut to its first MAX_SHOWN_CHARS characters."""
    if isinstance(value, str) and len(value) > MAX_SHOWN_CHARS:
        return f"{value[:MAX_SHOWN_CHARS] + '…'!r} ({len(value)} chars)"
    return repr(value)


def check_agent_id(agent, field="agent"):
    """Return agent if it is a valid agent id; else raise BAD_REQUEST/BAD_VALUE for field."""
    if isinstance(agent, str) and AGENT_ID_RE.fullmatch(agent):
        return agent
    raise LmxError(Code.BAD_REQUEST, f"agent id {shown(agent)} must be {AGENT_ID_RULE}",
                   Reason.BAD_VALUE, field=field)


# Checks on a field's value after its type, by field name; applied to client verbs.
VALUE_CHECKS = {"agent": check_agent_id}

_FIXSTR = range(0xa0, 0xc0)
_INTS = frozenset(range(0x00, 0x80)) | frozenset(range(0xe0, 0x100)) | \
    frozenset(range(0xcc, 0xd4))
_STR_LEN_BYTES = {0xd9: 1, 0xda: 2, 0xdb: 4}    # str8/16/32: size of the length field


def _short_str_at(raw, pos, limit):
    """Whether raw[pos] starts a msgpack str of at most limit bytes."""
    head = raw[pos]
    if head in _FIXSTR:
        return head - 0xa0 <= limit
    size = _STR_LEN_BYTES.get(head)
    return size is not None and int.from_bytes(raw[pos + 1:pos + 1 + size], "big") <= limit


def _peek_id(raw):
    """Best effort: the id of a msgpack map body that will not be decoded (too large, extra
    frames, malformed after the id). Reads entry by entry with msgpack.Unpacker, building only
    short string keys and the id itself and skipping every other value, for at most
    ID_SCAN_MAX_KEYS entries. Returns None when no valid id is found; never raises."""
    try:
        raw = raw if isinstance(raw, bytes) else bytes(raw)
        unpacker = msgpack.Unpacker(raw=True, max_buffer_size=max(len(raw), 1))
        unpacker.feed(raw)
        for _ in range(min(unpacker.read_map_header(), ID_SCAN_MAX_KEYS)):
            if _short_str_at(raw, unpacker.tell(), 2):
                key = unpacker.unpack()
            else:
                unpacker.skip()
                key = None
            if key != b"id":
                unpacker.skip()
                continue
            pos = unpacker.tell()
            if not (raw[pos] in _INTS or _short_str_at(raw, pos, 4 * MAX_ID_LEN)):
                return None     # an id that cannot be valid: don't build it
            value = unpacker.unpack()
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            return value if _valid_id(value) else None
    except Exception:  # a best-effort read: any malformation just means "no id"
        return None
    return None


def _unpack(frames, max_bytes):
    """One body frame -> dict, or LmxError(BAD_FRAME/FRAME_TOO_LARGE)."""
    if len(frames) != 1:
        raise LmxError(Code.BAD_FRAME, f"expected 1 body frame, got {len(frames)}")
    raw = frames[0]
    if max_bytes is not None and len(raw) > max_bytes:
        raise LmxError(Code.FRAME_TOO_LARGE, f"frame of {len(raw)} bytes exceeds {max_bytes}",
                       frame_bytes=len(raw), max_frame_bytes=max_bytes)
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise LmxError(Code.BAD_FRAME, f"body is not valid msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise LmxError(Code.BAD_FRAME, f"body must be a msgpack map, got {type(body).__name__}")
    return body


def _check_id(body):
    msg_id = body.get("id")
    if not _valid_id(msg_id):
        raise LmxError(Code.BAD_REQUEST, "field 'id' must be an int or a string of 1-64 chars",
                       Reason.MISSING_FIELD if msg_id is None else Reason.BAD_TYPE, field="id")
    return msg_id


def _check_verb(body, verbs):
    verb = body.get("verb")
    if verb is None:
        raise LmxError(Code.BAD_REQUEST, "field 'verb' is required", Reason.MISSING_FIELD,
                       field="verb")
    if not isinstance(verb, str):
        raise LmxError(Code.BAD_REQUEST, f"field 'verb' must be str, got {type(verb).__name__}",
                       Reason.BAD_TYPE, field="verb")
    if verb.upper() not in verbs:
        raise LmxError(Code.UNKNOWN_VERB, f"unknown verb {shown(verb)}", known=sorted(verbs))
    return verb.upper()


def _check_version(body):
    v = body.get("v")
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v)):
        raise LmxError(Code.BAD_VERSION, "field 'v' must be [major, minor]",
                       expected=list(PROTOCOL_VERSION))
    if v[0] != PROTOCOL_VERSION[0]:
        raise LmxError(Code.BAD_VERSION, f"protocol {v[0]}.{v[1]} not supported",
                       expected=list(PROTOCOL_VERSION), got=list(v))


def _check_fields(verb, body, schema, checks=None):
    fields = {}
    for name, spec in schema.items():
        if name not in body or body[name] is None:
            if spec.required:
                raise LmxError(Code.BAD_REQUEST, f"{verb} needs field '{name}'",
                               Reason.MISSING_FIELD, field=name)
            continue
        value = body[name]
        if (isinstance(value, bool) and bool not in spec.types) or \
                not isinstance(value, spec.types):
            want = "/".join(t.__name__ for t in spec.types)
            raise LmxError(Code.BAD_REQUEST, f"field '{name}' must be {want}",
                           Reason.BAD_TYPE, field=name)
        if checks and name in checks:
            checks[name](value, field=name)
        fields[name] = value
    return fields


def decode_message(frames, verbs, max_bytes=DEFAULT_MAX_FRAME_BYTES, client=None):
    """Parse and validate one message against a verb table; raise LmxError with .msg_id set
    (None when no valid id could be read). client: apply VALUE_CHECKS (agent ids); by
    default only when verbs is CLIENT_VERBS."""
    if client is None:
        client = verbs is CLIENT_VERBS
    msg_id = None
    try:
        try:
            body = _unpack(frames, max_bytes)
        except LmxError:
            if len(frames) >= 1 and isinstance(frames[0], (bytes, bytearray, memoryview)):
                msg_id = _peek_id(frames[0])
            raise
        msg_id = body.get("id") if _valid_id(body.get("id")) else None
        _check_version(body)
        msg_id = _check_id(body)
        verb = _check_verb(body, verbs)
        if verb == "RESULT":
            return Message(verb, msg_id, _result_fields(body))
        return Message(verb, msg_id, _check_fields(verb, body, verbs[verb],
                                                   VALUE_CHECKS if client else None))
    except LmxError as err:
        err.msg_id = msg_id
        raise


def _result_fields(body):
    """A RESULT keeps every field but the envelope ones."""
    _check_fields("RESULT", body, WORKER_EVENTS["RESULT"])
    return {k: v for k, v in body.items() if k not in ("v", "id", "verb")}


def decode_reply(frames, max_bytes=None):
    """Parse a reply body into a dict (used by clients; no verb table)."""
    body = _unpack(frames, max_bytes)
    _check_version(body)
    return body


def help_text():
    """The HELP reply's verbs table."""
    return {verb: {"fields": {k: {"type": "/".join(t.__name__ for t in f.types),
                                  "required": f.required} for k, f in schema.items()},
                   "summary": VERB_HELP[verb]}
            for verb, schema in CLIENT_VERBS.items()}

"""A CHAT request checked field by field before it is queued (pure): one BAD_REQUEST naming
the field, nothing decoded, nothing booked. What needs the model (rendering the template,
compiling a grammar) is checked by the worker before it decodes anything."""
from lmx.common import chat
from lmx.common.errors import Code, LmxError, Reason
from lmx.common.jobs import Sampling

DEFAULT_MAX_TOKENS = 256
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_GRAMMAR_BYTES = 64 << 10
RESPONSE_TYPES = ("text", "json_object", "json_schema")


def bad(field, why):
    """The BAD_REQUEST for one field."""
    return LmxError(Code.BAD_REQUEST, f"{field} {why}", Reason.BAD_VALUE, field=field)


def _number(f, name, low, high, low_open=False, default=None):
    value = f.get(name, default)
    if value is None:
        return None
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        left = "(" if low_open else "["
        raise bad(name, f"must be in {left}{low}, {high}], got {value}")
    return value


def _sampling(f):
    base = Sampling()
    temperature = _number(f, "temperature", 0, 2, default=base.temperature)
    top_p = _number(f, "top_p", 0, 1, low_open=True, default=base.top_p)
    top_k = _number(f, "top_k", 0, 1 << 20, default=base.top_k)
    min_p = _number(f, "min_p", 0, 1, default=base.min_p)
    repeat = _number(f, "repeat_penalty", 0, 10, low_open=True, default=base.repeat_penalty)
    presence = _number(f, "presence_penalty", -2, 2, default=base.presence_penalty)
    frequency = _number(f, "frequency_penalty", -2, 2, default=base.frequency_penalty)
    seed = f.get("seed")
    if seed is not None and not 0 <= seed < 1 << 32:
        raise bad("seed", f"must be in [0, 2**32), got {seed}")
    return Sampling(float(temperature), int(top_k), float(top_p), float(min_p), float(repeat),
                    float(presence), float(frequency), base.penalty_last_n, seed)


def _stops(value):
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"has {len(stops)} strings; at most {MAX_STOPS}")
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise bad(f"stop[{i}]", f"must be a non-empty string of at most {MAX_STOP_CHARS} "
                      "characters")
    return stops


def _response_format(value):
    if value is None:
        return None
    kind = value.get("type")
    if kind not in RESPONSE_TYPES:
        raise bad("response_format.type", f"must be one of {', '.join(RESPONSE_TYPES)}")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad("response_format.json_schema", "must be {\"name\": ..., \"schema\": "
                      "{a JSON schema object}}")
    return value


def check_chat(f, max_n_predict):
    """The ChatJob fields of a CHAT request (without agent, template, deadline), or
    BAD_REQUEST naming the first bad field."""
    try:
        chat.check_messages(f["messages"])
        tools = f.get("tools")
        if tools is not None:
            chat.check_tools(tools)
        tool_choice = chat.check_tool_choice(f.get("tool_choice", "auto" if tools else "none"),
                                             tools or [])
    except chat.BadField as err:
        raise bad(err.field, str(err)) from None
    max_tokens = f.get("max_tokens", min(DEFAULT_MAX_TOKENS, max_n_predict))
    if not 1 <= max_tokens <= max_n_predict:
        raise bad("max_tokens", f"must be in [1, {max_n_predict}], got {max_tokens}")
    grammar = f.get("grammar")
    if grammar is not None and not 0 < len(grammar.encode("utf-8", "surrogatepass")) <= \
            MAX_GRAMMAR_BYTES:
        raise bad("grammar", f"must be 1 to {MAX_GRAMMAR_BYTES} bytes of GBNF")
    truncate = f.get("truncate")
    if truncate not in (None, "middle"):
        raise bad("truncate", "must be \"middle\" or absent")
    return {"messages": f["messages"], "max_tokens": max_tokens, "sampling": _sampling(f),
            "stop": _stops(f.get("stop")), "response_format": _response_format(
                f.get("response_format")), "grammar": grammar, "tools": tools,
            "tool_choice": tool_choice, "truncate": truncate, "stream": bool(f.get("stream"))}

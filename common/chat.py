"""Chat messages and templates, pure: no llama.cpp here (the broker imports it to check a CHAT).

Templates are jinja, rendered as transformers' ``apply_chat_template`` renders them: a
sandboxed environment (``ImmutableSandboxedEnvironment``, trim_blocks, lstrip_blocks), the
variables ``messages``, ``tools``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, the
globals ``raise_exception`` and ``strftime_now``, and a ``tojson`` filter that keeps non-ASCII.

Tools. A template that uses the ``tools`` variable renders them itself. For one that does
not, ``with_tools_prompt`` adds this system prompt (Hermes' format, which ChatML models such
as Qwen 2.5 and Hermes are trained on)::

    # Tools

    You may call one or more functions to assist with the user query.

    You are provided with function signatures within <tools></tools> XML tags:
    <tools>
    {"type": "function", "function": {...}}        (one JSON object per line)
    </tools>

    For each function call, return a json object with function name and arguments within
    <tool_call></tool_call> XML tags:
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

and ``parse_tool_calls`` reads ``<tool_call>{...}</tool_call>`` blocks back into OpenAI's
shape. That is the one tool-call format parsed today (ChatML/Hermes).
"""
import datetime
import functools
import json
import re
import uuid

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')

_TOOLS_HEAD, _TOOLS_TAIL = (part.replace("\n", "\\n") for part in TOOLS_PROMPT.replace(
    "{{", "{").replace("}}", "}").split("{tools}"))
# ChatML with tools as Qwen 2.5 / Hermes render them (tool results in a user turn).
CHATML = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}"
    "{%- endif %}{{- '" + _TOOLS_HEAD + "' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' if not loop.last }}{%- endfor %}"
    "{{- '" + _TOOLS_TAIL + "<|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first %}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message.get('tool_calls') %}{{- '<|im_start|>' + message['role'] }}"
    "{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{%- if call['function']['arguments'] is string %}{{- call['function']['arguments'] }}"
    "{%- else %}{{- call['function']['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

BUILTIN_TEMPLATES = {"chatml": CHATML}
_TOOL_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)


class TemplateError(Exception):
    """Rendering failed: a jinja error, or the template's own raise_exception."""


class BadField(ValueError):
    """A request field that is not what the protocol asks for; .field names it."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


def _raise(message):
    raise TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@functools.lru_cache(maxsize=None)
def _env():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=64)
def _compiled(template):
    try:
        return _env().from_string(template)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the chat template does not compile: {exc}") from None


def resolve_template(name_or_text):
    """A built-in template's text for its name; any other text is a template itself."""
    return BUILTIN_TEMPLATES.get(name_or_text, name_or_text)


def render(template, messages, *, tools=None, add_generation_prompt=True, bos_token="",
           eos_token=""):
    """The prompt text for messages, as transformers' apply_chat_template renders it."""
    try:
        return _compiled(template).render(messages=messages, tools=tools or None,
                                          add_generation_prompt=add_generation_prompt,
                                          bos_token=bos_token, eos_token=eos_token)
    except TemplateError:
        raise
    except Exception as exc:  # jinja's errors, the sandbox's SecurityError, type errors
        raise TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None


@functools.lru_cache(maxsize=64)
def template_uses_tools(template):
    """Whether the template renders the `tools` variable itself."""
    try:
        return "tools" in meta.find_undeclared_variables(_env().parse(template))
    except jinja2.TemplateError:
        return False


def with_tools_prompt(messages, tools):
    """messages with the documented tools system prompt merged into the first system message
    (or added as one), for templates that do not use `tools`."""
    prompt = TOOLS_PROMPT.format(tools="\n".join(_tojson(t) for t in tools))
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0], content=f"{messages[0].get('content') or ''}\n\n{prompt}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _call(body):
    data = json.loads(body)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError("not a call")
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError("arguments are not an object")
    return {"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
            "function": {"name": data["name"], "arguments": json.dumps(args,
                                                                      ensure_ascii=False)}}


def parse_tool_calls(text):
    """(content outside the tool-call blocks, [OpenAI-shaped calls]) from a reply's text."""
    calls, kept, last = [], [], 0
    for match in _TOOL_CALL.finditer(text):
        try:
            calls.append(_call(match.group(1).strip()))
        except ValueError:
            continue                        # not a call: it stays in the content
        kept.append(text[last:match.start()])
        last = match.end()
    kept.append(text[last:])
    return "".join(kept).strip() if calls else text, calls


class StopScanner:
    """Holds back text that could be the start of a stop string; finds the earliest stop."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text):
        """(text safe to emit now, whether a stop string was found)."""
        if self.stopped:
            return "", True
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held, self.stopped = self.held[:min(hits)], "", True
            return out, True
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.held)), 0, -1)
                    if self.held.endswith(s[:n])), default=0)
        out = self.held[:len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]
        return out, False

    def flush(self):
        """What was held back, at the end (no stop string came)."""
        out, self.held = self.held, ""
        return "" if self.stopped else out


def check_messages(messages):
    """Raise BadField for the first message that breaks the protocol's rules."""
    if not isinstance(messages, list) or not messages:
        raise BadField("messages", "must be a non-empty list of messages")
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadField(at, "must be a map")
        role = m.get("role")
        if role not in ROLES:
            raise BadField(f"{at}.role", f"must be one of {', '.join(ROLES)}, got {role!r}"[:200])
        calls = m.get("tool_calls")
        content = m.get("content")
        if not isinstance(content, str) and not (role == "assistant" and calls and
                                                 content is None):
            raise BadField(f"{at}.content", "must be a string")
        if calls is not None:
            _check_calls(at, role, calls)
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise BadField(f"{at}.tool_call_id", "a tool message needs the tool_call_id it "
                           "answers")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise BadField(f"{at}.name", "must be a string")


def _check_calls(at, role, calls):
    if role != "assistant" or not isinstance(calls, list):
        raise BadField(f"{at}.tool_calls", "only an assistant message has tool_calls, a list")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(
                fn.get("arguments"), (str, dict)) or call.get("type", "function") != "function":
            raise BadField(f"{at}.tool_calls[{j}]", "must be {id, type: function, function: "
                           "{name, arguments}}")


def check_tools(tools):
    """Raise BadField unless tools is a list of {type: function, function: {name, ...}}."""
    if not isinstance(tools, list):
        raise BadField("tools", "must be a list")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" if isinstance(tool, dict) else True:
            raise BadField(f"tools[{i}].type", "must be \"function\"")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadField(f"tools[{i}].function.name", "must be a non-empty string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadField(f"tools[{i}].function.parameters", "must be a JSON schema object")


def check_tool_choice(tool_choice, tools):
    """tool_choice normalized: "none", "auto", "required" or {type: function, function:
    {name}} naming one of tools; BadField otherwise."""
    names = [t["function"]["name"] for t in tools or []]
    if tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not names:
            raise BadField("tool_choice", "\"required\" needs tools")
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name is None or name not in names:
        raise BadField("tool_choice", "must be none, auto, required or {\"type\": "
                       "\"function\", \"function\": {\"name\": one of the tools}}")
    return {"type": "function", "function": {"name": name}}

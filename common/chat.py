"""Chat messages and templates, pure: no llama.cpp here (the broker imports it to check a CHAT).

Templates are jinja, rendered as transformers' ``apply_chat_template`` renders them: a
sandboxed environment (``ImmutableSandboxedEnvironment``, where an unsafe attribute fails at
once; trim_blocks, lstrip_blocks, the
``loopcontrols`` extension and a ``{% generation %}`` tag that just renders its body), the
variables ``messages``, ``tools``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, the
globals ``raise_exception`` and ``strftime_now``, and a ``tojson`` filter that keeps non-ASCII
(``ensure_ascii=False``; ``indent``, ``separators``, ``sort_keys`` as json.dumps takes them).
Each distinct template text is compiled once.

Messages go to the template as ``normalize_messages`` shapes them: plain maps of role,
content (a string, "" for an assistant message that only calls tools), name, tool_call_id and
tool_calls, whose ``function.arguments`` is an object when the JSON string parses (the
convention of Hugging Face templates, which apply ``tojson`` to it).

Tools. A template that uses the ``tools`` variable renders them itself (the built-in
``chatml`` does, as Qwen 2.5 and Hermes 2 Pro templates do). For one that does not,
``with_tools_prompt`` puts this system prompt (Hermes' format) after the text of the first
system message, or adds it as the first message::

    # Tools

    You may call one or more functions to assist with the user query.

    You are provided with function signatures within <tools></tools> XML tags:
    <tools>
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}}
    </tools>                                          (one JSON object per line, per tool)

    For each function call, return a json object with function name and arguments within
    <tool_call></tool_call> XML tags:
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

``parse_tool_calls`` reads ``<tool_call>{...}</tool_call>`` blocks back into OpenAI's shape.
That Hermes/ChatML block is the one tool-call format parsed today.
"""
import datetime
import functools
import json
import re
import uuid

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')

# ChatML with Hermes tools, as Qwen 2.5 renders them (its default system text left out): the
# tools in the system turn, an assistant's calls as <tool_call> blocks, and consecutive tool
# results as <tool_response> blocks of one user turn.
CHATML = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and ' }}
{{- 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message['role'] == 'system' and loop.first %}
{%- elif message['role'] == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}
{{- '<|im_start|>user' }}
{%- endif %}
{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}
{{- '<|im_start|>assistant' }}
{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}
{%- for call in message['tool_calls'] %}
{%- set fn = call['function'] if call['function'] is defined else call %}
{{- '\\n<tool_call>\\n{"name": "' + fn['name'] + '", "arguments": ' }}
{%- if fn['arguments'] is string %}{{- fn['arguments'] }}
{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

BUILTIN_TEMPLATES = {"chatml": CHATML}


class TemplateError(Exception):
    """Rendering failed: a jinja error, the sandbox refused, or the template's raise_exception."""


class BadField(ValueError):
    """A request field that is not what the protocol asks for; .field names it."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


class _Generation(Extension):
    """transformers' {% generation %}...{% endgeneration %} (assistant masks): its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, except that touching an unsafe attribute fails at once (jinja's default
    gives an undefined that only fails when used, so ``{{ ''.__class__ }}`` printed "")."""

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of "
                            f"{type(obj).__name__!r} object is unsafe.")


def _raise(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=None)
def _env():
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=[_Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=64)
def _compiled(template):
    if not isinstance(template, str):
        raise TemplateError(f"a chat template is text, not {type(template).__name__}")
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
    """Whether the template reads the `tools` variable (so it renders the tools itself)."""
    try:
        return "tools" in meta.find_undeclared_variables(_env().parse(template))
    except (jinja2.TemplateError, TypeError):
        return False


def with_tools_prompt(messages, tools):
    """messages with the documented tools system prompt merged into the first system message
    (or added as one), for templates that do not use `tools`."""
    prompt = TOOLS_PROMPT.format(tools="\n".join(_tojson(t) for t in tools))
    if messages and messages[0].get("role") == "system":
        head = messages[0].get("content") or ""
        first = dict(messages[0], content=f"{head}\n\n{prompt}" if head else prompt)
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def normalize_messages(messages):
    """Checked messages as templates expect them: new plain maps, content a string, tool-call
    arguments an object when their JSON parses."""
    out = []
    for m in messages:
        n = {"role": m["role"], "content": m.get("content") or ""}
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                n[key] = m[key]
        if m.get("tool_calls"):
            n["tool_calls"] = [_normal_call(c) for c in m["tool_calls"]]
        out.append(n)
    return out


def calls_as_text(messages):
    """For templates that know no tool calls: each assistant message's tool_calls written
    into its content in the Hermes format the tools prompt asks for, so the model sees what
    it called (tool results stay messages of role tool)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if not calls:
            out.append(m)
            continue
        blocks = [json.dumps({"name": c["function"]["name"],
                              "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                  for c in calls]
        text = "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
        content = m.get("content") or ""
        out.append({k: v for k, v in m.items() if k != "tool_calls"} |
                   {"content": f"{content}\n{text}" if content else text})
    return out


def _normal_call(call):
    fn = call["function"]
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        args = parsed if isinstance(parsed, dict) else args
    return {"id": call.get("id"), "type": "function",
            "function": {"name": fn["name"], "arguments": args}}


# A block runs to its </tool_call>, to the next <tool_call> (it was never closed), or to the end.
_TOOL_CALL = re.compile(r"<tool_call>((?:(?!<tool_call>).)*?)(?:</tool_call>|(?=<tool_call>)|\Z)",
                        re.S)


def _call(body):
    data = json.loads(body, strict=False)      # raw control characters in strings are kept
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        raise ValueError("not a call")
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):
        args = json.loads(args, strict=False)
    if not isinstance(args, dict):
        raise ValueError("arguments are not an object")
    return {"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
            "function": {"name": data["name"], "arguments": json.dumps(args,
                                                                      ensure_ascii=False)}}


def parse_tool_calls(text):
    """(content outside the tool-call blocks, [OpenAI-shaped calls]) from a reply's text; the
    text unchanged and no calls when no block parses."""
    calls, kept, last = [], [], 0
    for match in _TOOL_CALL.finditer(text):
        try:
            calls.append(_call(match.group(1).strip()))
        except ValueError:
            continue                        # not a call: it stays in the content
        kept.append(text[last:match.start()])
        last = match.end()
    kept.append(text[last:])
    return ("".join(kept).strip(), calls) if calls else (text, [])


class StopScanner:
    """Holds back text that could be the start of a stop string; ends the text at the first
    stop string to complete, however the text is split into feeds."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def feed(self, text):
        """(text safe to emit now, whether a stop string was found)."""
        if self.stopped:
            return "", True
        self.held += text
        hits = [(i + len(s), i) for s in self.stops for i in [self.held.find(s)] if i >= 0]
        if hits:        # the stop that completes first (as when fed one character at a time)
            out, self.held, self.stopped = self.held[:min(hits)[1]], "", True
            return out, True
        keep = max((self._partial(s) for s in self.stops), default=0)
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def _partial(self, stop):
        """The longest end of the held text that is a proper prefix of stop."""
        for n in range(min(len(stop) - 1, len(self.held)), 0, -1):
            if self.held.endswith(stop[:n]):
                return n
        return 0

    def flush(self):
        """What was held back, at the end (empty once a stop string was found)."""
        out, self.held = self.held, ""
        return "" if self.stopped else out


def check_messages(messages):
    """Raise BadField for the first message that breaks the protocol's rules."""
    if not isinstance(messages, list) or not messages:
        raise BadField("messages", "must be a non-empty list of messages")
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadField(at, "must be a map with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise BadField(f"{at}.role", f"must be one of {', '.join(ROLES)}, got "
                           f"{str(role)[:40]!r}")
        calls = m.get("tool_calls")
        if calls is not None:
            _check_calls(at, role, calls)
        content = m.get("content")
        if not isinstance(content, str) and not (calls and content is None):
            raise BadField(f"{at}.content", "must be a string (null only for an assistant "
                           "message with tool_calls)")
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise BadField(f"{at}.tool_call_id", "a tool message needs the tool_call_id (a "
                           "string) it answers")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise BadField(f"{at}.name", "must be a string")


def _check_calls(at, role, calls):
    if role != "assistant" or not isinstance(calls, list):
        raise BadField(f"{at}.tool_calls", "only an assistant message has tool_calls, a list")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str) or \
                call.get("type", "function") != "function" or \
                not isinstance(fn.get("name"), str) or not fn["name"] or \
                not isinstance(fn.get("arguments"), (str, dict)):
            raise BadField(f"{at}.tool_calls[{j}]", "must be {id, type: function, function: "
                           "{name, arguments (a JSON string)}}")


def check_tools(tools):
    """Raise BadField unless tools is a list of {type: function, function: {name,
    description?, parameters?}} with distinct names."""
    if not isinstance(tools, list):
        raise BadField("tools", "must be a list of {type: function, function: {...}}")
    seen = set()
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise BadField(f"{at}.type", "must be \"function\"")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise BadField(f"{at}.function", "must be a map with name, description, parameters")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise BadField(f"{at}.function.name", "must be 1 to 64 of A-Z a-z 0-9 _ . -")
        if name in seen:
            raise BadField(f"{at}.function.name", f"{name!r} names two tools")
        seen.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise BadField(f"{at}.function.description", "must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise BadField(f"{at}.function.parameters", "must be a JSON schema object")


def check_tool_choice(tool_choice, tools):
    """tool_choice normalized: "none", "auto", "required" or {type: function, function:
    {name}} naming one of tools; BadField("tool_choice") otherwise."""
    names = [t["function"]["name"] for t in tools or []
             if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if isinstance(tool_choice, str) and tool_choice in ("none", "auto", "required"):
        if tool_choice == "required" and not names:
            raise BadField("tool_choice", "\"required\" needs tools")
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if _type_ok(tool_choice) and isinstance(name, str) and name in names:
        return {"type": "function", "function": {"name": name}}
    raise BadField("tool_choice", "must be none, auto, required or {\"type\": \"function\", "
                   "\"function\": {\"name\": one of the tools}}")


def _type_ok(tool_choice):
    """Whether a named tool_choice's type is "function" (or left out)."""
    return isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function"

"""GBNF grammars for structured output and tool calls, compiled by llama.cpp before any decode.

JSON schemas go through llama-cpp-python's own converter (``llama_cpp.llama_grammar``, the
rules of llama.cpp's json-schema-to-grammar). A tool call is constrained to one Hermes block::

    <tool_call>
    {"name": "<one of the tools>", "arguments": <that tool's parameters schema>}
    </tool_call>

(the newlines optional), lazily from ``TOOL_CALL_TRIGGER`` on when the model may also answer
in prose (tool_choice "auto"). ``compile_check`` builds the sampler once, so a grammar that
llama.cpp refuses is a GrammarError naming the request field before anything is decoded.
"""
import llama_cpp  # noqa: I001  -- before numpy (CUDA load order), as everywhere in the worker

import json
import re

from llama_cpp import llama_grammar

TOOL_CALL_TRIGGER = "<tool_call>"

# llama_grammar.JSON_GBNF is a JSON value grammar (its root happens to be an object in 0.3.36);
# this one says so itself: the same rules, the root an object.
JSON_OBJECT_GBNF = re.sub(r"^root\s*::=.*$", "root   ::= object", llama_grammar.JSON_GBNF,
                          count=1, flags=re.M)
_CALL_RULE = "lmx-tool-call"
# The converter's string characters admit raw control characters, which json.loads refuses;
# llama.cpp's own converter excludes them, and so does this rule.
_LOOSE_CHAR = re.compile(r'^char ::= \[\^"\\\\\]', re.M)
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F]'


class GrammarError(ValueError):
    """A grammar or schema llama.cpp cannot use; .field names the request field."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


def json_schema_gbnf(schema, field="response_format.json_schema"):
    """GBNF for a JSON schema; GrammarError naming field if the converter refuses it."""
    if not isinstance(schema, dict):
        raise GrammarError(field, "the JSON schema must be an object")
    try:
        gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises AssertionError, ValueError, KeyError, ...
        detail = str(exc) or type(exc).__name__
        raise GrammarError(field, f"the JSON schema cannot be compiled: {detail}"[:400]) \
            from None
    return _LOOSE_CHAR.sub(lambda _: _STRICT_CHAR, gbnf, count=1)


def response_format_gbnf(response_format):
    """The grammar a response_format asks for: None for text, else GBNF text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError("response_format", "must be {type: text|json_object|json_schema}")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")      # llama-server's extension
        return JSON_OBJECT_GBNF if schema is None else json_schema_gbnf(
            schema, "response_format.schema")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if isinstance(spec, dict) and "schema" in spec:
            return json_schema_gbnf(spec["schema"], "response_format.json_schema")
        if "schema" in response_format:             # bare {"type": ..., "schema": {...}}
            return json_schema_gbnf(response_format["schema"], "response_format.schema")
        raise GrammarError("response_format.json_schema", "needs {\"name\": ..., \"schema\": "
                           "{a JSON schema object}}")
    raise GrammarError("response_format", f"unknown type {str(kind)[:40]!r} (text, "
                       "json_object or json_schema)")


def tool_call_gbnf(tools, name=None):
    """GBNF for one <tool_call> naming one of tools (or only `name`) with arguments that
    follow that tool's parameters schema."""
    chosen = [t["function"] for t in tools or [] if name is None or t["function"]["name"] == name]
    if not chosen:
        field = "tool_choice" if name is not None else "tools"
        raise GrammarError(field, f"no tool named {name!r}" if name else "no tools")
    schema = {"oneOf": [{
        "type": "object",
        "properties": {"name": {"const": fn["name"]},
                       "arguments": fn.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for fn in chosen]}
    body = json_schema_gbnf(schema, field="tools")
    body = re.sub(r"^root\s*::=", f"{_CALL_RULE} ::=", body, count=1, flags=re.M)
    return (f'root ::= "{TOOL_CALL_TRIGGER}" "\\n"? {_CALL_RULE} "\\n"? "</tool_call>"\n'
            + body)


def compile_check(vocab, gbnf, field):
    """Build the grammar sampler once and free it; GrammarError(field) when llama.cpp refuses
    (it logs the parse error and returns NULL)."""
    if not isinstance(gbnf, str) or not gbnf.strip():
        raise GrammarError(field, "the grammar is empty")
    try:
        text = gbnf.encode("utf-8")
    except UnicodeEncodeError:
        raise GrammarError(field, "the grammar is not valid UTF-8 text") from None
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, text, b"root")
    if not sampler:
        raise GrammarError(field, "the grammar does not compile (GBNF syntax, or no rule "
                           "named root); llama.cpp's log has the parse error")
    llama_cpp.llama_sampler_free(sampler)

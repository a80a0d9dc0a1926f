"""GBNF grammars for structured output and tool calls, compiled by llama.cpp before any decode.

JSON schemas go through llama-cpp-python's own converter (llama_cpp.llama_grammar, the same
rules as llama.cpp's json-schema-to-grammar); a tool call is constrained to
``<tool_call>{"name": <one of the tools>, "arguments": <its parameters' schema>}</tool_call>``,
lazily (from the trigger on) when the model may also answer in prose.
"""
import llama_cpp  # noqa: I001  -- before numpy (CUDA load order), as everywhere in the worker

import ctypes
import json
import re

from llama_cpp import llama_grammar

JSON_OBJECT_GBNF = llama_grammar.JSON_GBNF        # its root is an object
TOOL_CALL_TRIGGER = "<tool_call>"


class GrammarError(ValueError):
    """A grammar or schema llama.cpp cannot use; .field names the request field."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


def json_schema_gbnf(schema, field="response_format.json_schema"):
    """GBNF for a JSON schema; GrammarError naming field if the converter refuses it."""
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises several unrelated types
        raise GrammarError(field, f"the JSON schema cannot be compiled: {exc}") from None


def response_format_gbnf(response_format):
    """The grammar a response_format asks for (None for text)."""
    if not response_format or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return JSON_OBJECT_GBNF
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", spec) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise GrammarError("response_format.json_schema", "needs a schema object")
        return json_schema_gbnf(schema)
    raise GrammarError("response_format.type", f"unknown type {kind!r}")


def tool_call_gbnf(tools, name=None):
    """GBNF for one <tool_call> naming one of tools (or `name`) with arguments that follow
    that tool's parameters schema."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise GrammarError("tool_choice", f"no tool named {name!r}")
    schema = {"oneOf": [{
        "type": "object", "properties": {
            "name": {"const": fn["name"]},
            "arguments": fn.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"]} for fn in chosen]}
    body = json_schema_gbnf(schema, field="tools")
    body = re.sub(r"^root\s*::=", "call ::=", body, count=1, flags=re.M)
    return 'root ::= "<tool_call>" "\\n"? call "\\n"? "</tool_call>"\n' + body


def compile_check(vocab, gbnf, field):
    """Build the grammar sampler once (llama.cpp logs a parse error and returns NULL)."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not sampler:
        raise GrammarError(field, "the grammar does not parse (GBNF)")
    llama_cpp.llama_sampler_free(sampler)


def grammar_sampler(vocab, gbnf, lazy_trigger=None):
    """A grammar sampler; with lazy_trigger, it constrains only from that text on."""
    if lazy_trigger is None:
        return llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    patterns = (ctypes.c_char_p * 1)(re.escape(lazy_trigger).encode())
    return llama_cpp.llama_sampler_init_grammar_lazy_patterns(
        vocab, gbnf.encode(), b"root", patterns, 1, None, 0)

"""common/chat.py and worker/grammar.py as units: templates, tools, stops, checks, grammars."""
import json

import gguf
import pytest

from lmx.common import chat

CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}]


def smol_template(path):
    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


def test_the_models_own_template_renders_chatml(smol_path):
    template = smol_template(smol_path)
    text = chat.render(template, CONVO, add_generation_prompt=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello!<|im_end|>\n")
    assert chat.render(template, CONVO).endswith("<|im_start|>assistant\n")
    default = chat.render(template, CONVO[1:2])         # the template's own system message
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert not chat.template_uses_tools(template)


def test_the_builtin_chatml_renders_tools_calls_and_results():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    msgs = CONVO[:2] + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "1", "content": "42"}]
    text = chat.render(chat.resolve_template("chatml"), msgs, tools=tools)
    assert "<tools>\n" + json.dumps(tools[0]) + "\n</tools>" in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>' \
        in text
    assert "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>" in text
    assert chat.template_uses_tools(chat.BUILTIN_TEMPLATES["chatml"])


def test_a_template_that_raises_or_escapes_the_sandbox_is_a_template_error():
    with pytest.raises(chat.TemplateError, match="no tools here"):
        chat.render("{{ raise_exception('no tools here') }}", CONVO)
    with pytest.raises(chat.TemplateError, match="unsafe"):
        chat.render("{{ ''.__class__.__mro__ }}", CONVO)
    with pytest.raises(chat.TemplateError):
        chat.render("{% for %}", CONVO)


def test_tools_prompt_for_templates_without_tools():
    tools = [{"type": "function", "function": {"name": "f"}}]
    merged = chat.with_tools_prompt(CONVO, tools)
    assert merged[0]["content"].startswith("Be brief.\n\n# Tools") and len(merged) == 3
    added = chat.with_tools_prompt(CONVO[1:], tools)
    assert added[0]["role"] == "system" and json.dumps(tools[0]) in added[0]["content"]


def test_tool_calls_are_parsed_and_garbage_stays_content():
    content, calls = chat.parse_tool_calls(
        'Sure. <tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>'
        '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>')
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["a", "b"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"x": 1}, {"y": 2}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert chat.parse_tool_calls("<tool_call>not json</tool_call>") == (
        "<tool_call>not json</tool_call>", [])
    _, calls = chat.parse_tool_calls('<tool_call>{"name": "c", "arguments": {}}')  # unterminated
    assert calls[0]["function"]["name"] == "c"


def test_stop_scanner_holds_partial_stops_and_finds_the_earliest():
    s = chat.StopScanner(["four", "END"])
    assert s.feed("one two fo") == ("one two ", False)     # "fo" might start "four"
    assert s.feed("rmer") == ("former", False)            # it was not "four" after all
    assert s.feed(" E") == (" ", False) and s.flush() == "E"
    s = chat.StopScanner(["b", "abc"])
    assert s.feed("xab") == ("xa", True)                  # the earliest full match wins
    assert s.feed("more") == ("", True)


@pytest.mark.parametrize("messages,field", [
    ([], "messages"),
    ([{"role": "bot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": ["x"]}], "messages[0].content"),
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 1}}]}],
     "messages[0].tool_calls[0]"),
])
def test_bad_messages_name_the_field(messages, field):
    with pytest.raises(chat.BadField) as info:
        chat.check_messages(messages)
    assert info.value.field == field


def test_tool_choice_and_tools_are_checked():
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert chat.check_tool_choice({"type": "function", "function": {"name": "f"}}, tools) == {
        "type": "function", "function": {"name": "f"}}
    for bad in ("required", {"function": {"name": "g"}}, "sometimes"):
        with pytest.raises(chat.BadField):
            chat.check_tool_choice(bad, tools if bad != "required" else [])
    with pytest.raises(chat.BadField) as info:
        chat.check_tools([{"type": "function", "function": {}}])
    assert info.value.field == "tools[0].function.name"


def test_grammars_compile_against_the_real_vocab_and_bad_ones_name_the_field(smol_path):
    import llama_cpp
    from lmx.worker import grammar
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(smol_path.encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    try:
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
        grammar.compile_check(vocab, grammar.response_format_gbnf(
            {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}), "rf")
        tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
        grammar.compile_check(vocab, grammar.tool_call_gbnf(tools), "tools")
        assert grammar.response_format_gbnf({"type": "text"}) is None
        with pytest.raises(grammar.GrammarError) as info:
            grammar.compile_check(vocab, "root ::= (((", "grammar")
        assert info.value.field == "grammar"
        with pytest.raises(grammar.GrammarError) as info:
            grammar.response_format_gbnf({"type": "json_schema",
                                          "json_schema": {"schema": {"type": "bogus"}}})
        assert info.value.field == "response_format.json_schema"
    finally:
        llama_cpp.llama_model_free(model)


def test_tool_calls_become_text_for_templates_without_tools():
    msgs = chat.normalize_messages([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "w", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}])
    out = chat.calls_as_text(msgs)
    assert out[1] == {"role": "assistant", "content":
                      '<tool_call>\n{"name": "w", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert out[0] == msgs[0] and out[2] == msgs[2]

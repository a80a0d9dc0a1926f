"""common/chat.py and worker/grammar.py: the model's own template, the built-in chatml with
tools, the sandbox, tool-call parsing, the stop scanner (hypothesis: any chunking gives the
same text), message/tool checks, and grammars run token by token against SmolLM2's vocab."""
import llama_cpp  # noqa: F401,I001  -- before numpy, as in the worker

import ctypes
import json
import math
import re

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmx.common import chat
from lmx.worker import grammar

SMOL_TEMPLATE = (         # its string literals hold real newlines
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVO = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "4."}]
CONVO_TEXT = ("<|im_start|>system\nYou are terse.<|im_end|>\n"
              "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
              "<|im_start|>assistant\n4.<|im_end|>\n")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now"}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_smollm2_template_renders_chatml_with_and_without_generation_prompt(smol_path):
    field = gguf.GGUFReader(smol_path).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    assert template == SMOL_TEMPLATE
    assert chat.render(template, CONVO, add_generation_prompt=False) == CONVO_TEXT
    assert chat.render(template, CONVO) == CONVO_TEXT + "<|im_start|>assistant\n"
    own = chat.render(template, CONVO[1:2])
    assert own == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                   "by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                   "<|im_start|>assistant\n")


def vocab_only(path):
    """The model's vocabulary and metadata only, as llama.cpp loads them."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    assert model
    return model


def llama_template(path):
    """The template as llama.cpp reads it (quicker than GGUFReader on Gemma's big vocab)."""
    model = vocab_only(path)
    try:
        buf = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_model_meta_val_str(model, b"tokenizer.chat_template", buf, len(buf))
        return None if n < 0 else buf.value.decode()
    finally:
        llama_cpp.llama_model_free(model)


def test_gemma_has_no_template_and_llama_cpp_reads_smollm2s_alike(smol_path, gemma_path):
    assert llama_template(gemma_path) is None
    assert llama_template(smol_path) == SMOL_TEMPLATE


def test_the_environment_is_transformers_one():
    assert chat.render("{{ bos_token }}{{ messages[0].content }}{{ eos_token }}", CONVO,
                       bos_token="<s>", eos_token="</s>") == "<s>You are terse.</s>"
    assert chat.render("{{ {'k': 'é'} | tojson }}", CONVO) == '{"k": "é"}'
    assert chat.render("{{ [1, 2] | tojson(indent=2) }}", CONVO) == "[\n  1,\n  2\n]"
    assert chat.render("{{ [1, 2] | tojson(separators=(',', ':')) }}", CONVO) == "[1,2]"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", chat.render("{{ strftime_now('%Y-%m-%d') }}", []))
    assert chat.render("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                       "{{ m.role }}{% endfor %}", CONVO) == "system"
    assert chat.render("a{% generation %}{{ messages[2].content }}{% endgeneration %}",
                       CONVO) == "a4."
    assert chat.render("  {% if true %}\nx{% endif %}", []) == "x"    # trim and lstrip blocks
    assert chat._compiled(SMOL_TEMPLATE) is chat._compiled(SMOL_TEMPLATE)     # compiled once


def test_raise_exception_and_jinja_errors_are_template_errors():
    with pytest.raises(chat.TemplateError, match="^Conversation roles must alternate$"):
        chat.render("{{ raise_exception('Conversation roles must alternate') }}", CONVO)
    with pytest.raises(chat.TemplateError, match="compile"):
        chat.render("{% if %}", CONVO)
    with pytest.raises(chat.TemplateError, match="TypeError"):
        chat.render(SMOL_TEMPLATE, [{"role": "user", "content": None}])
    with pytest.raises(chat.TemplateError):
        chat.render(None, CONVO)


def test_the_sandbox_refuses():
    for escape in ["{{ ''.__class__ }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}",
                   "{{ messages.__class__ }}", "{{ raise_exception.__globals__ }}",
                   "{% set x = messages.append(1) %}"]:        # immutable: no mutating methods
        with pytest.raises(chat.TemplateError, match="SecurityError"):
            chat.render(escape, [dict(m) for m in CONVO])


def test_builtin_chatml_renders_tools_calls_and_results():
    template = chat.resolve_template("chatml")
    assert template == chat.BUILTIN_TEMPLATES["chatml"]
    assert chat.resolve_template("{{ x }}") == "{{ x }}"
    messages = CONVO[:2] + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                            {"role": "tool", "tool_call_id": "call_2", "content": "windy"}]
    text = chat.render(template, chat.normalize_messages(messages), tools=[WEATHER, CLOCK])
    assert text.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n\n")
    assert ("<tools>\n" + json.dumps(WEATHER) + "\n" + json.dumps(CLOCK) + "\n</tools>") in text
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n' \
           '</tool_call><|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n' in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>\n') in text
    assert text.endswith("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n"
                         "<tool_response>\nwindy\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert chat.render(template, CONVO, add_generation_prompt=False) == CONVO_TEXT


def test_template_uses_tools():
    assert chat.template_uses_tools(chat.BUILTIN_TEMPLATES["chatml"])
    assert not chat.template_uses_tools(SMOL_TEMPLATE)
    assert chat.template_uses_tools("{% if tools is defined %}{{ tools | length }}{% endif %}")
    assert not chat.template_uses_tools("{% set tools = 1 %}{{ tools }}")    # its own variable
    assert not chat.template_uses_tools("{% if %}")


def test_with_tools_prompt_merges_or_adds_the_system_message():
    merged = chat.with_tools_prompt(CONVO, [WEATHER])
    assert len(merged) == 3 and merged[1:] == CONVO[1:]
    assert CONVO[0]["content"] == "You are terse."                  # not changed in place
    head, tools = merged[0]["content"].split("<tools>\n")
    assert head == "You are terse.\n\n# Tools\n\nYou may call one or more functions to assist " \
        "with the user query.\n\nYou are provided with function signatures within " \
        "<tools></tools> XML tags:\n"
    assert tools.startswith(json.dumps(WEATHER) + "\n</tools>")
    assert merged[0]["content"].endswith(
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    added = chat.with_tools_prompt(CONVO[1:], [WEATHER, CLOCK])
    assert added[0]["role"] == "system" and added[0]["content"].startswith("# Tools")
    assert added[1:] == CONVO[1:]
    assert json.dumps(CLOCK) in chat.render(SMOL_TEMPLATE, added)


def test_normalize_messages_shapes_them_for_templates():
    messages = [{"role": "user", "content": "hi", "extra": 1},
                {"role": "assistant", "content": None, "tool_calls": [
                    CALL, dict(CALL, function={"name": "now", "arguments": "not json"})]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny", "name": "w"}]
    out = chat.normalize_messages(messages)
    assert out[0] == {"role": "user", "content": "hi"}
    assert out[1]["content"] == "" and out[1]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Paris"}
    assert out[1]["tool_calls"][1]["function"]["arguments"] == "not json"
    assert out[2] == {"role": "tool", "content": "sunny", "name": "w", "tool_call_id": "call_1"}
    assert messages[1]["content"] is None and CALL["function"]["arguments"] == '{"city": "Paris"}'


def test_parse_one_call_and_two_with_prose_and_string_arguments():
    content, calls = chat.parse_tool_calls(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert content == "" and len(calls) == 1
    assert re.fullmatch(r"call_[0-9a-f]{12}", calls[0]["id"])
    assert calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    content, calls = chat.parse_tool_calls(
        'Let me check. <tool_call>{"name": "a", "arguments": {"x": "é"}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": "{\\"y\\": [1, 2]}"}</tool_call> Done.')
    assert content == "Let me check. \n Done."
    assert [c["function"]["name"] for c in calls] == ["a", "b"]
    assert calls[0]["function"]["arguments"] == '{"x": "é"}'
    assert json.loads(calls[1]["function"]["arguments"]) == {"y": [1, 2]}
    assert calls[0]["id"] != calls[1]["id"]


def test_unparsable_blocks_stay_unterminated_ones_parse_and_garbage_before_a_good_one():
    for text in ["<tool_call>not json</tool_call>", "no calls at all ",
                 '<tool_call>{"arguments": {}}</tool_call>',                 # no name
                 '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',   # not an object
                 '<tool_call>{"name": "a", "arguments": "{bad"}</tool_call>']:
        assert chat.parse_tool_calls(text) == (text, [])
    content, calls = chat.parse_tool_calls('ok <tool_call>\n{"name": "c", "arguments": {}}\n')
    assert content == "ok" and calls[0]["function"] == {"name": "c", "arguments": "{}"}
    content, calls = chat.parse_tool_calls(
        '<tool_call>oops <tool_call>{"name": "d", "parameters": {"n": 1}}</tool_call>')
    assert content == "<tool_call>oops" and calls[0]["function"]["arguments"] == '{"n": 1}'
    content, calls = chat.parse_tool_calls('<tool_call>{"name": "e", "arguments": {"n": 1')
    assert calls == [] and content.startswith("<tool_call>")


def test_stops_spanning_feeds_partial_prefixes_held_and_the_first_to_complete():
    s = chat.StopScanner(["\nObservation"])
    assert s.feed("Thought: go\nObs") == ("Thought: go", False)
    assert s.feed("erv") == ("", False)
    assert s.feed("ation: x") == ("", True)
    assert s.feed("more") == ("", True) and s.flush() == ""
    s = chat.StopScanner(["</answer>"])
    assert s.feed("a < b </ans") == ("a < b ", False)
    assert s.flush() == "</ans"
    s = chat.StopScanner(["</answer>"])
    assert s.feed("x </") == ("x ", False) and s.feed("p>") == ("</p>", False)
    s = chat.StopScanner(["END", "STOP", ""])
    assert s.feed("a STOP b END") == ("a ", True)
    s = chat.StopScanner(["abcd", "c"])
    assert s.feed("xabcd") == ("xab", True)       # "c" is complete before "abcd" could be
    assert chat.StopScanner([]).feed("anything") == ("anything", False)


STOPS = ["ab", "abc", "b\n", "\nObservation", "ccc"]


def reference_cut(text, stops):
    ends = [(i + len(s), i) for s in stops for i in [text.find(s)] if i >= 0]
    return text[:min(ends)[1]] if ends else text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abc\nObservation", max_size=40), st.lists(st.integers(0, 40),
                                                                     max_size=8))
def test_any_chunking_emits_the_same_text_and_never_a_stop_prefix(text, cuts):
    cuts = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    s, emitted, stopped = chat.StopScanner(STOPS), "", False
    for a, b in zip(cuts, cuts[1:]):
        out, stopped = s.feed(text[a:b])
        emitted += out
        if not stopped:     # no emitted text could still become the start of a stop
            rest = s.held
            assert not any(p.startswith(emitted[j:] + rest) or p in emitted[j:] + rest
                           for p in STOPS for j in range(len(emitted)))
    emitted += s.flush()
    assert emitted == reference_cut(text, STOPS)
    assert not any(p in emitted for p in STOPS)


ASSISTANT = {"role": "assistant", "content": None}
GOOD = CONVO + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny", "name": "w"}]


def test_good_messages_pass_and_messages_must_be_a_non_empty_list():
    chat.check_messages(GOOD)
    chat.check_messages([{"role": "assistant", "tool_calls": [CALL]}])   # content left out
    for messages in ([], None, {"role": "user", "content": "x"}):
        with pytest.raises(chat.BadField) as info:
            chat.check_messages(messages)
        assert info.value.field == "messages"


@pytest.mark.parametrize("message,field", [
    ("hello", "messages[0]"),
    ({"content": "x"}, "messages[0].role"),
    ({"role": "bot", "content": "x"}, "messages[0].role"),
    ({"role": "user", "content": 3}, "messages[0].content"),
    ({"role": "user", "content": [{"type": "text", "text": "x"}]}, "messages[0].content"),
    ({"role": "user"}, "messages[0].content"),
    ({"role": "assistant", "content": None}, "messages[0].content"),
    ({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
    ({"role": "tool", "content": "x", "tool_call_id": 7}, "messages[0].tool_call_id"),
    ({"role": "user", "content": "x", "name": 1}, "messages[0].name"),
    ({"role": "user", "content": "x", "tool_calls": [CALL]}, "messages[0].tool_calls"),
    (dict(ASSISTANT, tool_calls=CALL), "messages[0].tool_calls"),
    (dict(ASSISTANT, tool_calls=[dict(CALL, id=None)]), "messages[0].tool_calls[0]"),
    (dict(ASSISTANT, tool_calls=[dict(CALL, type="code")]), "messages[0].tool_calls[0]"),
    (dict(ASSISTANT, tool_calls=[dict(CALL, function={"name": "f"})]),
     "messages[0].tool_calls[0]"),
])
def test_each_bad_message_names_its_field(message, field):
    with pytest.raises(chat.BadField) as info:
        chat.check_messages([message])
    assert info.value.field == field and str(info.value)
    with pytest.raises(chat.BadField) as info:
        chat.check_messages(GOOD + [message])
    assert info.value.field == field.replace("messages[0]", f"messages[{len(GOOD)}]")


@pytest.mark.parametrize("tools,field", [
    ({"type": "function"}, "tools"),
    ([{"function": {"name": "f"}}], "tools[0].type"),
    ([WEATHER, {"type": "function"}], "tools[1].function"),
    ([{"type": "function", "function": {}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": 'a"b'}}], "tools[0].function.name"),
    ([WEATHER, WEATHER], "tools[1].function.name"),
    ([dict(CLOCK, function={"name": "f", "description": 1})], "tools[0].function.description"),
    ([dict(CLOCK, function={"name": "f", "parameters": "{}"})], "tools[0].function.parameters"),
])
def test_bad_tools_name_the_field(tools, field):
    with pytest.raises(chat.BadField) as info:
        chat.check_tools(tools)
    assert info.value.field == field


def test_tool_choice_is_normalized_or_refused():
    chat.check_tools([WEATHER, CLOCK])
    for mode in ("none", "auto", "required"):
        assert chat.check_tool_choice(mode, [WEATHER]) == mode
    assert chat.check_tool_choice("none", None) == "none"
    named = {"type": "function", "function": {"name": "now", "description": "ignored"}}
    assert chat.check_tool_choice(named, [WEATHER, CLOCK]) == {
        "type": "function", "function": {"name": "now"}}
    for bad, tools in [("required", []), ("always", [WEATHER]), (None, [WEATHER]),
                       ({"type": "function", "function": {"name": "now"}}, [WEATHER]),
                       ({"type": "code", "function": {"name": "now"}}, [CLOCK]),
                       ({"type": "function"}, [CLOCK])]:
        with pytest.raises(chat.BadField) as info:
            chat.check_tool_choice(bad, tools)
        assert info.value.field == "tool_choice"


@pytest.fixture(scope="module")
def vocab(smol_path):
    model = vocab_only(smol_path)
    yield llama_cpp.llama_model_get_vocab(model)
    llama_cpp.llama_model_free(model)


def grammar_accepts(vocab, gbnf, text):
    """Whether the grammar sampler lets SmolLM2 write exactly `text` and then end."""
    buf = (llama_cpp.llama_token * (len(text) + 8))()
    n = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, len(buf),
                                 False, False)
    assert n > 0
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    assert sampler
    size = llama_cpp.llama_vocab_n_tokens(vocab)
    fresh = (llama_cpp.llama_token_data * size)(*[(i, 0.0, 0.0) for i in range(size)])
    cand = (llama_cpp.llama_token_data * size)()
    try:
        for tok in list(buf[:n]) + [llama_cpp.llama_vocab_eos(vocab)]:
            ctypes.memmove(cand, fresh, ctypes.sizeof(fresh))
            arr = llama_cpp.llama_token_data_array(cand, size, -1, False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
            if math.isinf(cand[tok].logit):
                return False
            if tok != llama_cpp.llama_vocab_eos(vocab):
                llama_cpp.llama_sampler_accept(sampler, tok)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


def test_json_schema_grammar_compiles_and_holds(vocab):
    gbnf = grammar.json_schema_gbnf(SCHEMA)
    grammar.compile_check(vocab, gbnf, "response_format.json_schema")
    assert grammar_accepts(vocab, gbnf, '{"name": "Ada", "age": 36}')
    assert not grammar_accepts(vocab, gbnf, '{"name": "Ada"}')
    assert not grammar_accepts(vocab, gbnf, '{"name": "A\nda", "age": 3}')   # json.loads


def test_response_formats(vocab):
    assert grammar.response_format_gbnf(None) is None
    assert grammar.response_format_gbnf({"type": "text"}) is None
    gbnf = grammar.response_format_gbnf({"type": "json_object"})
    assert gbnf == grammar.JSON_OBJECT_GBNF
    assert re.search(r"^root\s*::= object$", gbnf, re.M)
    grammar.compile_check(vocab, gbnf, "response_format")
    assert grammar_accepts(vocab, gbnf, '{"a": [1, "x"]}')
    assert not grammar_accepts(vocab, gbnf, '[1]')
    openai = {"type": "json_schema", "json_schema": {"name": "p", "strict": True,
                                                     "schema": SCHEMA}}
    bare = {"type": "json_schema", "schema": SCHEMA}
    assert grammar.response_format_gbnf(openai) == grammar.response_format_gbnf(bare) == \
        grammar.json_schema_gbnf(SCHEMA)


@pytest.mark.parametrize("fmt,field", [
    ("json", "response_format"),
    ({"type": "yaml"}, "response_format"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "bogus"}}},
     "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/missing"}}},
     "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": "{}"}}, "response_format.json_schema"),
])
def test_bad_response_formats_name_the_field(fmt, field):
    with pytest.raises(grammar.GrammarError) as info:
        grammar.response_format_gbnf(fmt)
    assert info.value.field == field and str(info.value)


@pytest.mark.parametrize("gbnf", ["root ::= (((", 'root ::= "a" | missing-rule',
                                  'root ::= root "a"', 'other ::= "a"', ""])
def test_a_grammar_llama_cpp_refuses_is_a_grammar_error(vocab, gbnf):
    with pytest.raises(grammar.GrammarError) as info:
        grammar.compile_check(vocab, gbnf, "grammar")
    assert info.value.field == "grammar"


def test_tool_call_grammar_compiles_and_holds(vocab):
    assert grammar.TOOL_CALL_TRIGGER == "<tool_call>"
    gbnf = grammar.tool_call_gbnf([WEATHER, CLOCK])
    grammar.compile_check(vocab, gbnf, "tools")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert grammar_accepts(vocab, gbnf, call)
    assert grammar_accepts(vocab, gbnf, call.replace("\n", ""))
    assert grammar_accepts(vocab, gbnf, '<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    assert not grammar_accepts(vocab, gbnf, call.replace("get_weather", "get_wether"))
    assert not grammar_accepts(vocab, gbnf, call.replace('"city"', '"town"'))
    assert not grammar_accepts(vocab, gbnf, "Sure! " + call)
    only = grammar.tool_call_gbnf([WEATHER, CLOCK], name="now")
    grammar.compile_check(vocab, only, "tool_choice")
    assert not grammar_accepts(vocab, only, call)
    assert grammar_accepts(vocab, only, '<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    _, calls = chat.parse_tool_calls(call)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    with pytest.raises(grammar.GrammarError) as info:
        grammar.tool_call_gbnf([WEATHER], name="nope")
    assert info.value.field == "tool_choice"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}
    with pytest.raises(grammar.GrammarError) as info:
        grammar.tool_call_gbnf([bad])
    assert info.value.field == "tools"

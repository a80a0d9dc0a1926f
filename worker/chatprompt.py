"""A CHAT's prompt and grammar, before anything is decoded: the template, the rendered and
tokenized messages (truncated in the middle when asked), and the grammar its chain enforces.

Every failure here is an error reply with nothing decoded: NO_CHAT_TEMPLATE, BAD_REQUEST naming
the field (a template that raises, a schema or grammar that does not compile), LIMIT or
CONTEXT_FULL.
"""
import llama_cpp  # noqa: F401,I001  -- before numpy in every worker module (see engine.py)

from typing import NamedTuple, Optional

from lmx.common import chat
from lmx.common.errors import Code, LmxError, Reason
from lmx.worker import grammar as gram


class Prompt(NamedTuple):
    """The tokens to evaluate, what truncation dropped, and the grammar (gbnf, trigger,
    field) or None."""

    tokens: list
    truncated: int
    grammar: Optional[tuple]
    tools_on: bool


def bad(err, default):
    """A BAD_REQUEST for a TemplateError, BadField or GrammarError (its field, else default)."""
    field = getattr(err, "field", None) or default
    return LmxError(Code.BAD_REQUEST, f"{field}: {err}", Reason.BAD_VALUE, field=field)


def build(model, slot, job):
    """Check, render, tokenize and (when asked) truncate a CHAT's prompt; pick and compile its
    grammar. A Prompt, or the error reply."""
    template = _template(model, job)
    tools_on = bool(job.tools) and job.tool_choice != "none"
    # as templates expect them: content a string (OpenAI clients send null beside
    # tool_calls), arguments objects
    messages, tools = chat.normalize_messages(job.messages), None
    try:
        if chat.template_uses_tools(template):
            tools = job.tools if tools_on else None
        else:
            messages = chat.calls_as_text(messages)
            if tools_on:
                messages = chat.with_tools_prompt(messages, job.tools)
    except (chat.TemplateError, chat.BadField) as err:
        raise bad(err, "tools") from None
    grammar = _grammar(model, job, tools_on)
    tokens, truncated = _fit(model, slot, job, template, messages, tools)
    return Prompt(tokens, truncated, grammar, tools_on)


def _template(model, job):
    if job.template is not None:
        try:
            return chat.resolve_template(job.template)
        except (chat.TemplateError, chat.BadField) as err:
            raise bad(err, "template") from None
    if not model.chat_template:
        raise LmxError(Code.NO_CHAT_TEMPLATE, f"{model.path} has no chat template "
                       "(tokenizer.chat_template) and none was configured for it",
                       path=model.path)
    return model.chat_template


def tokens_of(model, template, messages, tools):
    """Render the messages and tokenize them, special-token text parsed; BOS added only when
    the vocab wants one and the template did not write it already."""
    try:
        text = chat.render(template, messages, tools=tools, add_generation_prompt=True,
                           bos_token=model.bos_text, eos_token=model.eos_text)
    except (chat.TemplateError, chat.BadField) as err:
        raise bad(err, "messages") from None
    add_bos = model.add_bos and not (model.bos_text and text.startswith(model.bos_text))
    return model.tokenize(text, add_bos, special=True)


def _fit(model, slot, job, template, messages, tools):
    """The prompt's tokens and how many truncation dropped; LIMIT or CONTEXT_FULL when it
    does not fit (after dropping the oldest turns, with truncate "middle")."""
    limit = job.max_prompt_tokens or None
    budget = slot.n_ctx - job.max_tokens
    if limit:
        budget = min(budget, limit)
    tokens = tokens_of(model, template, messages, tools)
    full = len(tokens)
    if job.truncate == "middle":
        while len(tokens) > budget:
            messages = drop_oldest(messages)
            if messages is None:
                break
            tokens = tokens_of(model, template, messages, tools)
    if limit and len(tokens) > limit:
        raise LmxError(Code.LIMIT, f"prompt has {len(tokens)} tokens, the limit is {limit}",
                       Reason.PROMPT_TOKENS, prompt_tokens=len(tokens), limit=limit)
    if len(tokens) + job.max_tokens > slot.n_ctx:
        raise LmxError(Code.CONTEXT_FULL, f"prompt {len(tokens)} tokens + max_tokens "
                       f"{job.max_tokens} > n_ctx {slot.n_ctx}", n_ctx=slot.n_ctx,
                       prompt_tokens=len(tokens), max_tokens=job.max_tokens)
    return tokens, full - len(tokens)


def drop_oldest(messages):
    """The messages without their oldest turn (every system message and the last message
    stay); an assistant's tool calls go with the tool answers that follow them, and the kept
    part starts at a user message when it can (templates that insist on alternation). None
    when nothing more can go."""
    out = _drop_one(messages)
    if out is None:
        return None
    while True:
        first = next((i for i, m in enumerate(out[:-1]) if _role(m) != "system"), None)
        if first is None or _role(out[first]) == "user":
            return out
        out = _drop_one(out)


def _drop_one(messages):
    last = len(messages) - 1
    first = next((i for i, m in enumerate(messages[:last]) if _role(m) != "system"), None)
    if first is None:
        return None
    end = first + 1
    if _role(messages[first]) == "assistant" and messages[first].get("tool_calls"):
        while end < last and _role(messages[end]) == "tool":
            end += 1
    return messages[:first] + messages[end:]


def _role(message):
    return message.get("role") if isinstance(message, dict) else None


def _grammar(model, job, tools_on):
    """(gbnf, trigger or None, field) for the chain, compiled once here; or None."""
    field, found = "grammar", None
    try:
        if job.grammar:
            found = (job.grammar, None, field)
        else:
            field = "response_format"
            gbnf = gram.response_format_gbnf(job.response_format)
            found = (gbnf, None, field) if gbnf else None
        if found is None and tools_on:
            choice = job.tool_choice
            field = "tool_choice" if isinstance(choice, dict) else "tools"
            if isinstance(choice, dict):
                name = (choice.get("function") or {}).get("name")
                found = (gram.tool_call_gbnf(job.tools, name), None, field)
            elif choice == "required":
                found = (gram.tool_call_gbnf(job.tools), None, field)
            else:       # "auto": free text until the model opens a tool call
                found = (gram.tool_call_gbnf(job.tools), gram.TOOL_CALL_TRIGGER, field)
        if found is not None:
            gram.compile_check(model.vocab, found[0], found[2])
    except (gram.GrammarError, chat.BadField) as err:
        raise bad(err, field) from None
    return found

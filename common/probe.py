"""`lmx-probe`: send any verb to a broker from the shell.

Readable output by default, one JSON object per reply with --json. Exit status: 0 for an ok
reply, 1 for an error reply, 3 when no reply came within --timeout (2 is click's usage error).
"""
import json
import sys

import click

from lmx.common.client import Client, LmxTimeout
from lmx.common.config import DEFAULT_ENDPOINT

# DECODE's fields in the order a person reads them; the text comes last.
DECODE_ORDER = ("agent", "prompt_tokens", "generated_tokens", "stopped_on_eos", "stopped_by",
                "elapsed_ms", "kv_swap_evicted", "kv_swap_parked", "kv_swap_restored")
CHAT_ORDER = ("agent", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
              "elapsed_ms", "tool_calls")
ORDER = {"DECODE": DECODE_ORDER, "CHAT": CHAT_ORDER}
HIDDEN = {"v", "id", "tokens", "context_measured", "buffers"}  # in --json only


def _fmt(value):
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _lines(reply, indent=""):
    """Flatten a reply into 'key: value' lines, nesting maps and lists by indentation."""
    for key, value in reply.items():
        if key in HIDDEN:
            continue
        if isinstance(value, dict) and value:
            yield f"{indent}{key}:"
            yield from _lines(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            yield f"{indent}{key}:"
            for item in value:
                yield f"{indent}  -"
                yield from _lines(item, indent + "    ")
        else:
            yield f"{indent}{key}: {_fmt(value)}"


def _ordered(verb, reply):
    if verb not in ORDER or reply.get("status") != "ok":
        return reply
    last = "text" if verb == "DECODE" else "content"
    first = {k: reply[k] for k in ("status", *ORDER[verb]) if k in reply}
    rest = {k: v for k, v in reply.items() if k not in first and k != last}
    return {**first, **rest, last: reply.get(last, "")}


def _curve(client_key, server_key):
    """(public, secret, server public) from zmq.auth key files, or None."""
    if not client_key and not server_key:
        return None
    if not (client_key and server_key):
        raise click.UsageError("--curve-client-key and --curve-server-key go together")
    import zmq.auth
    public, secret = zmq.auth.load_certificate(client_key)
    server, _ = zmq.auth.load_certificate(server_key)
    if secret is None:
        raise click.UsageError(f"{client_key} holds no secret key")
    return public, secret, server


def _client(opts):
    return Client(opts["endpoint"], timeout=opts["timeout"], curve=opts["curve"],
                  key=opts["key"])


def _call(ctx, verb, **fields):
    opts = ctx.obj
    try:
        with _client(opts) as client:
            reply = client.call(verb, **fields)
    except LmxTimeout as exc:
        click.echo(f"lmx-probe: {exc}", err=True)
        sys.exit(3)
    _print(opts, verb, reply)


def _print(opts, verb, reply):
    """Print a final reply (readable, or JSON) and exit 1 on an error reply."""
    if opts["json"]:
        click.echo(json.dumps(reply, default=str))
    else:
        click.echo("\n".join(_lines(_ordered(verb, reply))))
    if reply.get("status") != "ok":
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "token_normalize_func": lambda t: t.lower()})
@click.option("--endpoint", default=DEFAULT_ENDPOINT, show_default=True,
              help="The broker's client endpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print each reply as one JSON object.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for a reply.")
@click.option("--curve-client-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="tcp brokers: this client's zmq.auth secret key file.")
@click.option("--curve-server-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="tcp brokers: the broker's public key file.")
@click.option("--key", envvar="LMX_KEY", default=None, help="A client key of the broker's "
              "quotas file, sent with REGISTER, DECODE and CHAT [env LMX_KEY; default: none, "
              "the default client].")
@click.pass_context
def main(ctx, endpoint, as_json, timeout, curve_client_key, curve_server_key, key):
    """Send one verb (HELP, STATUS, LIST, REGISTER, UNREGISTER, DECODE, CHAT, CANCEL) to a
    broker."""
    ctx.obj = {"endpoint": endpoint, "json": as_json, "timeout": timeout,
               "curve": _curve(curve_client_key, curve_server_key), "key": key}


@main.command("help")
@click.pass_context
def help_(ctx):
    """HELP: the verbs the broker knows and their fields."""
    _call(ctx, "HELP")


@main.command()
@click.pass_context
def status(ctx):
    """STATUS: ledger, device totals, worker pid and state."""
    _call(ctx, "STATUS")


@main.command("list")
@click.pass_context
def list_(ctx):
    """LIST: registered agents."""
    _call(ctx, "LIST")


@main.command()
@click.argument("agent")
@click.argument("model")
@click.option("--n-ctx", type=int, default=None, help="Context size [broker default].")
@click.option("--device", default=None, help="Place it on this device (an index or a name "
              "from STATUS devices) [the broker's placement].")
@click.pass_context
def register(ctx, agent, model, n_ctx, device):
    """REGISTER AGENT MODEL: MODEL is a table key or a GGUF path. On a terminal, a bar shows
    the model's load progress when this REGISTER loads it."""
    fields = {"agent": agent, "model": model}
    if n_ctx is not None:
        fields["n_ctx"] = n_ctx
    if device is not None:
        fields["device"] = int(device) if device.isdigit() else device
    if not sys.stdout.isatty():
        _call(ctx, "REGISTER", **fields)     # scripts: the reply only
        return
    from rich.progress import Progress
    opts = ctx.obj
    with Progress(transient=True) as bar:
        task = bar.add_task(f"loading {model}", total=1.0, visible=False)
        try:
            with _client(opts) as client:
                msg_id = client.send("REGISTER", progress=True, **fields)
                for reply in client.replies(msg_id):
                    if reply.get("status") == "partial":
                        bar.update(task, completed=reply["progress"], visible=True)
        except LmxTimeout as exc:
            click.echo(f"lmx-probe: {exc}", err=True)
            sys.exit(3)
    _print(opts, "REGISTER", reply)


@main.command()
@click.argument("agent")
@click.pass_context
def unregister(ctx, agent):
    """UNREGISTER AGENT."""
    _call(ctx, "UNREGISTER", agent=agent)


@main.command()
@click.argument("agent")
@click.argument("n_predict", type=int)
@click.argument("prompt")
@click.option("--stream", is_flag=True, help="Print tokens as they come, then the summary.")
@click.option("--deadline-ms", type=int, default=None, help="Stop (or drop) after this long.")
@click.pass_context
def decode(ctx, agent, n_predict, prompt, stream, deadline_ms):
    """DECODE AGENT N_PREDICT PROMPT: greedy continuation of the agent's conversation."""
    extra = {"deadline_ms": deadline_ms} if deadline_ms is not None else {}
    if not stream:
        _call(ctx, "DECODE", agent=agent, prompt=prompt, n_predict=n_predict, **extra)
        return
    _stream(ctx, "DECODE", "text", agent=agent, prompt=prompt, n_predict=n_predict,
            **extra)


def _stream(ctx, verb, piece, **fields):
    """Send a streaming request; print each partial's `piece` as it comes, then the reply."""
    opts = ctx.obj
    try:
        with _client(opts) as client:
            msg_id = client.send(verb, stream=True, **fields)
            for reply in client.replies(msg_id):
                if reply.get("status") == "partial":
                    click.echo(json.dumps(reply) if opts["json"] else reply[piece], nl=opts[
                        "json"])
                    continue
                if not opts["json"]:
                    click.echo()
                click.echo(json.dumps(reply, default=str) if opts["json"]
                           else "\n".join(_lines(_ordered(verb, reply))))
    except LmxTimeout as exc:
        click.echo(f"lmx-probe: {exc}", err=True)
        sys.exit(3)
    if reply.get("status") != "ok":
        sys.exit(1)


@main.command()
@click.argument("agent")
@click.argument("text")
@click.option("--system", default=None, help="A system message before TEXT.")
@click.option("--max-tokens", type=int, default=None, help="Most tokens in the reply.")
@click.option("--temperature", type=float, default=None, help="0 for greedy.")
@click.option("--seed", type=int, default=None, help="Sampling seed (same seed, same text).")
@click.option("--json-schema", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A JSON schema file: the reply is JSON that validates against it.")
@click.option("--stream", is_flag=True, help="Print the reply as it comes, then the summary.")
@click.pass_context
def chat(ctx, agent, text, system, max_tokens, temperature, seed, json_schema, stream):
    """CHAT AGENT TEXT: one user message (after --system), answered with the model's template."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}]
    params = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature),
                                ("seed", seed)) if v is not None}
    if json_schema:
        with open(json_schema, encoding="utf-8") as fh:
            try:
                schema = json.load(fh)
            except ValueError as exc:
                raise click.BadParameter(f"not JSON: {exc}", param_hint="--json-schema")
        params["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "reply", "schema": schema}}
    if not stream:
        _call(ctx, "CHAT", agent=agent, messages=messages, **params)
        return
    _stream(ctx, "CHAT", "delta", agent=agent, messages=messages, **params)


@main.command()
@click.argument("agent")
@click.argument("request")
@click.pass_context
def cancel(ctx, agent, request):
    """CANCEL AGENT REQUEST: stop a DECODE (REQUEST is its id, as its client sent it)."""
    _call(ctx, "CANCEL", agent=agent, request=int(request) if request.isdigit() else request)


if __name__ == "__main__":
    main()

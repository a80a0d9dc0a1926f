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
    if verb != "DECODE" or reply.get("status") != "ok":
        return reply
    first = {k: reply[k] for k in ("status", *DECODE_ORDER) if k in reply}
    rest = {k: v for k, v in reply.items() if k not in first and k != "text"}
    return {**first, **rest, "text": reply.get("text", "")}


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


def _call(ctx, verb, **fields):
    opts = ctx.obj
    try:
        with Client(opts["endpoint"], timeout=opts["timeout"], curve=opts["curve"]) as client:
            reply = client.call(verb, **fields)
    except LmxTimeout as exc:
        click.echo(f"lmx-probe: {exc}", err=True)
        sys.exit(3)
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
@click.pass_context
def main(ctx, endpoint, as_json, timeout, curve_client_key, curve_server_key):
    """Send one verb (HELP, STATUS, LIST, REGISTER, UNREGISTER, DECODE, CANCEL) to a broker."""
    ctx.obj = {"endpoint": endpoint, "json": as_json, "timeout": timeout,
               "curve": _curve(curve_client_key, curve_server_key)}


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
@click.pass_context
def register(ctx, agent, model, n_ctx):
    """REGISTER AGENT MODEL: MODEL is a table key or a GGUF path."""
    fields = {"agent": agent, "model": model}
    if n_ctx is not None:
        fields["n_ctx"] = n_ctx
    _call(ctx, "REGISTER", **fields)


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
    opts = ctx.obj
    try:
        with Client(opts["endpoint"], timeout=opts["timeout"], curve=opts["curve"]) as client:
            msg_id = client.send("DECODE", agent=agent, prompt=prompt, n_predict=n_predict,
                                 stream=True, **extra)
            for reply in client.replies(msg_id):
                if reply.get("status") == "partial":
                    click.echo(json.dumps(reply) if opts["json"] else reply["text"], nl=opts[
                        "json"])
                    continue
                if not opts["json"]:
                    click.echo()
                click.echo(json.dumps(reply, default=str) if opts["json"]
                           else "\n".join(_lines(_ordered("DECODE", reply))))
    except LmxTimeout as exc:
        click.echo(f"lmx-probe: {exc}", err=True)
        sys.exit(3)
    if reply.get("status") != "ok":
        sys.exit(1)


@main.command()
@click.argument("agent")
@click.argument("request")
@click.pass_context
def cancel(ctx, agent, request):
    """CANCEL AGENT REQUEST: stop a DECODE (REQUEST is its id, as its client sent it)."""
    _call(ctx, "CANCEL", agent=agent, request=int(request) if request.isdigit() else request)


if __name__ == "__main__":
    main()

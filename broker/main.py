"""`lmx-broker`: serve agents on a ZeroMQ ROUTER with VRAM admission control."""
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile

import click

from lmx.broker.core import BrokerConfig
from lmx.broker.server import Broker
from lmx.broker.statelock import StateDirBusy
from lmx.common import config as cfg

log = logging.getLogger("lmx.broker")


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        if isinstance(value, tuple):
            return tuple(cfg.parse_size(v) for v in value)
        return cfg.parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _gpus(ctx, param, value):
    """--gpus 0,1 -> (0, 1); all -> every GPU NVML sees; None when not given."""
    if value is None:
        return None
    if value.strip().lower() == "all":
        try:
            import pynvml
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # no driver, no library: say so
            raise click.BadParameter(f"'all' needs NVML to count the GPUs ({exc})") from None
        if not count:
            raise click.BadParameter("NVML sees no GPU")
        return tuple(range(count))
    try:
        gpus = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not 'all' nor GPU indices like 0,1") from None
    if len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise click.BadParameter(f"{value!r}: GPU indices must be distinct and >= 0")
    return gpus


def _listen(ctx, param, value):
    if value is None:
        return None
    from lmx.broker.metrics import parse_listen
    try:
        return parse_listen(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _private_worker_endpoint():
    """An ipc endpoint in a fresh 0700 directory (mkdtemp's mode), and that directory."""
    folder = tempfile.mkdtemp(prefix="lmx-broker-")
    return f"ipc://{folder}/worker.sock", folder


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--endpoint", default=cfg.DEFAULT_ENDPOINT, show_default=True,
              help="Where agents connect (ipc:// or tcp://).")
@click.option("--worker-endpoint", default=None, help="Where the worker connects [default: "
              "a private ipc socket in a fresh temp dir].")
@click.option("--vram-table", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Operator table: 'key path bytes' per line; keys can be REGISTERed by name "
              "and their bytes are the model's weights, booked once per loaded model.")
@click.option("--vram-total", callback=_size, multiple=True, help="Declared device size, e.g. "
              "8GiB. CPU worker: the size admission uses [default 8GiB]. GPU: caps NVML's "
              "total (emulate a smaller card). Repeat it for one local worker (device) per "
              "size; with --gpus, give one (for every GPU) or one per GPU.")
@click.option("--gpus", callback=_gpus, default=None, help="Start one worker per GPU: "
              "indices (0,1) or 'all' (NVML's count); each sees only its own GPU "
              "(CUDA_VISIBLE_DEVICES) [default: one worker on --gpu-index].")
@click.option("--remote-workers", "remote_endpoint", default=None, metavar="tcp://HOST:PORT",
              help="Also accept workers of other hosts here (CURVE: needs --curve-secret-key "
              "and --curve-workers); each is a device of its own.")
@click.option("--curve-workers", type=click.Path(exists=True, file_okay=False), default=None,
              help="--remote-workers: folder of the public keys of workers allowed in.")
@click.option("--admission-percent", default=cfg.DEFAULT_ADMISSION_PERCENT, show_default=True,
              type=click.IntRange(1, 100), help="Cap = this percent of the device total.")
@click.option("--spawn-worker/--no-spawn-worker", default=True, show_default=True,
              help="Start lmx-worker as a subprocess, or wait for one started by hand.")
@click.option("--cpu", "worker_cpu", is_flag=True, help="Run the worker's llama.cpp on the CPU "
              "even if a GPU is present.")
@click.option("--threads", default=None, type=int, help="Worker llama.cpp threads [default: "
              "the usable cores].")
@click.option("--gpu-index", default=0, show_default=True, help="GPU the worker uses (NVML).")
@click.option("--worker-overhead", callback=_size, default=None, help="Fixed per-worker device "
              "bytes booked at start [default: 640MiB on CUDA, 0 on CPU].")
@click.option("--worker-start-timeout", default=120.0, show_default=True,
              help="Seconds to wait for the worker's READY.")
@click.option("--heartbeat", default=cfg.DEFAULT_HEARTBEAT_S, show_default=True,
              help="Heartbeat interval (s) between broker and worker.")
@click.option("--liveness", default=cfg.DEFAULT_LIVENESS, show_default=True,
              help="Missed heartbeats before the worker is declared lost.")
@click.option("--queue-depth", default=cfg.DEFAULT_QUEUE_DEPTH, show_default=True,
              help="Requests waiting for the worker before BUSY.")
@click.option("--default-n-ctx", default=cfg.DEFAULT_N_CTX, show_default=True,
              help="Context size for a REGISTER that names none.")
@click.option("--max-frame-bytes", default=1 << 20, show_default=True,
              help="Largest request body accepted (FRAME_TOO_LARGE past it).")
@click.option("--max-n-predict", default=cfg.MAX_N_PREDICT, show_default=True)
@click.option("--state-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "lmx"),
              show_default=True, help="The broker's own folder (one broker per folder, held "
              "by broker.lock): journal.json (registrations), measured.json (what the worker "
              "really allocated) and parked/ (parked KV state).")
@click.option("--measure-margin", default=5, show_default=True, type=click.IntRange(0, 100),
              help="Percent added to a measured figure when it replaces an estimate.")
@click.option("--others-margin", callback=_size, default="256MiB", show_default=True,
              help="Kept free below what other processes hold on the GPU.")
@click.option("--simulate-others", type=click.Path(dir_okay=False), default=None,
              help="CPU worker only: read the bytes 'other processes' hold from this file "
              "(stands in for NVML in tests and demos).")
@click.option("--model-dir", "model_dirs", multiple=True, type=click.Path(file_okay=False),
              help="REGISTER may load GGUF paths under this directory (repeatable); without "
              "any, only table keys can be registered.")
@click.option("--max-prompt-tokens", default=cfg.DEFAULT_MAX_PROMPT_TOKENS, show_default=True)
@click.option("--max-agents-per-client", default=cfg.DEFAULT_MAX_AGENTS_PER_CLIENT,
              show_default=True)
@click.option("--curve-secret-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="tcp endpoints: the broker's zmq.auth secret key file.")
@click.option("--curve-clients", type=click.Path(exists=True, file_okay=False), default=None,
              help="tcp endpoints: folder of the public keys of clients allowed in.")
@click.option("--max-live-contexts", default=0, show_default=True, type=click.IntRange(0, 4096),
              help="At most this many agents live at once (idle ones parked, least recently "
              "used first, when another must run); 0: as many as the ledger allows.")
@click.option("--swap-grace-ms", default=20, show_default=True, type=click.IntRange(0, 1000),
              help="A parked agent's request that must park idle agents waits while other "
              "requests keep arriving less than this apart (at most 5 times it), so a burst's "
              "own agents are not parked for each other; 0: never wait.")
@click.option("--admit-by-parking", is_flag=True, help="A REGISTER that does not fit parks "
              "idle agents (least recently used first) to make room, instead of being refused.")
@click.option("--max-batch", default=256, show_default=True, type=click.IntRange(1, 256),
              help="Most seats of a group context: agents of one model and context spec live "
              "in it and decode in one llama_decode batch (256 is llama.cpp's sequence limit).")
@click.option("--park-ram", callback=_size, default="4GiB", show_default=True,
              help="Host memory for parked KV state (the broker's budget: it counts every "
              "parked byte); past it, parked state goes to files in STATE_DIR/parked.")
@click.option("--quantum", default=4, show_default=True, type=click.IntRange(1, 4096),
              help="Batched steps a group of agents runs per turn, at most, before the next "
              "group's turn and new jobs.")
@click.option("--turn-tokens", default=512, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Tokens a group evaluates per turn, at most: groups (models, context specs) "
              "share the worker fairly by tokens, a long prompt's chunks using up its turns.")
@click.option("--park-to-disk/--no-park-to-disk", default=True, show_default=True,
              help="Use STATE_DIR/parked: parked state past --park-ram, and a copy of every "
              "parked state so conversations survive a worker or broker restart.")
@click.option("--chat-template", "chat_templates", multiple=True, metavar="MODEL=TEMPLATE",
              help="Set or override a model's chat template for CHAT (repeatable): MODEL is a "
              "table key or a GGUF path, TEMPLATE a built-in name (chatml) or a jinja file.")
@click.option("--quotas", "quotas", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A TOML quotas file (see configs/quotas.example.toml; the gateway can "
              "read the same file): per client key max_agents, max_booked_bytes, max_n_ctx, "
              "tokens_per_minute, and [default] for requests without a key [default: no "
              "quotas].")
@click.option("--metrics", "metrics", default=None, metavar="HOST:PORT", callback=_listen,
              help="Serve Prometheus metrics on http://HOST:PORT/metrics [default: off].")
@click.option("--log-level", default="INFO", show_default=True)
def main(**opts):
    """Run the lmx broker (and, by default, its worker) until SIGINT/SIGTERM."""
    logging.basicConfig(level=opts["log_level"].upper(),
                        format="%(asctime)s %(name)s %(message)s")
    if not opts["spawn_worker"] and not opts["worker_endpoint"] and \
            not opts["remote_endpoint"]:
        raise click.UsageError("--no-spawn-worker needs --worker-endpoint for the worker")
    if opts["remote_endpoint"] and not opts["remote_endpoint"].startswith("tcp://"):
        raise click.UsageError("--remote-workers takes a tcp://HOST:PORT endpoint")
    private = None
    if opts["worker_endpoint"] is None:
        opts["worker_endpoint"], private = _private_worker_endpoint()
    code = 0
    try:
        broker = Broker(_config(opts), metrics=opts["metrics"])
        # Signal handlers do no work: they ask the loop to stop.
        signal.signal(signal.SIGTERM, lambda *_: setattr(broker, "stop", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(broker, "stop", True))
        log.info("broker: worker endpoint %s", opts["worker_endpoint"])
        try:
            broker.start()
            broker.run()
        except RuntimeError as exc:
            log.error("broker: %s", exc)
            broker.close()
            code = 1
    except (StateDirBusy, RuntimeError) as exc:     # RuntimeError: e.g. tcp without keys
        log.error("broker: %s", exc)
        code = 1
    finally:
        if private:
            shutil.rmtree(private, ignore_errors=True)
    log.info("broker: stopped")
    sys.exit(code)


def _table(path):
    try:
        table = cfg.load_model_table(path) if path else {}
    except (OSError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--vram-table") from None
    for entry in table.values():
        if not os.path.isfile(entry.path):
            log.warning("broker: table key %r points at a missing file %s", entry.key,
                        entry.path)
    return table


def _chat_templates(pairs, table):
    """{model path: template text} from MODEL=TEMPLATE pairs."""
    from lmx.common import chat
    out = {}
    for pair in pairs:
        model, sep, template = pair.partition("=")
        if not sep or not model or not template:
            raise click.BadParameter(f"{pair!r} is not MODEL=TEMPLATE",
                                     param_hint="--chat-template")
        path = table[model].path if model in table else os.path.realpath(
            os.path.expanduser(model))
        if template in chat.BUILTIN_TEMPLATES:
            out[path] = chat.BUILTIN_TEMPLATES[template]
            continue
        try:
            with open(template, encoding="utf-8") as fh:
                out[path] = fh.read()
        except OSError as exc:
            raise click.BadParameter(f"{template}: not a built-in template ("
                                     f"{', '.join(chat.BUILTIN_TEMPLATES)}) nor a readable "
                                     f"file ({exc.strerror})",
                                     param_hint="--chat-template") from None
    return out


def _workers(base, gpus, totals):
    """One WorkerConfig per local device: per GPU with --gpus, else per --vram-total (one at
    least), each named local:N."""
    count = len(gpus) if gpus else max(len(totals), 1)
    if gpus and len(totals) not in (0, 1, count):
        raise click.UsageError(f"--gpus names {count} GPUs: give --vram-total once, once per "
                               f"GPU, or not at all (got {len(totals)})")
    out = []
    for i in range(count):
        total = totals[i] if len(totals) == count else (totals[0] if totals else None)
        out.append(dataclasses.replace(base, name=f"local:{i}", vram_total=total,
                                       gpu_index=gpus[i] if gpus else base.gpu_index))
    return out


def _config(o):
    """lmx-broker's options -> the broker's config, with the workers' configs inside it."""
    state = o["state_dir"]
    worker = cfg.WorkerConfig(
        broker=o["worker_endpoint"], gpu_index=o["gpu_index"], force_cpu=o["worker_cpu"],
        threads=o["threads"], vram_total=(o["vram_total"] or (None,))[0],
        heartbeat_s=o["heartbeat"],
        liveness=o["liveness"], max_batch=o["max_batch"], quantum=o["quantum"],
        turn_tokens=o["turn_tokens"],
        log_level=o["log_level"],
        simulate_others=os.path.abspath(o["simulate_others"]) if o["simulate_others"] else None,
        park_dir=os.path.join(state, "parked") if o["park_to_disk"] and state else None)
    table = _table(o["vram_table"])
    return BrokerConfig(
        endpoint=o["endpoint"], worker_endpoint=o["worker_endpoint"],
        table=table, admission_percent=o["admission_percent"],
        chat_templates=_chat_templates(o["chat_templates"], table),
        spawn_worker=o["spawn_worker"], worker=worker,
        worker_start_timeout=o["worker_start_timeout"], worker_overhead=o["worker_overhead"],
        heartbeat_s=o["heartbeat"], liveness=o["liveness"], queue_depth=o["queue_depth"],
        max_frame_bytes=o["max_frame_bytes"], default_n_ctx=o["default_n_ctx"],
        max_n_predict=o["max_n_predict"], state_dir=state,
        measure_margin_percent=o["measure_margin"], others_margin=o["others_margin"],
        model_dirs=tuple(o["model_dirs"]), max_prompt_tokens=o["max_prompt_tokens"],
        max_agents_per_client=o["max_agents_per_client"],
        curve_secret_key=o["curve_secret_key"], curve_clients=o["curve_clients"],
        park_to_disk=o["park_to_disk"], park_ram=o["park_ram"],
        max_live_contexts=o["max_live_contexts"], admit_by_parking=o["admit_by_parking"],
        swap_grace_s=o["swap_grace_ms"] / 1000,
        workers=_workers(worker, o["gpus"], o["vram_total"]), gpus=o["gpus"] or (),
        remote_endpoint=o["remote_endpoint"], curve_workers=o["curve_workers"],
        quotas=_quotas(o["quotas"]))


def _quotas(path):
    """The quotas file, or None; a bad file stops the start with its message."""
    if path is None:
        return None
    from lmx.common import quotas
    try:
        config = quotas.load(path)
    except quotas.QuotaFileError as exc:
        raise click.BadParameter(str(exc), param_hint="--quotas") from None
    log.info("broker: quotas for %d clients from %s", len(config.clients), path)
    return config


if __name__ == "__main__":
    main()

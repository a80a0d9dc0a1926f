"""`lmx-estimate`: the device bytes a GGUF model and one context will take, from metadata alone."""
import json
import sys
import time

import click

from lmx.broker.estimator import UnknownShape, estimate, shape_from_metadata, sizing
from lmx.broker.ggufmeta import GGUFFormatError, read_metadata
from lmx.common.config import format_size
from lmx.common.ctxspec import KV_TYPES, ContextSpec
from lmx.common.errors import LmxError

ROWS = [("weights_device", "weights on the device"), ("weights_host", "weights on the host"),
        ("kv", "KV cache"), ("compute", "compute buffer"),
        ("output_host", "output buffer (host, pinned on CUDA)"),
        ("overhead", "per-process overhead (CUDA context, once per worker)"),
        ("device_total", "device total")]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--n-ctx", default=2048, show_default=True, help="0 = the trained context.")
@click.option("--n-batch", default=512, show_default=True)
@click.option("--n-ubatch", default=512, show_default=True)
@click.option("--n-seq", default=1, show_default=True)
@click.option("--n-outputs-max", default=None, type=int, help="Logits kept per batch "
              "[default: n_seq; lmx's worker keeps 1 per sequence, llama.cpp's default is n_batch].")
@click.option("--type-k", type=click.Choice(list(KV_TYPES)), default="f16", show_default=True)
@click.option("--type-v", type=click.Choice(list(KV_TYPES)), default="f16", show_default=True)
@click.option("--flash-attn/--no-flash-attn", default=True, show_default=True)
@click.option("--swa-full/--no-swa-full", default=False, show_default=True,
              help="Full-size cache for sliding-window layers (llama.cpp's own default is on).")
@click.option("--n-gpu-layers", default=-1, show_default=True, help="-1 = all layers.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def main(model, n_ctx, n_batch, n_ubatch, n_seq, n_outputs_max, type_k, type_v, flash_attn,
         swa_full, n_gpu_layers, device, as_json):
    """Print MODEL's device bytes, broken down, for one context (llama.cpp 0.3.36 rules)."""
    t0 = time.perf_counter()
    try:
        shape = shape_from_metadata(read_metadata(model, with_tensors=True))
        if n_ctx == 0:
            n_ctx = shape.n_ctx_train
        n_outputs_max = n_outputs_max or n_seq
        spec = ContextSpec(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_seq=n_seq,
                           type_k=type_k, type_v=type_v, flash_attn=flash_attn,
                           swa_full=swa_full, n_outputs_max=n_outputs_max,
                           n_gpu_layers=n_gpu_layers)
        spec.validate()
    except (GGUFFormatError, UnknownShape) as exc:
        click.echo(f"lmx-estimate: cannot estimate {model}: {exc}", err=True)
        sys.exit(1)
    except LmxError as exc:
        raise click.BadParameter(exc.message) from None
    parts = estimate(shape, spec, device).as_dict()
    size = sizing(shape, spec)
    out = {"model": model, "arch": shape.arch, "device": device, "spec": spec.as_dict(),
           "n_ctx_padded": size.n_ctx, "swa_cells": size.swa_cells if any(shape.swa_layers)
           else None, **{k: parts[k] for k, _ in ROWS},
           "elapsed_ms": round((time.perf_counter() - t0) * 1000, 1)}
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{model}  ({shape.arch}, {shape.n_layer} layers, n_ctx {size.n_ctx}, "
               f"flash_attn {'on' if flash_attn else 'off'}, KV {type_k}/{type_v}, {device})")
    for key, label in ROWS:
        click.echo(f"  {label:55} {out[key]:>14,d} B  {format_size(out[key]):>11}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Estimator vs llama.cpp: build real contexts and compare each part of the estimate.

    python benchmarks/estimate_accuracy.py MODEL.gguf [...] --n-ctx 512 --n-ctx 4096 [--json]

For every model x n_ctx x flash attention x swa_full (x KV type) it loads the model with
llama.cpp (CUDA when the build has it, else CPU), builds the context, and prints the
estimator's weights / KV / compute beside llama.cpp's own buffer reports and, on a GPU, the
NVML change of this process. Error % = (estimate - measured) / measured.

On the CPU backend llama.cpp may also repack some quantized weights for faster kernels
(`CPU_REPACK`, e.g. 12.7 MiB for Gemma 3 270M on AVX2). That buffer is CPU-only, depends on the
host's ISA, and is not modelled; it is shown in its own column. The broker's measured
reconciliation books it on a CPU worker.
"""
import llama_cpp  # noqa: F401,I001  -- before numpy (CUDA load order)

import json
import os

import click

from lmx.broker.estimator import estimate, shape_from_metadata
from lmx.broker.ggufmeta import read_metadata
from lmx.common.ctxspec import ContextSpec
from lmx.worker.device import open_device
from lmx.worker.engine import Engine


def _part(buffers, kind, cuda):
    """llama.cpp's reported bytes of one kind on the device (CPU_REPACK excluded: see below)."""
    return sum(v for k, v in buffers.items() if k.split()[1] == kind and "_Host" not in k
               and "REPACK" not in k and (not cuda or not k.startswith("CPU")))


def measure(engine, path, specs, cuda):
    """Yield (spec, model buffers, context measurement) for each spec on one model."""
    engine.register("m", path, specs[0])
    try:
        model = engine.slots["m"].model
        for spec in specs:
            slot = engine.slots["m"]
            slot.spec, slot.n_ctx = spec, spec.n_ctx
            yield spec, model, engine.measure("m")
    finally:
        engine.unregister("m")


def err(est, real):
    return None if not real else round(100.0 * (est - real) / real, 2)


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--n-ctx", "n_ctxs", multiple=True, type=int, default=(512, 4096), show_default=True)
@click.option("--kv-type", "kv_types", multiple=True, default=("f16",), show_default=True)
@click.option("--swa-full/--no-swa-full-sweep", default=True, help="Also sweep swa_full on.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--markdown", is_flag=True, help="One markdown table of device totals.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the rows as JSON to this file.")
def main(models, n_ctxs, kv_types, swa_full, as_json, markdown, json_out):
    """Compare estimate and measurement cell by cell."""
    gpu = llama_cpp.llama_supports_gpu_offload()
    device = open_device(gpu)
    cuda = device.kind == "cuda"
    engine = Engine(len(os.sched_getaffinity(0)), gpu=cuda, pinned=False,
                    process_bytes=lambda: device.read()["process_bytes"])
    rows = []
    if cuda:
        # Pay the CUDA context and cuBLAS workspace once, so NVML deltas below are buffers only.
        for _ in measure(engine, models[0], [ContextSpec(n_ctx=256)], cuda):
            pass
    for path in models:
        shape = shape_from_metadata(read_metadata(path, with_tensors=True))
        specs = [ContextSpec(n_ctx=n, flash_attn=fa, swa_full=sf, type_k=kv,
                             type_v=kv if fa else "f16")
                 for n in n_ctxs for fa in (True, False) for sf in ((False, True) if swa_full
                                                                     and any(shape.swa_layers)
                                                                     else (False,))
                 for kv in kv_types if fa or kv == "f16"]
        for spec, model, ctx in measure(engine, path, specs, cuda):
            est = estimate(shape, spec, device.kind)
            w_real = _part(model.buffers, "model", cuda)
            kv_real = _part(ctx.buffers, "KV", cuda)
            c_real = _part(ctx.buffers, "compute", cuda)
            nvml = (model.nvml_delta or 0) + (ctx.nvml_delta or 0) if cuda else None
            est_dev = est.weights_device + est.kv + est.compute
            real = w_real + kv_real + c_real
            rows.append({"model": os.path.basename(path), "n_ctx": spec.n_ctx,
                         "flash_attn": spec.flash_attn, "swa_full": spec.swa_full,
                         "kv_type": spec.type_k, "weights_est": est.weights_device,
                         "weights_real": w_real, "kv_est": est.kv, "kv_real": kv_real,
                         "cpu_repack": sum(v for k, v in model.buffers.items() if "REPACK" in k),
                         "compute_est": est.compute, "compute_real": c_real,
                         "est_device": est_dev, "real_buffers": real,
                         "err_buffers_pct": err(est_dev, real), "nvml_delta": nvml,
                         "err_nvml_pct": err(est_dev, nvml) if nvml else None,
                         "compute_err_pct": err(est.compute, c_real),
                         "kv_err_pct": err(est.kv, kv_real),
                         "weights_err_pct": err(est.weights_device, w_real)})
    engine.close()
    if json_out:
        with open(json_out, "w") as fh:
            json.dump({"device": device.read(), "rows": rows}, fh, indent=1)
    if as_json:
        click.echo(json.dumps({"device": device.read(), "rows": rows}, indent=1))
        return
    if markdown:
        click.echo(f"device: {device.read()['name']}\n")
        click.echo("| model | n_ctx | flash attn | estimate MiB | llama.cpp buffers MiB | "
                   "error % | NVML delta MiB | error vs NVML % |")
        click.echo("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            nv = f"{r['nvml_delta'] / 2**20:.1f}" if r["nvml_delta"] else "-"
            click.echo(f"| {r['model']} | {r['n_ctx']} | {'on' if r['flash_attn'] else 'off'}"
                       f" | {r['est_device'] / 2**20:.1f} | {r['real_buffers'] / 2**20:.1f} | "
                       f"{r['err_buffers_pct']:+.2f} | {nv} | "
                       f"{'-' if r['err_nvml_pct'] is None else format(r['err_nvml_pct'], '+.2f')} |")
        return
    mib = lambda b: f"{b / 2**20:9.2f}"  # noqa: E731
    click.echo(f"device: {device.read()['name']}")
    click.echo("model                          n_ctx  fa swa kv    weights est/real (err%)      "
               "KV est/real (err%)           compute est/real (err%)")
    for r in rows:
        click.echo(f"{r['model'][:30]:30} {r['n_ctx']:6} {int(r['flash_attn']):3} "
                   f"{int(r['swa_full']):3} {r['kv_type']:5} {mib(r['weights_est'])}/"
                   f"{mib(r['weights_real'])} ({r['weights_err_pct']})  {mib(r['kv_est'])}/"
                   f"{mib(r['kv_real'])} ({r['kv_err_pct']})  {mib(r['compute_est'])}/"
                   f"{mib(r['compute_real'])} ({r['compute_err_pct']})")


if __name__ == "__main__":
    main()

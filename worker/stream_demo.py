"""`lmx-stream-demo`: the layer streamer against its serial baseline, with real or synthetic layers.

    lmx-stream-demo                                   # the seed's default: 8 x 64 MiB, 64 FMA iters
    lmx-stream-demo --kernel gemv --rows 8192 --cols 2048 --n-layers 16
    lmx-stream-demo --kernel gemv --gguf model.gguf   # ffn_up/ffn_down of the first layers

Prints per-layer copy and compute times and a HEADLINE (see worker/streamer.py); with --kernel
gemv it also checks the chained result against numpy. Exit status 1 if the check fails.
"""
import llama_cpp  # noqa: F401,I001  -- before numpy in every worker module (see engine.py)

import json
import statistics
import sys
import warnings

import click
import numpy as np

from lmx.worker import streamer

THREADS = 256


def _kernels():
    """numba.cuda is loaded only when the demo runs (the simulator swaps it in at import)."""
    from numba import cuda
    # Small gemv layers launch few blocks; that is the point of the demo, not a problem.
    warnings.filterwarnings("ignore", message=".*will likely result in GPU under-utilization")
    from lmx.worker import streamkernels
    return cuda, streamkernels.fma, streamkernels.gemv


class FmaKernel:
    """x <- 0.999 x + 0.001, `iters` times per element, in place on the slot."""

    def __init__(self, cuda, fn, n_elems, iters, n_layers):
        self.fn, self.n, self.iters = fn, n_elems, iters
        self.out = cuda.device_array(n_layers, dtype=np.float32)
        self.grid = min(streamer.blocks(n_elems, THREADS), 4096)

    def __call__(self, slot, layer, state, stream):
        self.fn[self.grid, THREADS, stream](slot, self.n, self.iters, self.out, layer)


class GemvKernel:
    """y = W x with W stored transposed (coalesced reads); layer i's output feeds layer i+1."""

    def __init__(self, cuda, fn, shapes, x0):
        self.fn, self.shapes = fn, shapes
        width = max(max(r, c) for r, c in shapes)
        self.vecs = [cuda.to_device(np.pad(x0, (0, width - x0.size)).astype(np.float32)),
                     cuda.device_array(width, dtype=np.float32)]

    def reset(self, x0):
        host = np.zeros(self.vecs[0].size, dtype=np.float32)
        host[:x0.size] = x0
        self.vecs[0].copy_to_device(host)

    def __call__(self, slot, layer, state, stream):
        rows, cols = self.shapes[layer]
        x, y = self.vecs[layer % 2], self.vecs[(layer + 1) % 2]
        self.fn[streamer.blocks(rows, THREADS), THREADS, stream](slot, rows, cols, x, y)

    def result(self, n_layers):
        rows = self.shapes[-1][0]
        return self.vecs[n_layers % 2].copy_to_host()[:rows]


def gguf_layers(path, n_layers):
    """ffn_up / ffn_down matrices of the first blocks, dequantized with the gguf package."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    mats, il = [], 0
    while len(mats) < n_layers:
        for part in ("ffn_up", "ffn_down"):
            t = by_name.get(f"blk.{il}.{part}.weight")
            if t is None:
                raise click.UsageError(f"{path} has no blk.{il}.{part}.weight "
                                       f"({len(mats)} layers found)")
            mats.append(dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]),
                                                                   int(t.shape[0])))
        il += 1
    return [m.astype(np.float16) for m in mats[:n_layers]]


def random_layers(n_layers, rows, cols, seed):
    """Alternating (rows x cols) and (cols x rows) f16 matrices, scaled to keep norms steady."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_layers):
        r, c = (rows, cols) if i % 2 == 0 else (cols, rows)
        out.append((rng.standard_normal((r, c), dtype=np.float32) / np.sqrt(c))
                   .astype(np.float16))
    return out


def _median_run(runs):
    return sorted(runs, key=lambda r: r.total_ms)[len(runs) // 2]


def run(kernel, n_layers, bytes_per_layer, compute_iters, rows, cols, gguf, repeats, seed):
    """Build the layers, run serial and overlapped `repeats` times, check, and summarise."""
    cuda, fma, gemv = _kernels()
    check = {"checked": False}
    if kernel == "fma":
        n = bytes_per_layer // 4
        layers = [np.full(n, 1.0 + i, dtype=np.float32) for i in range(n_layers)]
        k = FmaKernel(cuda, fma, n, compute_iters, n_layers)
    else:
        mats = gguf_layers(gguf, n_layers) if gguf else random_layers(n_layers, rows, cols, seed)
        layers = [np.ascontiguousarray(m.T).ravel() for m in mats]      # transposed storage
        x0 = np.random.default_rng(seed + 1).standard_normal(mats[0].shape[1]).astype(np.float32)
        k = GemvKernel(cuda, gemv, [m.shape for m in mats], x0)
    st = streamer.LayerStreamer(layers, k)
    serial, overlapped = [], []
    for rep in range(repeats + 1):                       # the first pair warms up (JIT, caches)
        for runner, sink in ((st.run_serial, serial), (st.run_overlapped, overlapped)):
            if kernel == "gemv":
                k.reset(x0)
            res = runner(None)
            if rep:
                sink.append(res)
            if kernel == "gemv" and rep == repeats:
                check = verify_gemv(mats, x0, k.result(n_layers))
    if kernel == "fma":
        check = verify_fma(layers, compute_iters, k.out.copy_to_host())
    s, o = _median_run(serial), _median_run(overlapped)
    return {"config": {"kernel": kernel, "n_layers": n_layers,
                       "bytes_per_layer": int(layers[0].nbytes if kernel == "gemv"
                                              else bytes_per_layer),
                       "compute_iters": compute_iters if kernel == "fma" else None,
                       "shapes": [list(m.shape) for m in mats] if kernel == "gemv" else None,
                       "gguf": gguf, "repeats": repeats,
                       "simulator": streamer._simulated(cuda)},
            "serial": vars(s), "overlapped": vars(o), "check": check,
            **streamer.summarize(s, o)}


def verify_gemv(mats, x0, got):
    """The chained product in numpy (f32 math on the same f16 weights)."""
    x = x0.astype(np.float32)
    for m in mats:
        x = m.astype(np.float32) @ x
    err = float(np.max(np.abs(got - x)) / (np.max(np.abs(x)) or 1.0))
    return {"checked": True, "match": bool(err < 1e-3), "max_rel_error": err}


def verify_fma(layers, iters, out):
    """Element 0 of each layer after the FMA loop, against float64 (the GPU fuses the
    multiply-add, numpy would round twice, so the check allows 1e-4 relative)."""
    want = []
    for a in layers:
        x = float(a[0])
        for _ in range(iters):
            x = x * 0.999 + 0.001
        want.append(x)
    want = np.array(want)
    err = float(np.max(np.abs(want - out) / np.abs(want)))
    return {"checked": True, "match": bool(err < 1e-4), "max_rel_error": err}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--n-layers", default=8, show_default=True)
@click.option("--bytes-per-layer", default=64 << 20, show_default=True, help="fma layers.")
@click.option("--compute-iters", default=64, show_default=True, help="FMA iterations/element.")
@click.option("--kernel", type=click.Choice(["fma", "gemv"]), default="fma", show_default=True)
@click.option("--rows", default=None, type=int, help="gemv: rows of the even layers "
              "[default: a square matrix of --bytes-per-layer in f16].")
@click.option("--cols", default=None, type=int, help="gemv: columns of the even layers.")
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False), default=None,
              help="gemv: take ffn_up/ffn_down of this GGUF's first blocks as the layers.")
@click.option("--repeats", default=3, show_default=True, help="Runs of each; medians shown.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(n_layers, bytes_per_layer, compute_iters, kernel, rows, cols, gguf, repeats, seed,
         as_json):
    """Stream layers through two device slots and compare with the serial baseline."""
    if n_layers < 1 or repeats < 1 or bytes_per_layer < 4:
        raise click.UsageError("--n-layers, --repeats and --bytes-per-layer must be positive")
    avail = streamer.probe()
    if not avail["available"]:
        click.echo(f"lmx-stream-demo: streaming is not available here: {avail['reason']}",
                   err=True)
        sys.exit(2)
    if kernel == "gemv" and not gguf:
        side = int((bytes_per_layer // 2) ** 0.5)
        rows, cols = rows or side, cols or rows or side
    out = run(kernel, n_layers, bytes_per_layer, compute_iters, rows, cols, gguf, repeats, seed)
    if as_json:
        click.echo(json.dumps(out))
    else:
        o = out["overlapped"]
        click.echo(f"config: {json.dumps(out['config'])}")
        click.echo("layer  copy_ms  compute_ms   (overlapped run)")
        for i, (c, k) in enumerate(zip(o["copy_ms"], o["compute_ms"])):
            click.echo(f"{i:5d} {c:8.3f} {k:11.3f}")
        click.echo(f"serial per-layer copy median {statistics.median(out['serial']['copy_ms']):.3f}"
                   f" ms, compute median {statistics.median(out['serial']['compute_ms']):.3f} ms")
        if out["check"]["checked"]:
            click.echo(f"check vs numpy: {'match' if out['check']['match'] else 'MISMATCH'} "
                       f"{ {k: v for k, v in out['check'].items() if k != 'checked'} }")
        click.echo(streamer.headline(out))
    if out["check"]["checked"] and not out["check"]["match"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

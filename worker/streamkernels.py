"""numba.cuda kernels for the layer streamer demo (imported only when the demo runs)."""
import llama_cpp  # noqa: F401,I001  -- before numpy in every worker module (see engine.py)

from numba import cuda, float32


@cuda.jit
def fma(slot, n, iters, out, layer):
    """x <- 0.999 x + 0.001, iters times, for each element; element 0 goes to out[layer]."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n:
        x = slot[i]
        for _ in range(iters):
            x = x * float32(0.999) + float32(0.001)
        slot[i] = x
        if i == 0:
            out[layer] = x
        i += stride


@cuda.jit
def gemv(wt, rows, cols, x, y):
    """y = W x for W stored transposed (wt[c * rows + r]), one thread per row, f32 accumulate."""
    r = cuda.grid(1)
    if r < rows:
        acc = float32(0.0)
        for c in range(cols):
            acc += float32(wt[c * rows + r]) * x[c]
        y[r] = acc


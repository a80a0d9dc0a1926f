"""The layer streamer: run a model larger than free VRAM by keeping one layer resident at a time.

One page-locked host arena holds every layer; two device slots take turns. Layer i is copied
into slot i % 2 on the copy stream while layer i - 1 computes on the compute stream; CUDA events
order them:

    copy stream     [copy 0 -> s0][copy 1 -> s1]......[copy 2 -> s0]......
    compute stream                [compute 0 on s0   ][compute 1 on s1   ][compute 2 on s0]
                                   copy i waits for compute i-2 (its slot is free again)
                                   compute i waits for copy i (its data has arrived)

The schedule is a pure function (plan) so its slot-reuse rule is tested without a GPU; the
executor only follows it. The serial baseline uses the same allocations: copy, sync, compute,
sync. Runs under NUMBA_ENABLE_CUDASIM=1 (timings are then meaningless) and on a real GPU.
numba is imported only by the streamer itself (LayerStreamer, probe), never at worker start.
"""
import llama_cpp  # noqa: F401,I001  -- before numpy in every worker module (see engine.py)

import importlib.util
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Step:
    """One operation of the overlapped schedule."""

    op: str            # "copy" or "compute"
    layer: int
    slot: int
    waits_for: tuple   # (op, layer) pairs that must finish first


def plan(n_layers, n_slots=2):
    """The overlapped schedule: each copy waits for the compute that last used its slot."""
    steps = []
    for i in range(n_layers):
        slot = i % n_slots
        reuse = (("compute", i - n_slots),) if i >= n_slots else ()
        steps.append(Step("copy", i, slot, reuse))
        steps.append(Step("compute", i, slot, (("copy", i),)))
    return steps


def ideal_ms(copy_ms, compute_ms, n_slots=2):
    """The pipeline bound: the earliest finish given per-layer copy and compute times.

    copy i may start when copy i-1 is done and slot i % n_slots is free (compute i - n_slots
    done); compute i may start when copy i and compute i-1 are done.
    """
    copy_done, compute_done = [], []
    for i, (c, k) in enumerate(zip(copy_ms, compute_ms)):
        start = max(copy_done[-1] if copy_done else 0.0,
                    compute_done[i - n_slots] if i >= n_slots else 0.0)
        copy_done.append(start + c)
        compute_done.append(max(copy_done[-1], compute_done[-1] if compute_done else 0.0) + k)
    return compute_done[-1] if compute_done else 0.0


@dataclass
class RunResult:
    """Per-layer times (ms) and the wall time of one run."""

    copy_ms: list = field(default_factory=list)
    compute_ms: list = field(default_factory=list)
    total_ms: float = 0.0


def summarize(serial, overlapped):
    """The HEADLINE numbers from a serial and an overlapped run."""
    ideal = ideal_ms(overlapped.copy_ms, overlapped.compute_ms)
    return {"serial_ms": serial.total_ms, "overlapped_ms": overlapped.total_ms,
            "savings_pct": 100.0 * (1 - overlapped.total_ms / serial.total_ms)
            if serial.total_ms else 0.0,
            "speedup": serial.total_ms / overlapped.total_ms if overlapped.total_ms else 0.0,
            "ideal_ms": ideal,
            "efficiency": ideal / overlapped.total_ms if overlapped.total_ms else 0.0}


def headline(s):
    """The one line the demo prints."""
    return (f"HEADLINE: serial={s['serial_ms']:.2f} ms, overlapped={s['overlapped_ms']:.2f} ms, "
            f"savings={s['savings_pct']:.1f}%, speedup={s['speedup']:.3f}x, "
            f"ideal={s['ideal_ms']:.2f} ms, efficiency={s['efficiency']:.3f}")


def availability(cuda_device):
    """Whether the streamer can run on this worker, from cheap facts only: numba is installed
    (found, never imported: a worker starts without loading numba) and the worker runs on a
    CUDA device. A StreamingInfo map, for READY."""
    try:
        numba_found = importlib.util.find_spec("numba") is not None
    except (ImportError, ValueError):     # a broken or blocked numba
        numba_found = False
    if not numba_found:
        return {"available": False, "reason": "numba is not installed"}
    if not cuda_device:
        return {"available": False, "reason": "the worker runs on the CPU (no CUDA device)"}
    return {"available": True, "reason": "numba present, CUDA device"}


def probe():
    """What numba.cuda itself says (imports it): for the demo, which is about to use it.
    Under NUMBA_ENABLE_CUDASIM=1 the simulator counts as available."""
    try:
        from numba import cuda
    except Exception as exc:  # numba missing or broken
        return {"available": False, "reason": f"numba.cuda import failed: {exc}"}
    try:
        if cuda.is_available():
            return {"available": True, "reason": "cuda", "simulator": _simulated(cuda)}
        return {"available": False, "reason": "no CUDA driver or device"}
    except Exception as exc:
        return {"available": False, "reason": str(exc)}


def _simulated(cuda):
    return bool(getattr(cuda, "simulator_enabled", False)) or \
        type(cuda.stream()).__module__.startswith("numba.cuda.simulator")


class LayerStreamer:
    """Pinned arena + two device slots + two streams + per-layer events (numba.cuda)."""

    def __init__(self, layers, kernel):
        """layers: list of numpy arrays (one per layer, same dtype); kernel: a Kernel."""
        from numba import cuda
        import numpy as np
        self.cuda = cuda
        self.kernel = kernel
        self.n = len(layers)
        self.sizes = [a.size for a in layers]
        width = max(self.sizes)
        self.arena = cuda.pinned_array((self.n, width), dtype=layers[0].dtype)
        for i, a in enumerate(layers):
            self.arena[i, :a.size] = a.ravel()
        self.slots = [cuda.device_array(width, dtype=layers[0].dtype) for _ in range(2)]
        self.copy_stream, self.compute_stream = cuda.stream(), cuda.stream()
        self.np = np

    def _events(self):
        ev = self.cuda.event
        return {k: [ev() for _ in range(self.n)] for k in ("c0", "c1", "k0", "k1")}

    def _times(self, ev, start, end):
        res = RunResult()
        for i in range(self.n):
            res.copy_ms.append(ev["c0"][i].elapsed_time(ev["c1"][i]))
            res.compute_ms.append(ev["k0"][i].elapsed_time(ev["k1"][i]))
        res.total_ms = start.elapsed_time(end)
        return res

    def run_serial(self, state):
        """Copy, sync, compute, sync, layer by layer, in slot 0."""
        ev, cs, ks = self._events(), self.copy_stream, self.compute_stream
        start, end = self.cuda.event(), self.cuda.event()
        start.record(cs)
        for i in range(self.n):
            ev["c0"][i].record(cs)
            self.slots[0].copy_to_device(self.arena[i], stream=cs)
            ev["c1"][i].record(cs)
            cs.synchronize()
            ev["k0"][i].record(ks)
            self.kernel(self.slots[0], i, state, ks)
            ev["k1"][i].record(ks)
            ks.synchronize()
        end.record(ks)
        end.synchronize()
        return self._times(ev, start, end)

    def run_overlapped(self, state):
        """Follow plan(): copies on one stream, computes on the other, ordered by events."""
        ev, cs, ks = self._events(), self.copy_stream, self.compute_stream
        start, end = self.cuda.event(), self.cuda.event()
        start.record(cs)
        start.wait(ks)
        done = {}
        for step in plan(self.n):
            stream = cs if step.op == "copy" else ks
            for dep in step.waits_for:
                done[dep].wait(stream)
            if step.op == "copy":
                ev["c0"][step.layer].record(cs)
                self.slots[step.slot].copy_to_device(self.arena[step.layer], stream=cs)
                ev["c1"][step.layer].record(cs)
                done[("copy", step.layer)] = ev["c1"][step.layer]
            else:
                ev["k0"][step.layer].record(ks)
                self.kernel(self.slots[step.slot], step.layer, state, ks)
                ev["k1"][step.layer].record(ks)
                done[("compute", step.layer)] = ev["k1"][step.layer]
        end.record(ks)
        end.synchronize()
        return self._times(ev, start, end)


def blocks(n, threads=256):
    """Grid size for n threads."""
    return max(1, math.ceil(n / threads))

"""Helpers shared by the benchmark scripts: memory sampling, a GPU ballast, plotting, timing."""
import ctypes
import json
import os
import statistics
import subprocess
import sys
import threading
import time

BALLAST = r"""
import ctypes, sys
for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
    try:
        rt = ctypes.CDLL(name); break
    except OSError:
        rt = None
rt.cudaFree(ctypes.c_void_p(0))          # create this process's CUDA context first
print("INIT", flush=True)
nbytes = int(sys.stdin.readline())
ptr = ctypes.c_void_p()
rc = rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes))
print("READY" if rc == 0 else f"FAILED {rc}", flush=True)
sys.stdin.read()
"""


def start_broker(folder, models, *args, stderr=subprocess.DEVNULL):
    """lmx-broker on an ipc socket in `folder`, allowed to load the models' folders.

    Returns (process, endpoint, first STATUS reply) once the broker answers."""
    from lmx.broker.launch import start_broker as launch
    endpoint = f"ipc://{folder}/lmx.sock"
    dirs = sorted({os.path.dirname(os.path.abspath(m)) for m in models})
    proc, status = launch(["--state-dir", os.path.join(folder, "state"),
                           *sum((["--model-dir", d] for d in dirs), []), *args], endpoint,
                          stderr=stderr, timeout=600)
    return proc, endpoint, status


def nvml_handle(index=0):
    """An NVML handle, or None where there is no GPU."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:
        return None


def start_ballast(handle, leave_free, gpu=None):
    """A process holding device memory so that only `leave_free` bytes stay free (its own CUDA
    context is created before the free memory is read, so it is not counted in the card).

    gpu: the NVML index of `handle`'s GPU on a host of several; the ballast then sees only that
    GPU (CUDA_VISIBLE_DEVICES, in PCI order as NVML counts), else CUDA's first GPU gets it."""
    import pynvml
    env = None
    if gpu is not None:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), CUDA_DEVICE_ORDER="PCI_BUS_ID")
    proc = subprocess.Popen([sys.executable, "-c", BALLAST], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    if proc.stdout.readline().strip() != "INIT":
        raise RuntimeError("ballast could not initialise CUDA")
    free = pynvml.nvmlDeviceGetMemoryInfo(handle).free
    proc.stdin.write(f"{free - leave_free}\n")
    proc.stdin.flush()
    line = proc.stdout.readline().strip()
    if line != "READY":
        raise RuntimeError(f"ballast of {free - leave_free} bytes failed: {line}")
    return proc


class MemWatch(threading.Thread):
    """Samples every process's device memory (NVML) or the RSS of watched pids (CPU)."""

    def __init__(self, handle, interval=0.1):
        super().__init__(daemon=True)
        self.handle, self.interval = handle, interval
        self.samples, self.labels, self.pids = [], {}, set()
        self.t0 = time.monotonic()
        self.stop_flag = threading.Event()

    def watch(self, pid, label):
        self.labels[pid] = label
        self.pids.add(pid)

    def _read(self):
        if self.handle is not None:
            import pynvml
            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
            except pynvml.NVMLError:
                return {}
            return {p.pid: p.usedGpuMemory or 0 for p in procs}
        out = {}
        for pid in list(self.pids):
            try:
                with open(f"/proc/{pid}/status") as fh:
                    for line in fh:
                        if line.startswith("VmRSS:"):
                            out[pid] = int(line.split()[1]) * 1024
            except OSError:
                pass
        return out

    def run(self):
        while not self.stop_flag.is_set():
            self.samples.append((round(time.monotonic() - self.t0, 3), self._read()))
            time.sleep(self.interval)

    def mark(self):
        """Seconds since the watch started (for phase boundaries)."""
        return round(time.monotonic() - self.t0, 3)

    def stop(self):
        self.stop_flag.set()
        self.join()

    def series(self):
        """{label: [(t, bytes)]} for labelled pids."""
        out = {}
        for t, reading in self.samples:
            for pid, nbytes in reading.items():
                if pid in self.labels:
                    out.setdefault(self.labels[pid], []).append((t, nbytes))
        return out


def plot(panels, path, ylabel, limit=None):
    """panels: [(title, {label: [(t, bytes)]}, (t_start, t_end)[, [(t, mark label)]])] -> one
    PNG, a panel each, marks as dotted vertical lines; `limit` (bytes) draws the emulated
    card's size as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (title, series, (t0, t1), *marks) in zip(axes[0], panels):
        for label, points in sorted(series.items()):
            pts = [(t - t0, b / 2**20) for t, b in points if t0 <= t <= t1]
            if pts:
                ax.plot(*zip(*pts), label=label)
        if limit:
            ax.axhline(limit / 2**20, color="grey", linestyle="--", label="card")
        for t, text in (marks[0] if marks else []):
            ax.axvline(t - t0, color="black", linestyle=":", linewidth=0.8)
            ax.annotate(text, (t - t0, 1), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=6)
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def pct(values, q):
    """The q-th percentile (0-100) of values."""
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def median(values):
    return statistics.median(values)


def dump(obj, path):
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=str)


def load(path):
    with open(path) as fh:
        return json.load(fh)


def cudart():
    """libcudart through ctypes, or None."""
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def env_info():
    return {"python": sys.version.split()[0], "cpus": len(os.sched_getaffinity(0)),
            "date": time.strftime("%Y-%m-%d")}

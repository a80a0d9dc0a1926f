"""The device the worker runs on: NVML readings on a GPU, a declared size on CPU,
and host buffers for parked KV state (pinned with cudaHostAlloc when CUDA is there)."""
import ctypes
import logging
import os

log = logging.getLogger("lmx.worker")


class DeclaredDevice:
    """A CPU worker: llama.cpp runs on the host against a declared device size."""

    kind = "cpu"
    source = "declared"

    def __init__(self, total_bytes, others_file=None):
        self.total = int(total_bytes)
        self.others_file = others_file

    def _others(self):
        try:
            with open(self.others_file) as fh:
                return int(fh.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def read(self):
        """Totals as STATUS shows them; a declared device has no 'used' reading unless
        other processes are simulated (the CPU stand-in for NVML)."""
        if self.others_file:
            used = self._others()
            return {"kind": self.kind, "source": "declared+simulated",
                    "name": "cpu (declared size)", "total_bytes": self.total,
                    "used_bytes": used, "free_bytes": self.total - used, "process_bytes": 0}
        return {"kind": self.kind, "source": self.source, "name": "cpu (declared size)",
                "total_bytes": self.total, "used_bytes": None, "free_bytes": None,
                "process_bytes": None}


class NvmlDevice:
    """A CUDA GPU read through NVML (pynvml from nvidia-ml-py)."""

    kind = "cuda"
    source = "nvml"

    def __init__(self, index, declared_total=None):
        import pynvml
        self._nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.index = index
        name = pynvml.nvmlDeviceGetName(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else name
        nvml_total = pynvml.nvmlDeviceGetMemoryInfo(self.handle).total
        # A declared size below the card's emulates a smaller card (benchmarks, tests).
        self.total = min(nvml_total, declared_total) if declared_total else nvml_total

    def _process_bytes(self):
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self._nvml.NVMLError:
            return None
        return sum(p.usedGpuMemory or 0 for p in procs if p.pid == os.getpid())

    def read(self):
        """NVML total/used/free now, plus this process's own usage."""
        info = self._nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return {"kind": self.kind, "source": self.source, "name": self.name,
                "index": self.index, "total_bytes": self.total,
                "nvml_total_bytes": info.total, "used_bytes": info.used,
                "free_bytes": info.free, "process_bytes": self._process_bytes()}


def open_device(gpu_offload, gpu_index=0, declared_total=None, default_total=8 << 30,
                others_file=None):
    """NVML device when llama.cpp can offload and NVML sees a GPU, else a declared CPU device."""
    if gpu_offload:
        try:
            return NvmlDevice(gpu_index, declared_total)
        except Exception as exc:  # no driver, no device: run on CPU instead
            log.warning("worker: llama.cpp has GPU offload but NVML failed (%s); using CPU", exc)
    return DeclaredDevice(declared_total or default_total, others_file)


class HostBuffer:
    """A host buffer for parked state: pinned (cudaHostAlloc) when possible, else pageable.

    Freed buffers are kept (up to POOL_BYTES) and handed out again by get(): a new buffer
    costs more than the state's save (measured on the H200 with a 5.0 MB state in an 8 MiB
    buffer: park 8.3 ms with a new pinned buffer, 7.1 ms with a new pageable one, whose pages
    fault in on first use, 2.3 ms with a pooled one of either kind; restore 1.0 ms from pinned,
    1.6 ms from pageable; cudaHostAlloc + cudaFreeHost 1.5 ms for 4 MiB, 3.1 ms for 8 MiB).
    Buffers up to CLASS_MAX are allocated in power-of-two sizes (as PyTorch's pinned host
    allocator does), so a conversation whose state grew since its last park still finds a
    pooled buffer; a buffer holds at most twice its state. The pool is host memory outside
    the park budget (which counts the states' bytes), at most POOL_BYTES."""

    _cudart = None
    _cudart_tried = False
    POOL_BYTES = 256 << 20
    CLASS_MIN, CLASS_MAX = 64 << 10, 64 << 20
    _pool = []                      # freed buffers, smallest first
    _pooled = 0

    @classmethod
    def size_class(cls, nbytes):
        """The bytes allocated for a state of nbytes: the next power of two (at least
        CLASS_MIN) up to CLASS_MAX, the exact size above."""
        if nbytes > cls.CLASS_MAX:
            return nbytes
        return max(cls.CLASS_MIN, 1 << (nbytes - 1).bit_length())

    @classmethod
    def get(cls, nbytes, pinned):
        """A buffer of at least nbytes: a pooled one of its size class (above CLASS_MAX: at
        most a quarter larger), or a new one."""
        want = cls.size_class(nbytes)
        for i, buf in enumerate(cls._pool):
            fits = buf.size == want if want <= cls.CLASS_MAX else \
                nbytes <= buf.size <= nbytes + nbytes // 4
            if buf.pinned_asked == pinned and fits:
                del cls._pool[i]
                cls._pooled -= buf.size
                buf.nbytes = nbytes
                return buf
        buf = cls(want, pinned)
        buf.nbytes = nbytes
        return buf

    @classmethod
    def drain(cls):
        """Really free every pooled buffer."""
        pool, cls._pool, cls._pooled = cls._pool, [], 0
        for buf in pool:
            buf._release()

    def __init__(self, nbytes, pinned):
        self.nbytes = self.size = nbytes
        self.pinned_asked = pinned
        self.pinned = False
        self._ptr = None
        if pinned and self._load_cudart() is not None:
            ptr = ctypes.c_void_p()
            if self._cudart.cudaHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes), 0) == 0:
                self._ptr, self.pinned = ptr, True
        if self._ptr is None:
            self._array = (ctypes.c_uint8 * nbytes)()
            self._ptr = ctypes.cast(self._array, ctypes.c_void_p)
        self.data = ctypes.cast(self._ptr, ctypes.POINTER(ctypes.c_uint8))

    @classmethod
    def _load_cudart(cls):
        if not cls._cudart_tried:
            cls._cudart_tried = True
            for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
                try:
                    cls._cudart = ctypes.CDLL(name)
                    break
                except OSError:
                    continue
            if cls._cudart is None:
                log.warning("worker: libcudart not found; parked state uses pageable memory")
        return cls._cudart

    def free(self):
        """Give the buffer back: to the pool while it has room, else to the system."""
        cls = type(self)
        if self._ptr is not None and cls._pooled + self.size <= cls.POOL_BYTES:
            cls._pool.append(self)
            cls._pool.sort(key=lambda b: b.size)
            cls._pooled += self.size
            return
        self._release()

    def _release(self):
        """Return the memory (cudaFreeHost for pinned buffers)."""
        if self.pinned and self._ptr is not None:
            self._cudart.cudaFreeHost(self._ptr)
        self._ptr = self.data = None
        self._array = None

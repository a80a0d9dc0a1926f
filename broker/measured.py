"""What the worker really allocated, remembered on disk so the next REGISTER books the truth.

Keys are (file fingerprint, device kind, the parameters that change the figure); values are
measured bytes plus the reconciliation margin. The file is JSON, rewritten atomically.
"""
import json
import logging
import os

from lmx.common.files import write_atomic

log = logging.getLogger("lmx.broker")


def with_margin(measured, percent):
    """measured bytes plus the reconciliation margin (at least 1 MiB); nothing for nothing."""
    if measured <= 0:
        return 0
    return measured + max(measured * percent // 100, 1 << 20)


class MeasuredCache:
    """A small on-disk map of measured booking figures."""

    def __init__(self, path):
        self.path = path
        self.data = {}
        if path and os.path.exists(path):
            try:
                with open(path) as fh:
                    self.data = json.load(fh)
            except (OSError, ValueError) as exc:
                log.warning("measured: ignoring unreadable cache %s (%s)", path, exc)

    @staticmethod
    def _wkey(fp, device, spec):
        return f"{fp}|weights|{device}|ngl={spec.n_gpu_layers if device == 'cuda' else 0}"

    @staticmethod
    def _ckey(fp, device, spec):
        d = spec.as_dict()
        d.pop("n_gpu_layers")
        return f"{fp}|context|{device}|" + json.dumps(d, sort_keys=True)

    def lookup_weights(self, fp, device, spec):
        return self.data.get(self._wkey(fp, device, spec))

    def lookup_context(self, fp, device, spec):
        return self.data.get(self._ckey(fp, device, spec))

    def store_weights(self, fp, device, spec, nbytes):
        self._store(self._wkey(fp, device, spec), nbytes)

    def store_context(self, fp, device, spec, nbytes):
        self._store(self._ckey(fp, device, spec), nbytes)

    def _store(self, key, nbytes):
        self.data[key] = int(nbytes)
        if self.path:
            write_atomic(self.path, json.dumps(self.data, indent=0, sort_keys=True))

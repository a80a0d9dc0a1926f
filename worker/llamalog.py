"""Capture llama.cpp's log: route it to `logging` and keep the buffer-size lines and errors."""
import ctypes
import logging
import re

import llama_cpp

log = logging.getLogger("lmx.llama")
# e.g. "load_tensors:   CPU_Mapped model buffer size =    93.80 MiB"
_BUFFER_RE = re.compile(r"(\S+)\s+(model|KV|compute|output|RS) buffer size =\s*([0-9.]+) MiB")
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_ERROR, _CONT = 4, 5  # GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT
# llama.cpp keeps the last callback installed for the whole process: every callback ever
# installed stays alive, so a collected LlamaLog (a closed Engine) never leaves it dangling.
_INSTALLED = []


class LlamaLog:
    """Installs itself as llama.cpp's log callback; keeps a reference so it is not collected."""

    def __init__(self):
        self._partial = ""
        self._level = 2
        self._lines = []
        self._callback = llama_cpp.llama_log_callback(self._on_log)
        _INSTALLED.append(self._callback)
        self._install()

    def _install(self):
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level, text, _user):
        if level != _CONT:
            self._level = level
        chunk = text.decode("utf-8", "replace") if text else ""
        self._partial += chunk
        while "\n" in self._partial:
            line, self._partial = self._partial.split("\n", 1)
            # Keep what buffers() and last_error() read: a context creation logs ~1,000 lines.
            if self._level >= _ERROR or "buffer size =" in line:
                self._lines.append((self._level, line))
            # llama.cpp's INFO is chatty (every buffer, every tensor): keep it at DEBUG here.
            level = _LEVELS.get(self._level, logging.DEBUG) if self._level >= 3 \
                else logging.DEBUG
            if log.isEnabledFor(level):
                log.log(level, "%s", line)

    def reset(self):
        """Forget lines seen so far and take the log over again (another Engine in this
        process may have installed its own); call before a load or context creation."""
        self._install()
        self._lines.clear()

    def buffers(self):
        """Buffer sizes reported since reset(): {'CPU_Mapped model': bytes, ...}."""
        out = {}
        for _level, line in self._lines:
            m = _BUFFER_RE.search(line)
            if m:
                key = f"{m.group(1)} {m.group(2)}"
                out[key] = out.get(key, 0) + int(float(m.group(3)) * (1 << 20))
        return out

    def last_error(self):
        """The error-level lines since reset(), root cause first, joined; or ''."""
        errors = [line.strip() for level, line in self._lines if level == _ERROR]
        return "; ".join(dict.fromkeys(errors))

"""Start an `lmx-gateway` process on a free loopback port and wait until it answers: the one
helper the gateway's tests, its benchmark and examples/three_agents.py use."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port():
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_config(models, keys=(), gateway=None, cors=None):
    """TOML text: models {alias: {model, n_ctx, ...}}, keys [(name, key, [models])]."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return str(v)

    lines = ["[gateway]"] + [f"{k} = {value(v)}" for k, v in (gateway or {}).items()]
    for alias, entry in models.items():
        lines += [f"[models.{alias}]"] + [f"{k} = {value(v)}" for k, v in entry.items()]
    for name, key, allowed in keys:
        lines += ["[[keys]]", f"name = {value(name)}", f"key = {value(key)}",
                  f"models = {value(allowed)}"]
    if cors:
        lines += ["[cors]", f"allow_origins = {value(cors)}"]
    return "\n".join(lines) + "\n"


class GatewayProc:
    """`python -m lmx.gateway.main` against a broker endpoint, with a config file."""

    def __init__(self, folder, endpoint, config_text, name="gw", wait=True, args=()):
        self.dir = Path(folder)
        self.config = self.dir / f"{name}.toml"
        self.config.write_text(config_text)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.dir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "lmx.gateway.main", "--broker", endpoint, "--listen",
               f"127.0.0.1:{self.port}", "--config", str(self.config), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
        if wait:
            self.wait_listening()

    def wait_listening(self, timeout=30.0):
        """Poll GET /health until the server answers (any status)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"lmx-gateway exited with {self.proc.returncode}:\n"
                                     f"{self.read_log()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=3.0).close()
                return
            except urllib.error.HTTPError:
                return                               # it answers (503: no broker yet)
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"lmx-gateway did not listen within {timeout} s:\n"
                             f"{self.read_log()}")

    def read_log(self):
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        """SIGTERM; it must exit by itself."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"lmx-gateway ignored SIGTERM:\n{self.read_log()}")
        self.log.close()

"""Fixtures: the real models, a model table, and real lmx-broker processes (started and
waited for by lmx.broker.launch.start_broker, as the benchmarks and bin/walk.py do)."""
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from lmx.broker.launch import start_broker
from lmx.common.client import Client

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("LMX_MODELS", ROOT / "models"))
SMOL = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = MODELS / "gemma-3-270m-q4_k_m.gguf"


def _need(path):
    if not path.exists():
        pytest.fail(f"{path} is missing: run `lmx-fetch-models {MODELS}` first")
    return str(path)


@pytest.fixture(scope="session")
def smol_path():
    return _need(SMOL)


@pytest.fixture(scope="session")
def gemma_path():
    return _need(GEMMA)


def wait_until(predicate, timeout=30.0, interval=0.05, what="condition"):
    """Poll predicate until it returns truthy; fail with `what` after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class BrokerProc:
    """A real `lmx-broker` process (with its real worker subprocess) on an ipc endpoint."""

    def __init__(self, tmp, args, name="b", model_dirs=None, endpoint=None, curve=None):
        self.dir = Path(tmp)
        self.endpoint = endpoint or f"ipc://{self.dir}/{name}.sock"
        self.log_path = self.dir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        # Tests register real models and files they write under the temp dir.
        dirs = [str(MODELS), tempfile.gettempdir()] if model_dirs is None else model_dirs
        cmd = ["--threads", "2", "--state-dir", str(self.dir / f"{name}-state"),
               *sum((["--model-dir", d] for d in dirs), []), *args]
        self.curve = curve
        try:
            self.proc, _ = start_broker(cmd, self.endpoint, stdout=self.log,
                                        stderr=subprocess.STDOUT, curve=curve)
        except RuntimeError as exc:         # start_broker has stopped and reaped it
            log = self.read_log()
            self.log.close()
            raise AssertionError(f"{exc}:\n{log}") from None

    def client(self, timeout=60.0, curve=None, key=None):
        return Client(self.endpoint, timeout=timeout, curve=curve or self.curve, key=key)

    def status(self):
        with self.client() as c:
            return c.request("STATUS")

    def read_log(self):
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        """SIGTERM the broker; it must exit cleanly and take its worker with it."""
        pid = None
        if self.proc.poll() is None:
            try:
                pid = self.status()["worker_pid"]
            except Exception:
                pid = None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"broker ignored SIGTERM:\n{self.read_log()}")
        self.log.close()
        if pid:
            wait_until(lambda: not _pid_alive(pid), 15, what=f"worker {pid} to exit")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def broker_factory(tmp_path):
    """Start brokers with given args; all are stopped (and checked) at teardown."""
    started = []

    def start(*args, name="b", **kw):
        b = BrokerProc(tmp_path, list(args), name=name, **kw)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()


@pytest.fixture(scope="module")
def table(tmp_path_factory, smol_path, gemma_path):
    """A model table with the two real models, plus a truncated copy of SmolLM2."""
    folder = tmp_path_factory.mktemp("table")
    broken = folder / "truncated.gguf"
    with open(smol_path, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read(4 << 20))
    path = folder / "models.txt"
    path.write_text(f"smol {smol_path} 256MiB\ngemma {gemma_path} 512MiB\n"
                    f"broken {broken} 256MiB\nghost {folder / 'absent.gguf'} 256MiB\n")
    return path


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory, table):
    """One broker for tests that leave it as they found it."""
    b = BrokerProc(tmp_path_factory.mktemp("shared"),
                   ["--vram-table", str(table), "--vram-total", "8GiB"])
    yield b
    b.stop()



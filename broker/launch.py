"""Start an lmx-broker process and wait until it answers: the one helper that tests,
benchmarks and bin/walk.py use."""
import os
import subprocess
import sys
import time

from lmx.common.client import Client, LmxTimeout
from lmx.common.errors import LmxError

TRY_S = 0.5              # one STATUS try
GRACE_S = 15.0           # SIGTERM -> exit: the broker stops its worker (it waits up to 10 s)


def start_broker(args, endpoint, *, stdout=None, stderr=None, timeout=60.0, curve=None,
                 env=None):
    """Run `python -m lmx.broker.main --endpoint ENDPOINT ARGS...` and return (process, its
    first STATUS reply) once it answers.

    RuntimeError if something already answers on endpoint (its STATUS would be taken for
    ours), if the process exits first (with its exit code), or if it does not answer within
    timeout. On any failure the process is stopped (SIGTERM, so that it stops its worker;
    SIGKILL after GRACE_S) and reaped: nothing is left behind."""
    if _answers(endpoint, curve):
        raise RuntimeError(f"something already answers on {endpoint}")
    cmd = [sys.executable, "-m", "lmx.broker.main", "--endpoint", endpoint, *args]
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
    try:
        return proc, wait_answering(proc, endpoint, timeout, curve)
    except BaseException:
        stop(proc)
        raise


def wait_answering(proc, endpoint, timeout=60.0, curve=None):
    """Poll STATUS until the broker answers; RuntimeError if the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"lmx-broker exited with {proc.returncode} before answering")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"lmx-broker did not answer on {endpoint} within {timeout:g} s")
        try:
            with Client(endpoint, timeout=TRY_S, curve=curve) as c:
                return c.request("STATUS")
        except (LmxTimeout, LmxError):
            time.sleep(0.05)


def stop(proc, grace=GRACE_S):
    """SIGTERM, then SIGKILL after grace seconds; always reaps the process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def _answers(endpoint, curve):
    """Whether a broker already answers STATUS on endpoint (an ipc socket file must exist)."""
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://"):]):
        return False
    try:
        with Client(endpoint, timeout=TRY_S, curve=curve) as c:
            c.request("STATUS")
        return True
    except (LmxTimeout, LmxError):
        return False

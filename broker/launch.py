"""Start an lmx-broker process and wait until it answers: the one helper that tests,
benchmarks and bin/walk.py use."""
import subprocess
import sys
import time

from lmx.common.client import Client, LmxTimeout
from lmx.common.errors import LmxError


def start_broker(args, endpoint, *, stdout=None, stderr=None, timeout=60.0, curve=None,
                 env=None):
    """Run `python -m lmx.broker.main --endpoint ENDPOINT ARGS...` and return (process, its
    first STATUS reply) once it answers; RuntimeError (the process killed) if it exits first
    or does not answer within timeout."""
    cmd = [sys.executable, "-m", "lmx.broker.main", "--endpoint", endpoint, *args]
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
    try:
        return proc, wait_answering(proc, endpoint, timeout, curve)
    except BaseException:
        if proc.poll() is None:
            proc.kill()                 # never leave a broker (and its worker) behind
        proc.wait()
        raise


def wait_answering(proc, endpoint, timeout=60.0, curve=None):
    """Poll STATUS until the broker answers; RuntimeError if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lmx-broker exited with {proc.returncode} before answering")
        try:
            with Client(endpoint, timeout=0.5, curve=curve) as c:
                return c.request("STATUS")
        except (LmxTimeout, LmxError):
            time.sleep(0.05)
    raise RuntimeError(f"lmx-broker did not answer on {endpoint} within {timeout:g} s")

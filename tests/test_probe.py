"""lmx-probe as a user runs it: readable output, --json, exit status, --timeout."""
import json
import subprocess
import sys

PROBE = [sys.executable, "-m", "lmx.common.probe"]


def probe(endpoint, *args, timeout=60):
    return subprocess.run([*PROBE, "--endpoint", endpoint, *args], capture_output=True,
                          text=True, timeout=timeout)


def test_walk_through_the_probe(shared_broker):
    ep = shared_broker.endpoint
    r = probe(ep, "REGISTER", "p1", "smol")
    assert r.returncode == 0, r.stderr
    assert "status: ok" in r.stdout and "model_booked_bytes: 268435456" in r.stdout
    r = probe(ep, "DECODE", "p1", "8", "Hello, my name is")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    for key in ("prompt_tokens", "generated_tokens", "stopped_on_eos", "elapsed_ms",
                "kv_swap_evicted", "kv_swap_restored"):
        assert any(line.startswith(f"{key}: ") for line in lines), key
    assert lines[-1].startswith("text: ") or any(line.startswith("text: ") for line in lines)
    r = probe(ep, "--json", "DECODE", "p1", "4", "and then")
    reply = json.loads(r.stdout)
    assert reply["status"] == "ok" and reply["generated_tokens"] == 4
    r = probe(ep, "--json", "STATUS")
    status = json.loads(r.stdout)
    assert r.stdout.count("\n") == 1
    for key in ("ledger_max_bytes", "ledger_allocated_bytes", "device_total_bytes",
                "worker_pid", "worker_state"):
        assert key in status
    r = probe(ep, "list")                          # verbs are case-insensitive
    assert "agent: p1" in r.stdout
    assert probe(ep, "UNREGISTER", "p1").returncode == 0


def test_error_reply_exits_non_zero_with_code(shared_broker):
    r = probe(shared_broker.endpoint, "--json", "DECODE", "ghost", "4", "hi")
    assert r.returncode == 1
    reply = json.loads(r.stdout)
    assert reply["status"] == "error" and reply["code"] == "UNKNOWN_AGENT" and reply["message"]
    r = probe(shared_broker.endpoint, "REGISTER", "x", "nosuchkey")
    assert r.returncode == 1 and "code: MODEL_ERROR" in r.stdout
    assert "reason: UNKNOWN_KEY" in r.stdout


def test_help_and_usage(shared_broker):
    r = probe(shared_broker.endpoint, "HELP")
    assert r.returncode == 0 and "REGISTER" in r.stdout
    r = subprocess.run([*PROBE, "DECODE", "only-agent"], capture_output=True, text=True)
    assert r.returncode == 2


def test_timeout_when_no_broker(tmp_path):
    r = probe(f"ipc://{tmp_path}/nobody.sock", "--timeout", "0.5", "STATUS", timeout=30)
    assert r.returncode == 3 and "no reply" in r.stderr

"""The ledger tells the truth: estimator bookings, measured reconciliation, live device readings."""
import json
import subprocess
import sys
import time

import pytest

from conftest import wait_until
from lmx.common.errors import Code, LmxError, Reason


def agent_row(c, name):
    return next(a for a in c.list_agents() if a["agent"] == name)


def test_bookings_are_reconciled_to_measured_and_remembered(broker_factory, tmp_path,
                                                            gemma_path):
    state = tmp_path / "state"
    args = ("--state-dir", str(state), "--measure-margin", "5")
    broker = broker_factory(*args)
    with broker.client() as c:
        reg = c.register("g", gemma_path, n_ctx=4096)
        assert reg["weights_source"] == "estimator" and reg["estimate_source"] == "estimator"
        model = c.request("STATUS")["models"][0]
        # Loading measured the weights (on CPU that includes llama.cpp's CPU_REPACK buffer).
        assert model["measured_bytes"] > 0 and model["estimated_bytes"] > 0
        assert model["booked_bytes"] == model["measured_bytes"] + max(
            model["measured_bytes"] * 5 // 100, 1 << 20)
        # REGISTER seated g: its group's context (one seat) was built and measured.
        row = agent_row(c, "g")
        s = c.request("STATUS")
        (group,) = s["groups"]
        measured = row["measured_bytes"]
        assert measured > 0 and row["booked_bytes"] == group["seat_bytes"]   # the seat: KV
        compute = measured - row["booked_bytes"]     # the rest of the context: compute
        assert group["booked_bytes"] == compute + max(compute * 5 // 100, 1 << 20)
        # The estimate was within 15 % of what llama.cpp allocated for the context.
        assert 0 <= row["estimated_bytes"] - measured <= 0.15 * measured
        assert s["ledger_allocated_bytes"] == sum(s["bookings"].values()) == \
            model["booked_bytes"] + group["booked_bytes"] + row["booked_bytes"]
        # Same file, same parameters: the next agent's estimate is the measured context.
        again = c.register("g2", gemma_path, n_ctx=4096)
        assert again["estimate_source"] == "measured"
        assert again["booked_bytes"] == row["booked_bytes"]     # a seat, in the same group
        assert c.request("STATUS")["groups"][0]["seats_used"] == 2
        other = c.register("g3", gemma_path, n_ctx=8192)
        assert other["estimate_source"] == "estimator"
    broker.stop()
    cache = json.loads((state / "measured.json").read_text())
    assert len(cache) == 3 and all(v > 0 for v in cache.values())   # weights, two contexts
    # A new broker books the remembered weights too.
    again = broker_factory(*args, name="b2")
    with again.client() as c:
        assert c.register("h", gemma_path, n_ctx=4096)["weights_source"] == "measured"


def test_register_parameters_are_honoured(shared_broker, smol_path):
    with shared_broker.client() as c:
        r = c.request("REGISTER", agent="p", model="smol", n_ctx=4096, flash_attn=False,
                      type_k="q8_0", type_v="f16", swa_full=True)
        try:
            row = agent_row(c, "p")
            assert row["spec"]["flash_attn"] is False and row["spec"]["type_k"] == "q8_0"
            assert row["n_ctx"] == 4096 and r["estimate"]["kv"] > 0
            assert c.decode("p", "Hello", 3)["generated_tokens"] >= 1
            measured = agent_row(c, "p")["measured_bytes"]
            # KV of q8_0 K + f16 V at 4096 cells: 30 layers x 192 x (34/32 + 2) bytes
            assert measured >= 4096 * 30 * (192 * 34 // 32 + 192 * 2)
        finally:
            c.unregister("p")
        with pytest.raises(LmxError) as info:
            c.request("REGISTER", agent="q", model="smol", flash_attn=False, type_v="q8_0")
        assert info.value.code == Code.BAD_REQUEST and info.value.details["field"] == "type_v"
        with pytest.raises(LmxError) as info:
            c.request("REGISTER", agent="q", model="smol", type_k="q3_x")
        assert info.value.reason == Reason.BAD_VALUE


def test_other_processes_lower_the_cap_but_never_evict(broker_factory, tmp_path, table):
    others = tmp_path / "others"
    others.write_text("0")
    broker = broker_factory("--vram-table", str(table), "--vram-total", "2GiB",
                            "--simulate-others", str(others), "--heartbeat", "0.2",
                            "--others-margin", "64MiB")
    with broker.client() as c:
        c.register("first", "smol")
        # Another process grows to 1.6 GiB: 2 GiB - 1.6 GiB - 64 MiB is below what is booked.
        others.write_text(str(int(1.6 * (1 << 30))))
        wait_until(lambda: c.request("STATUS")["external_bytes"] == int(1.6 * (1 << 30)),
                   what="the new device reading")
        with pytest.raises(LmxError) as info:
            c.register("second", "smol")
        err = info.value
        assert (err.code, err.reason) == (Code.VRAM_LEDGER_DENY, Reason.OTHER_PROCESSES)
        assert err.details["ledger_max_bytes"] == (2 << 30) - int(1.6 * (1 << 30)) - (64 << 20)
        # The admitted agent keeps working.
        assert c.decode("first", "Hello", 2)["generated_tokens"] >= 1
        assert agent_row(c, "first")["state"] == "ready"
        others.write_text("0")
        wait_until(lambda: c.request("STATUS")["external_bytes"] == 0, what="memory freed")
        c.register("second", "smol")
        status = c.request("STATUS")
        assert status["ledger_max_bytes"] == status["ledger_percent_cap_bytes"]


def test_lmx_estimate_cli(gemma_path):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lmx.broker.estimate_cli", gemma_path,
                        "--n-ctx", "4096", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - t0 < 5          # the reading itself is reported below
    out = json.loads(r.stdout)
    assert out["elapsed_ms"] < 1000
    assert out["kv"] == 27 * (1 << 20)           # 3 global layers x 4096 + 15 SWA x 1024 cells
    assert out["device_total"] == out["weights_device"] + out["kv"] + out["compute"] + \
        out["overhead"]
    full = json.loads(subprocess.run([sys.executable, "-m", "lmx.broker.estimate_cli",
                                      gemma_path, "--n-ctx", "4096", "--swa-full", "--json"],
                                     capture_output=True, text=True).stdout)
    assert full["kv"] == 72 * (1 << 20)
    text = subprocess.run([sys.executable, "-m", "lmx.broker.estimate_cli", gemma_path],
                          capture_output=True, text=True).stdout
    assert "KV cache" in text and "device total" in text
    bad = subprocess.run([sys.executable, "-m", "lmx.broker.estimate_cli", gemma_path,
                          "--no-flash-attn", "--type-v", "q8_0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "flash_attn" in bad.stderr

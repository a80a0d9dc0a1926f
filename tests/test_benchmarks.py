"""The benchmark scripts in a tiny CPU mode, so they cannot rot (their GPU figures live in
benchmarks/README.md)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from ggufs import write_shaped

BENCH = ROOT / "benchmarks"


def run(script, *args, timeout=600):
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                       text=True, timeout=timeout, cwd=str(ROOT))
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_path):
    d = tmp_path_factory.mktemp("bench")
    return [str(write_shaped(d / f"m{i}.gguf", smol_path, n_layer=2, n_embd=e, n_head=4,
                             n_head_kv=2, n_ff=2 * e, seed=i)) for i, e in enumerate((64, 96, 128))]


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory, smol_path):
    """Three tiny models with 32-wide heads (a q8_0 KV cache needs a multiple of 32)."""
    d = tmp_path_factory.mktemp("bench32")
    return [str(write_shaped(d / f"h{i}.gguf", smol_path, n_layer=2, n_embd=e, n_head=4,
                             n_head_kv=2, head_dim=32, n_ff=2 * e, seed=i))
            for i, e in enumerate((64, 96, 128))]


def test_track_ab_tiny(tiny32, tmp_path):
    """Tracks A and B in tiny mode; with parking, on a card where the three contexts cannot be
    live together, all three agents are served in both rounds, f16 and q8_0, within the cap."""
    out = tmp_path / "ab"
    text = run("track_ab.py", "--cpu", *sum((["--models", m] for m in tiny32), []), "--n-ctx",
               "2048", "--alt-n-ctx", "512", "--card", "256MiB", "--parking-n-ctx", "16384",
               "--parking-card", "76MiB", "--out", str(out))
    r = json.loads((out / "results.json").read_text())
    assert [row["survived"] for row in r["track_a"]] == [True, True, True]
    phases = r["track_b"]["phases"]
    assert [p["n_ctx"] for p in phases] == [2048, 2048, 512]
    assert all(a["register"]["status"] == "ok" and a["decode"]["status"] == "ok"
               for a in phases[2]["agents"])
    assert (out / "tracks.png").stat().st_size > 10_000
    assert "B n_ctx=   512" in text
    assert [p["kv"] for p in r["track_p"]["phases"]] == ["f16", "q8_0"]
    for ph in r["track_p"]["phases"]:
        _check_parking_phase(ph)
    assert [m[1] for m in r["track_p"]["marks"]][:3] == ["f16: register", "f16: round 1",
                                                         "f16: round 2"]
    assert "P   agent" in text and "yes/yes" in text


def _check_parking_phase(ph):
    """Every agent registered and served in both rounds; parked and restored; never over cap."""
    agents = [g["agent"] for g in ph["registers"]]
    assert [g["status"] for g in ph["registers"]] == ["ok"] * 3
    assert [q["agent"] for q in ph["requests"]] == agents * 2
    assert all(q["status"] == "ok" and q["generated_tokens"] > 0 for q in ph["requests"])
    k = ph["counts"]
    assert k["most_live"] < 3                       # the card cannot hold all three at once
    assert k["parks"] >= 1 and k["restores"] >= 1 and k["refusals"] == []
    round2 = ph["requests"][3:]
    assert all(not q["live_before"] and q["restored"] for q in round2)
    assert all(q["first_token_ms"] > 0 for q in ph["requests"])
    assert k["over_cap"] == 0
    assert all(r["allocated"] <= r["cap"] for r in ph["registers"] + ph["requests"])


def test_overheads_tiny(tiny, tmp_path):
    out = tmp_path / "over"
    text = run("overheads.py", "--cpu", "--model", tiny[0], "--n-ctx", "512", "--n-predict", "8",
               "--repeats", "1", "--state-tokens", "64", "--rtt-requests", "200", "--threads",
               "2", "--out", str(out))
    r = json.loads((out / "results.json").read_text())
    names = [f["figure"] for f in r["figures"]]
    assert len(names) == 7 and all(f["value"] > 0 for f in r["figures"])
    assert "STATUS round trips/s lmx / raw echo, 100 agents" in names
    assert (out / "table.md").read_text().startswith("device:")
    assert "| DECODE tok/s lmx / raw |" in text


def test_estimate_accuracy_and_ledger_check_tiny(tiny, tmp_path):
    text = run("estimate_accuracy.py", tiny[0], "--n-ctx", "256", "--markdown", "--json-out",
               str(tmp_path / "acc.json"))
    rows = json.loads((tmp_path / "acc.json").read_text())["rows"]
    assert len(rows) == 2 and all(abs(r["kv_est"] - r["kv_real"]) <= 8192 for r in rows)
    assert "| model | n_ctx |" in text
    text = run("ledger_check.py", tiny[0], tiny[1], "--n-ctx", "512", "--broker-arg=--cpu")
    assert "context a1 (n_ctx 512)" in text


def test_soak_short(tiny, tmp_path):
    """100 simulated agents for a few seconds: ledger back to its start, no descriptor leak."""
    text = run("soak.py", "--cpu", "--agents", "100", "--seconds", "8", "--model", tiny[0],
               "--model", tiny[1], "--out", str(tmp_path))
    r = json.loads(text)
    assert r["ledger_back_to_start"] and r["broker_fds_delta"] == 0
    assert r["by_outcome"].get("DECODE ok", 0) > 50
    assert not any(k.endswith("TIMEOUT") or "INTERNAL" in k for k in r["by_outcome"])


def test_parallel_tiny(tiny, tmp_path):
    text = run("parallel.py", "--cpu", "--model", tiny[0], "--n", "1", "--n", "2",
               "--n-predict", "8", "--check", "2", "--out", str(tmp_path))
    got = json.loads((tmp_path / "parallel.json").read_text())
    rows = got["rows"]
    assert [r["n"] for r in rows] == [1, 2] and all(r["tokens"] >= r["n"] for r in rows)
    # batch: the most agents in one llama_decode step (2 when the two overlapped; the tiny
    # model's 8 tokens can be over before the second request arrives on a busy machine)
    assert [r["batch"] for r in rows][0] == 1 and rows[1]["batch"] in (1, 2)
    assert got["batched_equals_alone"] == 2          # CPU: batched greedy equals alone
    assert "| 2 |" in text and "batched vs alone: 2 of 2" in text


def test_park_check_tiny(tiny):
    out = json.loads(run("park_check.py", "--cpu", "--model", tiny[0], "--agents", "3",
                         "--first", "8", "--then", "6", "--json"))
    assert [r["parked"] for r in out["rows"]] == [None, "ram", "disk"]
    assert out["equal"] == 3 and all(r["restored"] for r in out["rows"][1:])
    out = json.loads(run("park_check.py", "--cpu", "--model", tiny[0], "--agents", "3",
                         "--first", "8", "--then", "6", "--park-ram", "0", "--json"))
    assert [r["parked"] for r in out["rows"]] == [None, "disk", "disk"]   # no host room: files
    assert out["park_ram"] == 0 and out["equal"] == 3


def test_engine_batch_tiny(tiny):
    text = run("engine_batch.py", "--cpu", "--model", tiny[0], "--n", "1", "--n", "2",
               "--n-predict", "8")
    assert "N=1: " in text and "N=2: " in text and "ratio 1.00" in text


def test_chat_bench_tiny(tiny):
    out = json.loads(run("chat_bench.py", "--cpu", "--model", tiny[0], "--template", "chatml",
                         "--turn-tokens", "200", "--widths", "2", "--tokens", "6",
                         "--repeats", "1", "--json"))
    r = out["reuse"]
    assert r["cached_tokens"] > 0 and r["fresh_cached_tokens"] == 0
    assert r["cached_tokens"] < r["prompt_tokens"] and r["speedup"] > 0
    [s] = out["sampling"]
    assert s["n"] == 2 and s["greedy_tok_s"] > 0 and s["sampled_tok_s"] > 0


def test_many_agents_tiny(tiny, tmp_path):
    """lmx against the raw loop, N = 2 and 4 streaming agents: every token counted, no
    context built during a round (the agents were seated by the warm-up)."""
    text = run("many_agents.py", "--cpu", "--model", tiny[0], "--n", "2", "--n", "4",
               "--n-ctx", "256", "--n-predict", "8", "--card", "1GiB", "--procs", "1",
               "--repeats", "2", "--broker-log", str(tmp_path / "broker.log"),
               "--out", str(tmp_path))
    got = json.loads((tmp_path / "many_agents.json").read_text())
    rows = got["rows"]
    assert set(got["raw"]) == {"2", "4"} and all(v > 0 for v in got["raw"].values())
    assert [rows[n]["tokens"] for n in ("2", "4")] == [16, 32]
    assert [rows[n]["population"] for n in ("2", "4")] == [2, 4]      # N registered per round
    assert all(rows[n]["context_builds"] == 0 for n in rows)
    assert all(len(rows[n]["rounds"]) == 2 and rows[n]["tok_s"] in
               [r["tok_s"] for r in rows[n]["rounds"]] for n in rows)
    assert "| 4 |" in text and (tmp_path / "many_agents.md").exists()
    assert "worker: loaded" in (tmp_path / "broker.log").read_text()      # the log was kept


def test_seat_bytes_tiny(tiny):
    out = json.loads(run("seat_bytes.py", "--cpu", "--model", tiny[0], "--agents", "4",
                         "--tokens", "8").strip().splitlines()[-1])
    assert out["states_equal_byte_for_byte"] == "2 of 2"
    assert out["restored_into_another_seat"] == "2 of 2"
    assert out["context_builds_during_parking"] == 0


def test_park_cost_tiny(tiny, tmp_path):
    """The park-cost probe on CPU: pageable buffers only, new and pooled, every agent parked
    and restored; its JSON is written."""
    run("park_cost.py", "--cpu", "--model", tiny[0], "--agents", "4", "--rounds", "1",
        "--parks", "2", "--n-ctx", "256", "--out", str(tmp_path))
    out = json.loads((tmp_path / "park_cost.json").read_text())
    assert out["device"] == "CPU" and sorted(k for k in out if k.startswith("pag")) == [
        "pageable_new", "pageable_pooled"] and "pinned_new" not in out
    assert all(out[k]["park_ms"] > 0 and out[k]["restore_ms"] > 0
               for k in ("pageable_new", "pageable_pooled"))
    assert out["state_bytes"] <= out["buffer_bytes"] < 2 * max(out["state_bytes"], 1 << 16)


def test_devices_x2_tiny(tiny, tmp_path, smol_path):
    """Two declared CPU devices, four models: placement uses both, the pin holds, the too-big
    agent is refused per device; the killed worker's agents and only they get WORKER_LOST, the
    other device's agents finish, and the killed device comes back and serves again."""
    fourth = str(write_shaped(tmp_path / "m3.gguf", smol_path, n_layer=2, n_embd=80, n_head=4,
                              n_head_kv=2, n_ff=160, seed=3))
    out = tmp_path / "dev"
    text = run("devices_x2.py", "--cpu", "--card", "256MiB",
               *sum((["--models", m] for m in [*tiny, fourth]), []), "--n-ctx", "2048",
               "--agents-per-model", "1", "--tokens", "1500", "--out", str(out))
    r = json.loads((out / "results.json").read_text())
    dec = r["decode"]
    where = dec["placement"]
    assert set(where.values()) == {0, 1}
    pinned = [x for x in r["register"] if x["pinned"] is not None]
    assert [where[x["agent"]] for x in pinned] == [1]
    big = r["register"][-1]
    assert (big["code"], [d["device"] for d in big["devices"]]) == ("VRAM_LEDGER_DENY", [0, 1])
    killed = dec["kill"]["device"]
    on_killed = sorted(a for a, d in where.items() if d == killed)
    failed = sorted(a for a, x in dec["agents"].items() if x["status"] != "ok")
    assert on_killed and failed == on_killed
    assert {dec["agents"][a]["code"] for a in failed} == {"WORKER_LOST"}
    others = [x for x in dec["agents"].values() if x["device"] != killed]
    assert others and all(x["stopped_by"] is None and x["generated_tokens"] > 0 and
                          x["tokens_after_kill"] > 0 for x in others)
    back = dec["respawn"]
    assert back["respawned_pid"] != dec["kill"]["pid"] and back["states"][-1][1] == "ready"
    assert back["after_loss"]["seats"] == [] and back["after_loss"]["models"]
    rec = r["recover"]
    assert sorted(rec["agents"]) == on_killed
    assert all(x["status"] == "ok" and x["device"] == killed and x["context_reset"]
               for x in rec["agents"].values())
    assert rec["fresh"]["device"] == killed and rec["fresh"]["decode"]["status"] == "ok"
    assert all(r["verdicts"].values()) and (out / "devices.png").stat().st_size > 10_000
    assert "yes: WORKER_LOST for exactly the killed device's agents" in text


def test_cold_start_tiny(tiny, tmp_path):
    """Both sides timed in every pair, the REGISTER split into the worker's load and build."""
    out = tmp_path / "cold"
    text = run("cold_start.py", "--cpu", "--model", tiny[0], "--pairs", "1", "--out", str(out))
    r = json.loads((out / "cold_start.json").read_text())
    (row,) = r["rows"]
    assert 0 < row["raw"]["load_s"] <= row["raw"]["cold_s"]
    assert 0 < row["lmx"]["load_s"] + row["lmx"]["build_s"] < row["lmx"]["register_s"] \
        < row["lmx"]["cold_s"]
    assert r["ratio"] == pytest.approx(row["lmx"]["cold_s"] / row["raw"]["cold_s"])
    assert "cold start lmx / raw" in text

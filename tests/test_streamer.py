"""The layer streamer: its schedule and pipeline bound as data, and the demo under the CUDA
simulator (NUMBA_ENABLE_CUDASIM=1) with tiny sizes. The GPU timings live in benchmarks/."""
import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmx.worker import streamer
from ggufs import write_shaped


@pytest.mark.parametrize("n", [1, 2, 3, 8, 17])
def test_plan_never_overwrites_a_slot_in_use(n):
    steps = streamer.plan(n)
    seen = set()
    for s in steps:
        assert s.slot == s.layer % 2
        for dep in s.waits_for:
            assert dep in seen, f"{s} waits for {dep}, which is not issued before it"
        if s.op == "compute":
            assert s.waits_for == (("copy", s.layer),)
        elif s.layer >= 2:
            # the copy into a slot waits for the compute that last read that slot
            assert s.waits_for == (("compute", s.layer - 2),)
            assert steps[[(x.op, x.layer) for x in steps].index(("compute", s.layer - 2))].slot \
                == s.slot
        else:
            assert s.waits_for == ()
        seen.add((s.op, s.layer))
    assert len(steps) == 2 * n


def test_ideal_of_balanced_layers_is_one_stage_longer_than_either():
    assert streamer.ideal_ms([2.0] * 8, [2.0] * 8) == pytest.approx(2.0 * 9)
    # copy-bound: the copies back to back plus the last compute
    assert streamer.ideal_ms([3.0] * 4, [1.0] * 4) == pytest.approx(3.0 * 4 + 1.0)
    # compute-bound: the first copy plus the computes back to back
    assert streamer.ideal_ms([1.0] * 4, [3.0] * 4) == pytest.approx(1.0 + 3.0 * 4)


@given(st.lists(st.tuples(st.floats(0.01, 50), st.floats(0.01, 50)), min_size=1, max_size=30))
def test_ideal_lies_between_the_bounds(pairs):
    copy, compute = zip(*pairs)
    ideal = streamer.ideal_ms(list(copy), list(compute))
    assert ideal <= sum(copy) + sum(compute) + 1e-9
    assert ideal >= max(sum(copy) + compute[-1], copy[0] + sum(compute)) - 1e-9


def test_headline_has_the_promised_shape():
    s = streamer.summarize(streamer.RunResult([1, 1], [1, 1], 4.0),
                           streamer.RunResult([1, 1], [1, 1], 3.2))
    line = streamer.headline(s)
    assert re.fullmatch(r"HEADLINE: serial=4\.00 ms, overlapped=3\.20 ms, savings=20\.0%, "
                        r"speedup=1\.250x, ideal=3\.00 ms, efficiency=0\.938", line), line


def demo(*args):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-m", "lmx.worker.stream_demo", "--json", *args],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_fma_demo_under_the_simulator():
    out = demo("--n-layers", "4", "--bytes-per-layer", "4096", "--compute-iters", "8",
               "--repeats", "1")
    assert out["config"]["simulator"] is True
    assert out["check"]["match"] is True
    assert len(out["overlapped"]["copy_ms"]) == len(out["serial"]["compute_ms"]) == 4


def test_gemv_chain_matches_numpy_under_the_simulator():
    out = demo("--kernel", "gemv", "--rows", "64", "--cols", "32", "--n-layers", "5",
               "--repeats", "1")
    assert out["check"]["match"] is True and out["check"]["max_rel_error"] < 1e-4
    assert out["config"]["shapes"] == [[64, 32], [32, 64], [64, 32], [32, 64], [64, 32]]


def test_gemv_with_a_real_ggufs_ffn_matrices(tmp_path, smol_path):
    path = write_shaped(tmp_path / "ffn.gguf", smol_path, n_layer=2, n_embd=32, n_head=2,
                        n_head_kv=1, n_ff=64)
    out = demo("--kernel", "gemv", "--gguf", str(path), "--n-layers", "4", "--repeats", "1")
    assert out["check"]["match"] is True
    assert out["config"]["shapes"] == [[64, 32], [32, 64], [64, 32], [32, 64]]


def test_demo_refuses_a_gguf_without_enough_layers(tmp_path, smol_path):
    path = write_shaped(tmp_path / "short.gguf", smol_path, n_layer=1, n_embd=32, n_head=2,
                        n_head_kv=1, n_ff=64)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-m", "lmx.worker.stream_demo", "--kernel", "gemv",
                        "--gguf", str(path), "--n-layers", "4"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 2 and "blk.1.ffn_up" in r.stderr


def test_availability_is_decided_from_cheap_facts():
    """On CPU never available; on a CUDA device available exactly when numba is installed.
    No GPU is assumed either way, and numba is not imported to decide."""
    import importlib.util
    cpu = streamer.availability(False)
    assert cpu["available"] is False and cpu["reason"]
    cuda = streamer.availability(True)
    assert cuda["available"] is (importlib.util.find_spec("numba") is not None)
    assert cuda["reason"]


BLOCKED = """
import sys
{block}
import lmx.worker.main as main
from lmx.worker.device import DeclaredDevice
ready = main.ready_device(DeclaredDevice(1 << 30))
assert ready["streaming"]["available"] is False, ready
cuda = main.streamer.availability(True)
assert "numba" not in sys.modules or sys.modules["numba"] is None, "numba was imported"
print(cuda["available"])
"""


@pytest.mark.parametrize("blocked", [True, False])
def test_a_worker_starts_without_importing_numba(blocked):
    """lmx.worker.main imports and builds READY's device map without numba: with numba
    blocked (sys.modules['numba'] = None) it says unavailable, otherwise numba stays
    unimported."""
    block = "sys.modules['numba'] = None" if blocked else ""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", BLOCKED.format(block=block)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    if blocked:
        assert r.stdout.strip() == "False"

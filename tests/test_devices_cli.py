"""lmx-broker's device options: --gpus (NVML mocked: no GPU here) and a repeatable
--vram-total become one worker configuration per device."""
import json
import sys
import types

import click
import pytest

from lmx.broker import main as broker_main
from lmx.broker import workers


def _config(args, tmp_path):
    ctx = broker_main.main.make_context("lmx-broker", [*args, "--state-dir", str(tmp_path)])
    return broker_main._config(ctx.params)


def test_gpus_all_counts_with_nvml_and_each_worker_sees_only_its_gpu(monkeypatch, tmp_path):
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 3)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    config = _config(["--gpus", "all", "--vram-total", "10GiB"], tmp_path)
    assert [(w.name, w.gpu_index, w.vram_total) for w in config.workers] == [
        (f"local:{i}", i, 10 << 30) for i in range(3)]
    assert config.gpus == (0, 1, 2)
    seen = {}

    def popen(cmd, env=None):
        seen.update(cmd=cmd, env=env)
    monkeypatch.setattr(workers.subprocess, "Popen", popen)
    workers.WorkerProcess(config.workers[2], gpu=2).spawn()
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "2"       # llama.cpp sees its GPU only
    assert seen["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # numbered as NVML numbers them
    sent = json.loads(seen["cmd"][seen["cmd"].index("--config") + 1])
    assert (sent["gpu_index"], sent["name"]) == (2, "local:2")   # NVML reads the same card


def test_gpus_by_index_take_one_size_per_gpu_or_refuse(tmp_path):
    config = _config(["--gpus", "1,3", "--vram-total", "4GiB", "--vram-total", "6GiB"],
                     tmp_path)
    assert [(w.gpu_index, w.vram_total) for w in config.workers] == [(1, 4 << 30),
                                                                     (3, 6 << 30)]
    with pytest.raises(click.UsageError, match="--gpus names 2 GPUs"):
        _config(["--gpus", "0,1", "--vram-total", "1GiB", "--vram-total", "2GiB",
                 "--vram-total", "3GiB"], tmp_path)
    for bad in ("zero", "0,0", "-1"):
        with pytest.raises(click.BadParameter):
            broker_main.main.make_context("lmx-broker", ["--gpus", bad])


def test_repeated_vram_totals_declare_cpu_devices_and_one_is_the_default(tmp_path):
    two = _config(["--vram-total", "1GiB", "--vram-total", "2GiB"], tmp_path)
    assert [(w.name, w.vram_total) for w in two.workers] == [("local:0", 1 << 30),
                                                            ("local:1", 2 << 30)]
    assert two.gpus == ()
    one = _config([], tmp_path)
    assert [(w.name, w.vram_total) for w in one.workers] == [("local:0", None)]


def test_gpus_all_without_nvml_is_a_clear_usage_error(monkeypatch):
    def broken():
        raise RuntimeError("NVML Shared Library Not Found")
    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=broken))
    with pytest.raises(click.BadParameter, match="needs NVML"):
        broker_main.main.make_context("lmx-broker", ["--gpus", "all"])


def test_the_swap_grace_and_the_turn_budget_reach_the_core_and_the_workers(tmp_path):
    config = _config(["--swap-grace-ms", "35", "--turn-tokens", "256", "--quantum", "3",
                      "--vram-total", "1GiB", "--vram-total", "2GiB"], tmp_path)
    assert config.swap_grace_s == 0.035
    assert [(w.turn_tokens, w.quantum) for w in config.local_workers()] == [(256, 3)] * 2
    assert _config(["--swap-grace-ms", "0"], tmp_path).swap_grace_s == 0
    with pytest.raises(click.BadParameter):
        broker_main.main.make_context("lmx-broker", ["--turn-tokens", "0"])

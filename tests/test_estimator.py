"""The estimator against llama.cpp's own reports on the CPU backend, shape by shape.

Weights and KV must equal llama.cpp's buffers (to the 0.01 MiB its log prints); the compute
buffer must be within [0, +15 %] of llama.cpp's. Real models plus generated GGUFs of other shapes.
"""
import pytest

from lmx.broker.estimator import estimate, shape_from_metadata, sizing
from lmx.broker.ggufmeta import read_metadata
from lmx.common.ctxspec import ContextSpec
from ggufs import write_shaped

LOG_ROUNDING = 8 << 10      # llama.cpp prints MiB with two decimals


@pytest.fixture(scope="module")
def engine():
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def shaped(tmp_path_factory, smol_path):
    d = tmp_path_factory.mktemp("shapes")
    return {
        "llama-gqa": write_shaped(d / "a.gguf", smol_path, n_layer=3, n_embd=256, n_head=8,
                                  n_head_kv=2, n_ff=768),
        "qwen2-bias-untied": write_shaped(d / "b.gguf", smol_path, arch="qwen2", n_layer=2,
                                          n_embd=128, n_head=4, n_head_kv=4, n_ff=512,
                                          bias=True, tied=False),
        "llama-hd128": write_shaped(d / "c.gguf", smol_path, n_layer=2, n_embd=256, n_head=4,
                                    n_head_kv=1, head_dim=128, n_ff=1024),
    }


def _parts(buffers, kind):
    return sum(v for k, v in buffers.items() if k.split()[1] == kind and "REPACK" not in k)


def specs(swa):
    out = []
    for n_ctx in (256, 2048, 8192):
        for fa in (True, False):
            for swa_full in ((False, True) if swa else (False,)):
                out.append(ContextSpec(n_ctx=n_ctx, flash_attn=fa, swa_full=swa_full))
        out.append(ContextSpec(n_ctx=n_ctx, type_k="q8_0", type_v="q8_0"))
    return out


def check_model(engine, path):
    shape = shape_from_metadata(read_metadata(path, with_tensors=True))
    cells = specs(any(shape.swa_layers))
    engine.register("e", str(path), cells[0])
    misses = []
    try:
        slot = engine.slots["e"]
        weights = _parts(slot.model.buffers, "model")
        for spec in cells:
            slot.spec, slot.n_ctx = spec, spec.n_ctx
            bufs = engine.measure("e").buffers
            est = estimate(shape, spec, "cpu")
            kv, compute = _parts(bufs, "KV"), _parts(bufs, "compute")
            if abs(est.weights_device - weights) > LOG_ROUNDING:
                misses.append((spec, "weights", est.weights_device, weights))
            if abs(est.kv - kv) > LOG_ROUNDING:
                misses.append((spec, "kv", est.kv, kv))
            if not compute <= est.compute <= compute * 1.15:
                misses.append((spec, "compute", est.compute, compute))
    finally:
        engine.unregister("e")
    return misses


def test_smollm2(engine, smol_path):
    assert check_model(engine, smol_path) == []


def test_gemma3_with_sliding_window(engine, gemma_path):
    assert check_model(engine, gemma_path) == []


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias-untied", "llama-hd128"])
def test_generated_shapes(engine, shaped, name):
    assert check_model(engine, shaped[name]) == []


def test_sizing_follows_llama_cpp_rules(gemma_path):
    shape = shape_from_metadata(read_metadata(gemma_path, with_tensors=True))
    assert shape.swa_layers.count(False) == 3           # layers 5, 11, 17 are global
    s = sizing(shape, ContextSpec(n_ctx=1000))
    assert (s.n_ctx, s.n_batch, s.n_ubatch, s.swa_cells) == (1024, 512, 512, 1024)
    s = sizing(shape, ContextSpec(n_ctx=300, n_batch=512))
    assert (s.n_ctx, s.n_batch, s.n_ubatch) == (512, 512, 512)
    assert sizing(shape, ContextSpec(n_ctx=8192, swa_full=True)).swa_cells == 8192
    assert sizing(shape, ContextSpec(n_ctx=8192)).swa_cells == 1024   # pad(512 + 512)


def test_cuda_placement_rules(smol_path):
    shape = shape_from_metadata(read_metadata(smol_path, with_tensors=True))
    spec = ContextSpec(n_ctx=4096)
    full = estimate(shape, spec, "cuda")
    embd = next(t for t in shape.tensors if t[0] == "token_embd.weight")
    from lmx.broker.estimator import tensor_bytes
    # token_embd stays on the host, and the tied output copy goes to the device
    assert full.weights_host == tensor_bytes(embd[1], embd[2])
    none = estimate(shape, ContextSpec(n_ctx=4096, n_gpu_layers=0), "cuda")
    assert none.weights_device == 0
    one = estimate(shape, ContextSpec(n_ctx=4096, n_gpu_layers=1), "cuda")
    assert one.weights_device == tensor_bytes(embd[1], embd[2], True) + \
        sum(tensor_bytes(ne, t, True) for n, ne, t in shape.tensors if n.startswith("output"))
    assert full.overhead > 0 and estimate(shape, spec, "cpu").overhead == 0


@pytest.mark.parametrize("n_seq", [2, 4])
def test_several_sequences_use_per_stream_caches(engine, smol_path, gemma_path, n_seq):
    for path in (smol_path, gemma_path):
        shape = shape_from_metadata(read_metadata(path, with_tensors=True))
        spec = ContextSpec(n_ctx=4096, n_seq=n_seq, n_outputs_max=n_seq)
        engine.register("s", path, spec)
        try:
            bufs = engine.measure("s").buffers
        finally:
            engine.unregister("s")
        est = estimate(shape, spec, "cpu")
        assert abs(est.kv - _parts(bufs, "KV")) <= LOG_ROUNDING
        assert _parts(bufs, "compute") <= est.compute <= 1.15 * _parts(bufs, "compute")


def test_specs_llama_cpp_would_abort_on_are_refused():
    from lmx.common.errors import LmxError
    for bad in (dict(n_seq=2), dict(n_ctx=32), dict(type_k="q2_k"),
                dict(type_v="q8_0", flash_attn=False), dict(n_ubatch=1024, n_batch=512),
                dict(flash_attn="yes")):
        with pytest.raises(LmxError):
            ContextSpec.from_fields(bad)
    assert ContextSpec.from_fields({"n_seq": 2, "n_outputs_max": 2}).n_seq == 2

"""Sizes, the operator table, and the per-agent estimate (table or conservative bound)."""
import pytest

from lmx.broker import estimate as est
from lmx.common.config import load_model_table, parse_size
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError, Reason
from ggufs import write_no_shape, write_unknown_arch


@pytest.mark.parametrize("text,value", [("8GiB", 8 << 30), ("400 MiB", 400 << 20),
                                        ("123", 123), ("1.5GB", 1_500_000_000), ("2kib", 2048)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "lots", "8XB", "-1GiB", "1e9"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_table_resolves_relative_paths_against_its_folder(tmp_path):
    (tmp_path / "cfg").mkdir()
    table = tmp_path / "cfg" / "t.txt"
    table.write_text("# comment\nsmol ../m/smol.gguf 256MiB  # trailing\n\n")
    entries = load_model_table(table)
    assert entries["smol"].path == str(tmp_path / "m" / "smol.gguf")
    assert entries["smol"].bytes == 256 << 20


@pytest.mark.parametrize("text,msg", [("a b\n", "expected"), ("a p 1\na q 2\n", "duplicate"),
                                      ("a p lots\n", "not a size")])
def test_table_errors_name_the_line(tmp_path, text, msg):
    table = tmp_path / "t.txt"
    table.write_text(text)
    with pytest.raises(ValueError, match=msg):
        load_model_table(table)


def test_the_shipped_example_table_parses():
    from conftest import ROOT
    entries = load_model_table(ROOT / "configs" / "model_vram.example.txt")
    assert set(entries) == {"smol", "gemma"}
    assert all(e.path.endswith(".gguf") for e in entries.values())


def test_table_sets_the_weights_and_the_estimator_the_context(tmp_path, smol_path):
    table = tmp_path / "t.txt"
    table.write_text(f"smol {smol_path} 300MiB\n")
    entries = load_model_table(table)
    by_key = est.estimate("smol", ContextSpec(n_ctx=2048), entries)
    by_path = est.estimate(smol_path, ContextSpec(n_ctx=2048), entries)
    assert by_key.weights == by_path.weights == 300 << 20
    assert by_key.weights_source == "table" and by_key.context_source == "estimator"
    assert by_key.context == by_path.context > 45 << 20          # 45 MiB of KV at least


def test_context_grows_with_n_ctx_by_the_kv_rule(smol_path):
    small = est.estimate(smol_path, ContextSpec(n_ctx=512), {})
    large = est.estimate(smol_path, ContextSpec(n_ctx=8192), {})
    assert small.weights_source == "estimator" and small.weights == large.weights
    # 30 layers x 3 KV heads x (64 + 64) x 2 bytes per cell, 8192 - 512 more cells
    kv = lambda e: e.estimated["kv"]  # noqa: E731
    assert kv(large) - kv(small) == 30 * 3 * 128 * 2 * (8192 - 512)
    assert large.context > small.context


@pytest.mark.parametrize("make,reason", [
    (lambda p: p / "absent.gguf", Reason.NOT_FOUND),
    (lambda p: (p / "notes.gguf").write_text("hello") and p / "notes.gguf", Reason.NOT_GGUF),
])
def test_bad_files_are_refused_before_booking(tmp_path, make, reason):
    with pytest.raises(LmxError) as info:
        est.estimate(str(make(tmp_path)), ContextSpec(), {})
    assert info.value.code == Code.MODEL_ERROR and info.value.reason == reason


def test_unknown_key_is_refused():
    with pytest.raises(LmxError) as info:
        est.estimate("nosuchkey", ContextSpec(), {})
    assert info.value.reason == Reason.UNKNOWN_KEY


def test_truncated_gguf_is_corrupt(tmp_path, smol_path):
    broken = tmp_path / "t.gguf"
    broken.write_bytes(open(smol_path, "rb").read(1 << 16))
    with pytest.raises(LmxError) as info:
        est.estimate(str(broken), ContextSpec(), {})
    assert info.value.reason == Reason.CORRUPT


@pytest.mark.parametrize("writer", [write_no_shape, write_unknown_arch])
def test_metadata_it_cannot_read_gets_the_documented_fallback(tmp_path, writer):
    path = writer(tmp_path / "x.gguf")
    e = est.estimate(str(path), ContextSpec(n_ctx=1000), {})
    size = path.stat().st_size
    assert e.weights_source == e.context_source == "fallback"
    assert e.weights == 2 * size
    assert e.context == 1024 * est.FALLBACK_PER_TOKEN + est.FALLBACK_CONTEXT_BASE


def test_measured_figures_replace_estimates(tmp_path, smol_path):
    from lmx.broker.measured import MeasuredCache
    cache = MeasuredCache(str(tmp_path / "m.json"))
    spec = ContextSpec(n_ctx=2048)
    first = est.estimate(smol_path, spec, {}, "cpu", cache)
    cache.store_weights(first.fingerprint, "cpu", spec, 111)
    cache.store_context(first.fingerprint, "cpu", spec, 222)
    again = est.estimate(smol_path, spec, {}, "cpu", MeasuredCache(str(tmp_path / "m.json")))
    assert (again.weights, again.weights_source) == (111, "measured")
    assert (again.context, again.context_source) == (222, "measured")
    other = est.estimate(smol_path, ContextSpec(n_ctx=4096), {}, "cpu", cache)
    assert other.context_source == "estimator"          # other parameters, other figure


def test_quantized_kv_needs_head_sizes_its_block_divides(tmp_path, smol_path):
    from ggufs import write_shaped
    path = write_shaped(tmp_path / "hd16.gguf", smol_path, n_layer=1, n_embd=64, n_head=4,
                        n_head_kv=2, n_ff=128)                   # head size 16
    with pytest.raises(LmxError) as info:
        est.estimate(str(path), ContextSpec(type_k="q8_0", type_v="q8_0"), {})
    assert info.value.code == Code.BAD_REQUEST and info.value.details["field"] == "type_k"
    assert est.estimate(str(path), ContextSpec(), {}).context > 0


def test_worker_config_round_trips_through_json():
    from lmx.common.config import WorkerConfig
    cfg = WorkerConfig(broker="ipc:///tmp/x.sock", threads=3, vram_total=1 << 30,
                       park_dir="/tmp/p", heartbeat_s=0.5, force_cpu=True)
    assert WorkerConfig.from_json(cfg.to_json()) == cfg
    assert cfg.argv() == ["--config", cfg.to_json()]
    assert WorkerConfig.from_json("{}") == WorkerConfig()
    for bad in ('{"park_ram": 1}', "[1]", "not json"):
        with pytest.raises(ValueError):
            WorkerConfig.from_json(bad)


def test_worker_options_default_to_the_config_and_override_it(monkeypatch):
    """lmx-worker --config JSON: options given on the command line win; the others come
    from the JSON, or from WorkerConfig's defaults without one."""
    from lmx.common.config import WorkerConfig
    from lmx.worker import main as worker_main
    seen = []
    monkeypatch.setattr(worker_main, "serve", seen.append)
    base = WorkerConfig(broker="ipc:///tmp/b.sock", quantum=7, max_batch=2, threads=5)
    worker_main.main.main(base.argv() + ["--quantum", "9", "--cpu", "--vram-total", "1GiB"],
                          standalone_mode=False)
    assert seen[-1] == WorkerConfig(broker="ipc:///tmp/b.sock", quantum=9, max_batch=2,
                                    threads=5, force_cpu=True, vram_total=1 << 30)
    worker_main.main.main(["--broker", "ipc:///tmp/c.sock"], standalone_mode=False)
    assert seen[-1] == WorkerConfig(broker="ipc:///tmp/c.sock")
    import click
    with pytest.raises(click.UsageError):
        worker_main.main.main([], standalone_mode=False)

"""Sizes, the operator table, and the per-agent estimate (table or conservative bound)."""
import pytest

from lmx.broker import estimate as est
from lmx.common.config import load_model_table, parse_size
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


def test_table_key_wins_and_path_lookup_finds_the_entry(tmp_path, smol_path):
    table = tmp_path / "t.txt"
    table.write_text(f"smol {smol_path} 300MiB\n")
    entries = load_model_table(table)
    by_key = est.estimate("smol", 2048, entries)
    by_path = est.estimate(smol_path, 2048, entries)
    assert by_key.bytes == by_path.bytes == 300 << 20
    assert by_key.source == by_path.source == "table"


def test_conservative_bound_grows_with_context(smol_path):
    small = est.estimate(smol_path, 512, {})
    large = est.estimate(smol_path, 8192, {})
    assert small.source == "conservative"
    # 30 layers x 3 KV heads x (64 + 64) x 2 bytes per cell, 8192 - 512 more cells
    assert large.parts["kv"] - small.parts["kv"] == 30 * 3 * 128 * 2 * (8192 - 512)
    assert large.bytes > small.bytes > small.parts["weights"]


@pytest.mark.parametrize("make,reason", [
    (lambda p: p / "absent.gguf", Reason.NOT_FOUND),
    (lambda p: (p / "notes.gguf").write_text("hello") and p / "notes.gguf", Reason.NOT_GGUF),
])
def test_bad_files_are_refused_before_booking(tmp_path, make, reason):
    with pytest.raises(LmxError) as info:
        est.estimate(str(make(tmp_path)), 512, {})
    assert info.value.code == Code.MODEL_ERROR and info.value.reason == reason


def test_unknown_key_is_refused():
    with pytest.raises(LmxError) as info:
        est.estimate("nosuchkey", 512, {})
    assert info.value.reason == Reason.UNKNOWN_KEY


def test_truncated_gguf_is_corrupt(tmp_path, smol_path):
    broken = tmp_path / "t.gguf"
    broken.write_bytes(open(smol_path, "rb").read(1 << 16))
    with pytest.raises(LmxError) as info:
        est.estimate(str(broken), 512, {})
    assert info.value.reason == Reason.CORRUPT


def test_missing_shape_keys_fall_back(tmp_path):
    path = write_no_shape(tmp_path / "noshape.gguf")
    e = est.estimate(str(path), 1000, {})
    size = path.stat().st_size
    assert e.source == "fallback"
    assert e.bytes == 2 * size + 1024 * est.FALLBACK_PER_TOKEN


def test_unknown_architecture_still_gets_a_figure(tmp_path):
    path = write_unknown_arch(tmp_path / "odd.gguf")
    e = est.estimate(str(path), 512, {})
    assert e.bytes > path.stat().st_size

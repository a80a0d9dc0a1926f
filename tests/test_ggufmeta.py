"""The broker's fast GGUF header reader agrees with the gguf package and refuses junk."""
import time

import pytest
from gguf import GGUFReader

from lmx.broker.ggufmeta import ArrayLength, GGUFFormatError, read_metadata
from ggufs import write_unknown_arch


def test_agrees_with_gguf_reader(smol_path):
    ours = read_metadata(smol_path)
    theirs = GGUFReader(smol_path)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, list) and len(value) > 4096:
            assert isinstance(ours[key], ArrayLength) and ours[key] == len(value), key
        elif isinstance(value, float):
            assert ours[key] == pytest.approx(value), key
        else:
            assert ours[key] == value, key


def test_fast_on_a_large_vocabulary(gemma_path):
    t0 = time.perf_counter()
    meta = read_metadata(gemma_path)
    assert time.perf_counter() - t0 < 2.0
    assert meta["tokenizer.ggml.tokens"] == 262144
    assert meta["gemma3.block_count"] == 18


def test_tiny_written_file(tmp_path):
    meta = read_metadata(write_unknown_arch(tmp_path / "odd.gguf"))
    assert meta["general.architecture"] == "nonesuch" and meta["nonesuch.block_count"] == 1


@pytest.mark.parametrize("data", [b"", b"GGUF", b"GGML" + b"\0" * 60, b"GGUF\x09\0\0\0" + b"\0" * 16,
                                  b"GGUF\x03\0\0\0" + b"\0" * 8 + b"\xff" * 8])
def test_junk_is_refused(tmp_path, data):
    path = tmp_path / "junk.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFFormatError):
        read_metadata(path)


def test_truncated_real_header_is_refused(tmp_path, smol_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(open(smol_path, "rb").read(1 << 16))
    with pytest.raises(GGUFFormatError):
        read_metadata(path)

"""lmx-fetch-models' hash checks, without downloading anything."""
import hashlib

import pytest

from lmx.common import models


def test_verify_passes_on_the_known_hash(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(1000))
    assert models.verify(path, hashlib.sha256(path.read_bytes()).hexdigest()) == path


def test_verify_mismatch_raises_a_clear_error(tmp_path):
    path = tmp_path / models.SMOL               # its known hash from the table
    path.write_bytes(b"not the model")
    with pytest.raises(models.ModelHashError) as info:
        models.verify(path)
    message = str(info.value)
    assert models.SHA256[models.SMOL] in message and str(path) in message
    assert hashlib.sha256(b"not the model").hexdigest() in message


def test_fresh_file_that_does_not_match_is_deleted(tmp_path):
    path = tmp_path / models.GEMMA
    path.write_bytes(b"truncated")
    with pytest.raises(models.ModelHashError):
        models._checked(path)
    assert not path.exists()


def test_a_wrong_existing_file_is_fetched_again(tmp_path, capsys):
    path = tmp_path / models.SMOL
    path.write_bytes(b"stale")
    assert not models._matches(path)
    assert "fetching it again" in capsys.readouterr().err
    assert not models._matches(tmp_path / models.GEMMA)          # absent


def test_every_model_has_a_known_hash():
    assert set(models.SHA256) == {models.SMOL, models.GEMMA}
    assert all(len(h) == 64 for h in models.SHA256.values())

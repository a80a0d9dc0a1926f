"""Parked KV state on disk, so a worker (or broker) restart can resume an agent's conversation.

Each parked agent has `<dir>/<agent>.state` (llama_state_get_data bytes) and
`<dir>/<agent>.json` (model path and size, the context spec, n_past, the pending tokens and the
tokens in the KV, for a CHAT's prefix reuse), both
written through a temporary file and renamed, the JSON last. There is no fsync: a killed worker
or broker loses nothing (the page cache holds the files), a power cut can; an fsync of a
gigabyte of KV state on every swap would cost more than the swap. A state is valid only for the
same model file and spec. Files go when the agent is unregistered or its state is restored into
a live context (from then on the conversation lives only in that context).

Writes and removals run in order on one background thread (a PARK whose state stays in host
memory answers before its copy is on disk: at a swap of 20 agents the copies cost 6 ms each
on the GPU machine, 130 ms in the batch's way). Such a copy is written straight from the
parked host buffer when its turn comes (save_from); an agent restored before then is not
written at all (a swap's agents often are), and its buffer is not reused until a write under
way ends. Every read waits for what was queued before it, so a read never sees a stale file;
a state that goes only to disk is written before the PARK answers. A worker killed before a
copy is written loses that copy (and the agent's conversation, as it would if it were killed
before parking).
"""
import ctypes
import json
import logging
import os
import queue
import threading

from lmx.common.files import write_atomic

log = logging.getLogger("lmx.worker")


def _paths(folder, agent):
    return os.path.join(folder, f"{agent}.state"), os.path.join(folder, f"{agent}.json")


class _Writer:
    """One thread doing a folder's writes and removals in the order they were asked."""

    def __init__(self):
        self.tasks = queue.Queue()
        threading.Thread(target=self._run, name="lmx-parkdisk", daemon=True).start()

    def _run(self):
        while True:
            fn, args = self.tasks.get()
            try:
                fn(*args)
            except OSError as exc:
                log.error("worker: parked state file %s failed: %s", args[1], exc)
            finally:
                self.tasks.task_done()


_writers = {}
_lock = threading.Lock()


def _queue(folder, fn, *args):
    with _lock:
        writer = _writers.get(folder) or _writers.setdefault(folder, _Writer())
    writer.tasks.put((fn, (folder, *args)))


def flush(folder=None):
    """Wait until every queued write and removal (of folder, or of all) is done."""
    for key, writer in list(_writers.items()):
        if folder is None or key == folder:
            writer.tasks.join()


class Pending:
    """A queued write of a state still in a host buffer (save_from): it reads the buffer when
    its turn comes, unless cancel() came first."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cancelled = False

    def cancel(self):
        """The buffer is about to change or be freed: a write not started is dropped, one
        under way is waited for."""
        with self.lock:
            self.cancelled = True


def save_from(folder, agent, address, nbytes, meta):
    """Queue the write of nbytes at address (a host buffer the caller keeps until it calls
    the Pending's cancel(), or until flush() returns), then the metadata; the Pending.

    No copy is made now: copying a 5.6 MB state into a new bytes object cost the PARK 3-7 ms
    on the GPU machine (fresh pages), and a state restored before its turn (a swap) is not
    written at all (its file would be removed right after)."""
    pending = Pending()
    _queue(folder, _save_pending, agent, pending, address, nbytes, meta)
    return pending


def _save_pending(folder, agent, pending, address, nbytes, meta):
    with pending.lock:
        if not pending.cancelled:
            _save(folder, agent, memoryview((ctypes.c_uint8 * nbytes).from_address(address)),
                  meta)


def _save(folder, agent, raw, meta):
    state, info = _paths(folder, agent)
    write_atomic(state, raw, durable=False)      # survives process crashes, not power loss
    write_atomic(info, json.dumps(meta), durable=False)


def load(folder, agent, expect):
    """(bytes, meta) if a state for this agent matches `expect` (model, size, spec), else None."""
    flush(folder)
    state, info = _paths(folder, agent)
    try:
        with open(info) as fh:
            meta = json.load(fh)
        if any(meta.get(k) != v for k, v in expect.items()):
            log.warning("worker: parked state of %s does not match its model/spec; ignored",
                        agent)
            return None
        with open(state, "rb") as fh:
            return fh.read(), meta
    except (OSError, ValueError):
        return None


def remove(folder, agent):
    """Forget an agent's parked state on disk (queued after its writes)."""
    _queue(folder, _remove, agent)


def _remove(folder, agent):
    for path in _paths(folder, agent):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

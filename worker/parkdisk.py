"""Parked KV state on disk, so a worker (or broker) restart can resume an agent's conversation.

Each parked agent has `<dir>/<agent>.state` (llama_state_get_data bytes) and
`<dir>/<agent>.json` (model path and size, the context spec, n_past, the pending tokens and the
tokens in the KV, for a CHAT's prefix reuse), both
written through a temporary file and renamed, the JSON last. There is no fsync: a killed worker
or broker loses nothing (the page cache holds the files), a power cut can; an fsync of a
gigabyte of KV state on every swap would cost more than the swap. A state is valid only for the
same model file and spec. Files go when the agent is unregistered or its state is restored into
a live context (from then on the conversation lives only in that context).
"""
import json
import logging
import os

from lmx.common.files import write_atomic

log = logging.getLogger("lmx.worker")


def _paths(folder, agent):
    return os.path.join(folder, f"{agent}.state"), os.path.join(folder, f"{agent}.json")


def save(folder, agent, raw, meta):
    """Write the state bytes, then the metadata that makes them valid."""
    state, info = _paths(folder, agent)
    write_atomic(state, raw, durable=False)      # survives process crashes, not power loss
    write_atomic(info, json.dumps(meta), durable=False)


def load(folder, agent, expect):
    """(bytes, meta) if a state for this agent matches `expect` (model, size, spec), else None."""
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
    """Forget an agent's parked state on disk."""
    for path in _paths(folder, agent):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

"""The registrations journal: what agents were told they are registered, kept across restarts.

One JSON file in the state directory, rewritten atomically (temp file, fsync, rename) after
every REGISTER that succeeds and every UNREGISTER, so a broker killed at any moment leaves
either the old or the new journal, never half of one.
"""
import json
import logging
import os

from lmx.common.files import write_atomic

log = logging.getLogger("lmx.broker")


class Journal:
    """{agent: {"model", "path", "spec"}} mirrored to `path` ('' keeps it in memory only)."""

    def __init__(self, path):
        self.path = path
        self.agents = {}
        if path and os.path.exists(path):
            try:
                with open(path) as fh:
                    self.agents = json.load(fh).get("agents", {})
            except (OSError, ValueError) as exc:
                log.error("journal: %s is unreadable (%s); starting empty", path, exc)

    def put(self, agent, entry):
        self.agents[agent] = entry
        self._write()

    def drop(self, agent):
        if self.agents.pop(agent, None) is not None:
            self._write()

    def _write(self):
        if self.path:
            write_atomic(self.path, json.dumps({"version": 1, "agents": self.agents}))

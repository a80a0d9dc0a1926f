"""HELP, STATUS and LIST: what the broker shows of itself (mixed into Broker)."""
import time

from lmx.broker.records import VERSION
from lmx.common import protocol


class ViewsMixin:
    """Read-only handlers."""

    def on_help(self, _identity, _msg):
        """HELP: the verbs and their fields."""
        return {"protocol": list(protocol.PROTOCOL_VERSION), "verbs": protocol.help_text()}

    def on_status(self, identity, msg):
        """STATUS: ledger, device, worker, queue and counters (packed once per state change)."""
        if self._status_cache is None:
            self._status_cache = protocol.CachedReply(self._status_fields())
        self.client.send_multipart([identity, *self._status_cache.frames(
            msg.id, uptime_s=round(time.time() - self.started, 1), **self.counters)])
        return None

    def _status_fields(self):
        dev, wk = self.worker.device, self.worker
        return {"version": VERSION, "protocol": list(protocol.PROTOCOL_VERSION),
                "endpoint": self.config.endpoint,
                **self._ledger_numbers(), "admission_percent": self.ledger.admission_percent,
                "ledger_percent_cap_bytes": self.ledger.percent_cap,
                "external_bytes": self.ledger.external_bytes,
                "bookings": self.ledger.snapshot()["bookings"],
                "device_kind": dev.get("kind"), "device_name": dev.get("name"),
                "device_source": dev.get("source"),
                "device_total_bytes": dev.get("total_bytes"),
                "device_used_bytes": dev.get("used_bytes"),
                "device_free_bytes": dev.get("free_bytes"),
                "worker_pid": wk.pid, "worker_state": wk.state, "worker_restarts": wk.restarts,
                "worker_process_bytes": dev.get("process_bytes"),
                "streaming_available": (dev.get("streaming") or {}).get("available", False),
                "streaming_reason": (dev.get("streaming") or {}).get("reason"),
                "live_agent": wk.engine.get("live_agent"),
                "live_agents": wk.engine.get("live_agents", []),
                "batch_groups": wk.engine.get("groups", []),
                "parked_ram_bytes": wk.engine.get("parked_ram_bytes"),
                "park_ram_budget": wk.engine.get("park_ram_budget"),
                "agent_states": {a.agent: {k: v for k, v in self._agent_view(a).items() if k in (
                    "residence", "booked_now_bytes", "parked_bytes", "queue_depth",
                    "generated_tokens", "last_active")} for a in self.agents.values()},
                "waiting_for_room": len(self.waiting),
                "models": self._models(), "agents": len(self.agents),
                "queue_depth": max(len(wk.queue) + len(wk.inflight) - 1, 0),
                "inflight": len(wk.inflight)}

    def on_list(self, _identity, _msg):
        """LIST: every agent with its booking and state."""
        return {"agents": [self._agent_view(a) for a in self.agents.values()]}

    def _agent_view(self, rec):
        """One agent as LIST shows it: the broker's record plus the worker's slot.

        residence: live (its context booked), parked_ram, parked_disk, or parked_empty (parked
        before it had any state)."""
        slot = self.worker.engine.get("slots", {}).get(rec.agent, {})
        parked = slot.get("parked")
        residence = "live" if rec.live else f"parked_{parked}" if parked else "parked_empty"
        return dict(vars(rec), owner=rec.owner.hex(), residence=residence,
                    booked_now_bytes=self.ledger.booked(f"agent:{rec.agent}") or 0,
                    queue_depth=rec.outstanding + sum(1 for w in self.waiting if w.rec is rec),
                    parked_bytes=slot.get("parked_bytes", 0),
                    parked_pinned=slot.get("parked_pinned", False),
                    parked_on_disk=parked == "disk", n_past=slot.get("n_past", 0),
                    batch=slot.get("batch", 0), parks=slot.get("parks", 0),
                    worker_live=slot.get("live", False))

    def _ledger_numbers(self):
        return {"ledger_max_bytes": self.ledger.max_bytes,
                "ledger_allocated_bytes": self.ledger.allocated_bytes}

    def _models(self):
        refs = self.worker.engine.get("models", {})
        out = []
        for path, m in sorted(self.models.items()):
            ctx = [self.agents[a] for a in m.agents if a in self.agents]
            out.append({"path": path, "agents": len(m.agents), "booked_bytes": m.booked_bytes,
                        "estimated_bytes": m.estimated_bytes, "measured_bytes": m.measured_bytes,
                        "source": m.source,
                        "context_booked_bytes": sum(a.booked_bytes for a in ctx),
                        "worker_refs": refs.get(path, {}).get("refs", 0)})
        for path, info in refs.items():
            if path not in self.models:      # held by the worker but booked by nobody: a bug
                out.append({"path": path, "agents": 0, "booked_bytes": 0,
                            "worker_refs": info.get("refs", 0)})
        return out

"""What the core does with a worker's RESULT: per job verb, and the facts every result brings."""
from lmx.broker.core import booking, moves, room, seats
from lmx.common.jobs import RESULT_TYPES
from lmx.common.replies import ChatReply, DecodeReply


def on_result(core, ev):
    """A job finished: take its facts, then finish the op that waited for it."""
    op = core.jobs.pop(ev.job_id, None)
    if op is None:
        core.log("error", f"worker: result for unknown job {ev.job_id}")
        return
    dev = core.devices[op.dev]
    dev.last_seen = ev.now
    result = ev.result
    if result.engine is not None:
        dev.engine = result.engine
    if result.ok and result.out is not None:
        verb = "REGISTER" if op.verb == "RESTORE" else op.verb
        if op.verb == "MOVE":
            verb = "UNREGISTER" if op.fields["job"] == "UNDO" else op.fields["job"]
        result.out = RESULT_TYPES[verb].from_wire(result.out)
    if result.slot is not None:
        absorb_slot(core, result.slot)
    _DONE[op.verb](core, op, result)
    seats.sync(core, dev.index, result.engine)
    seats.reconcile(core, dev.index, result.engine)
    booking.reconcile_overhead(core, dev)


def absorb_slot(core, slot):
    """Copy the worker's facts about an agent (where its state is, its length) to its record."""
    rec = core.agents.get(slot.agent)
    if rec is None:
        return
    was_in_ram = rec.parked == "ram"
    rec.parked = None if slot.live else slot.parked
    rec.parked_bytes = 0 if slot.live else slot.parked_bytes
    rec.parked_pinned = slot.parked_pinned and not slot.live
    rec.n_past, rec.batch = slot.n_past, slot.batch
    if was_in_ram and rec.parked != "ram":
        for other in core.agents.values():   # host budget freed: a refused PARK may fit now
            other.unparkable = False


def run_done(core, op, result):
    """A DECODE or CHAT finished: count it, answer with its reply record (or its error)."""
    rec = core.agents.get(op.agent)
    broker_ms = round((core.now - op.t0) * 1000, 2)
    if not result.ok or rec is None:
        core.end(op, dict(result.error or {}, status="error", agent=op.agent,
                          broker_ms=broker_ms))
        return
    out = _count(core, rec, result.out)
    reset, rec.context_reset = rec.context_reset, False     # said once, after a restart
    queue_ms = round((op.sent_at - op.t0) * 1000, 2)
    evicted = op.parked[0] if op.parked else None
    if op.verb == "CHAT":
        reply = ChatReply(
            op.agent, out.content, out.tool_calls,
            "cancelled" if op.slow else out.finish_reason, out.prompt_tokens,
            out.completion_tokens, out.cached_tokens, out.truncated_tokens, out.seed,
            out.elapsed_ms, out.swap_ms, out.prompt_ms, out.gen_ms, out.ttft_ms, queue_ms,
            broker_ms, evicted, list(op.parked), out.kv_swap_restored, out.batch, out.n_past,
            reset)
    else:
        reply = DecodeReply(
            op.agent, out.prompt_tokens, out.generated_tokens, out.stopped_on_eos,
            "slow_reader" if op.slow else out.stopped_by, out.elapsed_ms, evicted,
            list(op.parked), out.kv_swap_restored, out.batch, out.text, out.tokens,
            out.swap_ms, out.prompt_ms, out.gen_ms, out.ttft_ms, queue_ms, out.n_past,
            broker_ms, reset)
    core.end(op, reply.to_wire())


def _count(core, rec, out):
    """What every finished DECODE or CHAT adds to its agent's record and its client's
    tokens_per_minute window."""
    generated = getattr(out, "completion_tokens", None) or getattr(out, "generated_tokens", 0)
    rec.decodes += 1
    rec.generated_tokens += generated
    core.quotas.spend(rec.client, out.prompt_tokens + generated, core.now)
    rec.last_active, rec.last_used, rec.unparkable = core.wall, core.now, False
    return out


def restore_done(core, op, result):
    """A registered agent rebuilt on a new worker (resumed from disk, or reset)."""
    rec = core.agents.get(op.agent)
    if rec is None:
        core.end(op, None)
        return
    if result.ok:
        rec.state = "ready"
        resumed = bool(result.out.resumed)
        rec.context_reset = not resumed     # not live either way: seated at its next run
        core.log("info", f"recovery: agent={rec.name} "
                 f"{'resumed from disk' if resumed else 'rebuilt; its context was reset'}")
    else:
        from lmx.broker.core import recovery
        recovery.mark_lost(core, rec.name, (result.error or {}).get("message",
                                                                    "restore failed"))
    core.end(op, None)


_DONE = {"REGISTER": booking.register_done, "UNREGISTER": booking.unregister_done,
         "DECODE": run_done, "CHAT": run_done, "PARK": room.park_done,
         "RESIZE": room.resize_done, "MOVE": moves.move_done,
         "RESTORE": restore_done}

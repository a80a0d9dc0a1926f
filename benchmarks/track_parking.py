"""Track B with parking, for track_ab.py: a broker with --admit-by-parking serves the three
agents round-robin at one context, f16 then q8_0 KV, one request at a time.

Every request records the agent's residence when it was asked (LIST: live, parked_ram,
parked_disk, parked_empty), the make-live time (request sent to its first streamed token, on
the client's clock; the broker's queue_ms, which holds the parking it waited for, and the
worker's swap_ms, its context build plus restore), what it parked and whether it restored its
own state, the ledger after it (STATUS: allocated and cap, and which agents were live), and a
refusal's code and numbers. A phase adds its counts: parks, restores, refusals, the most
agents live at once and the ledger's peak after a request.
"""
import os
import time

import benchlib
from lmx.common.client import Client

KEEP = ("status", "code", "reason", "message", "booked_bytes", "model_booked_bytes",
        "ledger_max_bytes", "ledger_allocated_bytes", "requested_bytes", "freeable_bytes",
        "kv_swap_parked", "estimate_source")
NUMBERS = ("requested_bytes", "freeable_bytes", "ledger_allocated_bytes", "ledger_max_bytes")


def track_p(models, n_ctx, rounds, gpu, card, watch, folder):
    """Start the parking broker, run the f16 and the q8_0 phase, stop it; marks for the PNG."""
    log = open(os.path.join(folder, "broker-parking.log"), "w")
    args = ["--admit-by-parking", "--park-ram", "64GiB"]
    args += [] if gpu else ["--cpu", "--vram-total", str(card), "--threads", "2"]
    broker, endpoint, status = benchlib.start_broker(folder, models, *args, stderr=log)
    out = {"n_ctx": n_ctx, "rounds": rounds, "broker_args": args,
           "worker_pid": status["worker_pid"], "phases": [], "marks": []}
    try:
        with Client(endpoint, timeout=600) as c:
            watch.watch(status["worker_pid"], "B, parking: lmx-worker")
            for kv in ("f16", "q8_0"):
                out["phases"].append(_phase(c, models, n_ctx, kv, rounds, watch, out["marks"]))
    finally:
        broker.terminate()
        broker.wait(60)
    return out


def _phase(c, models, n_ctx, kv, rounds, watch, marks):
    """REGISTER the models with this KV type, serve the admitted round-robin, UNREGISTER."""
    marks.append([watch.mark(), f"{kv}: register"])
    phase = {"kv": kv, "n_ctx": n_ctx, "registers": [], "requests": []}
    agents = []
    for model in models:
        reg = _register(c, model, n_ctx, kv)
        phase["registers"].append(reg)
        if reg["status"] == "ok":
            agents.append(reg["agent"])
    for turn in range(1, rounds + 1):
        marks.append([watch.mark(), f"{kv}: round {turn}"])
        for agent in agents:
            phase["requests"].append(dict(_serve(c, agent), round=turn))
    for agent in agents:
        c.call("UNREGISTER", agent=agent)
    phase["counts"] = counts(phase)
    phase["allocated_after_unregister"] = c.call("STATUS")["ledger_allocated_bytes"]
    return phase


def _register(c, model, n_ctx, kv):
    """One REGISTER: its reply's numbers, and the ledger after it."""
    agent = f"{os.path.basename(model).split('.')[0]}-{kv}-parking"
    fields = {"agent": agent, "model": model, "n_ctx": n_ctx}
    if kv != "f16":
        fields.update(type_k=kv, type_v=kv)
    r = c.call("REGISTER", **fields)
    s = c.call("STATUS")
    return dict({k: r[k] for k in KEEP if k in r}, agent=agent,
                allocated=s["ledger_allocated_bytes"], cap=s["ledger_max_bytes"],
                live_after=list(s["live_agents"]))


def _serve(c, agent, n_predict=8):
    """One streamed DECODE of `agent`, timed from the send to its first token."""
    residence = {a["agent"]: a["residence"] for a in c.call("LIST")["agents"]}[agent]
    t0 = time.perf_counter()
    first, final = None, {}
    for final in c.replies(c.send("DECODE", agent=agent, prompt=" and then",
                                  n_predict=n_predict, stream=True)):
        if first is None and final.get("status") == "partial":
            first = time.perf_counter()
    wall = time.perf_counter() - t0
    s = c.call("STATUS")
    row = {"agent": agent, "residence_before": residence, "live_before": residence == "live",
           "status": final.get("status"), "first_token_ms": _ms(first and first - t0),
           "wall_ms": _ms(wall), "restored": bool(final.get("kv_swap_restored")),
           "parked": final.get("kv_swap_parked") or [],
           "generated_tokens": final.get("generated_tokens")}
    row.update({k: final.get(k) for k in ("queue_ms", "swap_ms", "ttft_ms", "broker_ms")})
    if row["status"] != "ok":
        row.update({k: final.get(k) for k in ("code", "reason", "message", *NUMBERS)})
    row.update(allocated=s["ledger_allocated_bytes"], cap=s["ledger_max_bytes"],
               live_after=list(s["live_agents"]))
    return row


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


def counts(phase):
    """A phase's totals: parks, restores, refusals (with their numbers), the ledger's peak."""
    rows = phase["registers"] + phase["requests"]
    refusals = [dict({k: r.get(k) for k in ("agent", "code", "reason", *NUMBERS)},
                     at="REGISTER" if "round" not in r else f"DECODE round {r['round']}")
                for r in rows if r["status"] != "ok"]
    return {"parks": sum(len(r.get("kv_swap_parked") or r.get("parked") or []) for r in rows),
            "restores": sum(r.get("restored", False) for r in phase["requests"]),
            "refusals": refusals, "most_live": max((len(r["live_after"]) for r in rows),
                                                    default=0),
            "peak_allocated": max((r["allocated"] for r in rows), default=0),
            "cap": max((r["cap"] for r in rows), default=0),
            "over_cap": sum(r["allocated"] > r["cap"] for r in rows)}


def served(phase):
    """{agent: [served in round 1, round 2, ...]} for every agent the phase REGISTERed."""
    rounds = max((q["round"] for q in phase["requests"]), default=0)
    out = {g["agent"]: [False] * rounds for g in phase["registers"]}
    for q in phase["requests"]:
        out[q["agent"]][q["round"] - 1] = q["status"] == "ok"
    return out


def summary_lines(track):
    """The per-KV tables track_ab.py prints: served per round, make-live, ledger; refusals."""
    lines = []
    for ph in track.get("phases", []):
        k = ph["counts"]
        lines.append(f"P kv={ph['kv']} n_ctx={ph['n_ctx']}: parks {k['parks']}, restores "
                     f"{k['restores']}, refusals {len(k['refusals'])}, most live at once "
                     f"{k['most_live']}, ledger peak {_mb(k['peak_allocated'])} of "
                     f"{_mb(k['cap'])} MB, over the cap {k['over_cap']} times, "
                     f"{_mb(ph.get('allocated_after_unregister'))} MB after UNREGISTER")
        lines.append(f"P   {'agent':30} {'served':8} {'make-live ms':14} {'worker swap ms':15} "
                     "allocated after, of cap (MB)")
        for agent, ok in served(ph).items():
            qs = [q for q in ph["requests"] if q["agent"] == agent]
            lines.append(f"P   {agent[:30]:30} {'/'.join('yes' if s else 'no' for s in ok):8} "
                         f"{_join(q['first_token_ms'] for q in qs):14} "
                         f"{_join(q['swap_ms'] for q in qs):15} "
                         f"{_join(_mb(q['allocated']) for q in qs)} of {_mb(k['cap'])}")
        for r in k["refusals"]:
            lines.append(f"P   refused {r['agent']} at {r['at']}: {r['code']}/{r['reason']} "
                         f"requested={r['requested_bytes']} freeable={r['freeable_bytes']} "
                         f"allocated={r['ledger_allocated_bytes']} max={r['ledger_max_bytes']}")
    return lines


def _mb(nbytes):
    return "-" if nbytes is None else f"{nbytes / 1e6:,.0f}"


def _join(values):
    return " / ".join("-" if v is None else str(v) for v in values) or "-"

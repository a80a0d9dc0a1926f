"""devices_x2.py's report: the verdicts, the markdown tables and the PNG, from results.json
alone (so --replot redraws them without a GPU)."""
import os

import click

import benchlib


def verdicts(r):
    """Each claim of the run: True, False, or None where one device cannot show it."""
    n, dec, rec = len(r["gpus"]), r["decode"], r["recover"]
    k = dec["kill"]["device"]
    placed = [x for x in r["register"] if x["status"] == "ok" and x["pinned"] is None]
    pinned = [x for x in r["register"] if x["pinned"] is not None]
    big = r["register"][-1]
    expected = sorted(a for a, d in dec["placement"].items() if d == k)
    got = sorted(a for a, x in dec["agents"].items() if x.get("code") == "WORKER_LOST")
    others = [x for x in dec["agents"].values() if x["device"] != k]
    after = dec["respawn"]["after_loss"]
    fresh = rec["fresh"]
    return {
        "placement put agents on every device":
            {x["device"] for x in placed} == set(range(n)) if n > 1 else None,
        "the pinned agent is on the device it named":
            bool(pinned) and all(x.get("device") == x["pinned"] for x in pinned),
        "the too-big agent was refused with a reason per device":
            big["status"] == "error" and len(big.get("devices", [])) == n,
        "WORKER_LOST for exactly the killed device's agents": bool(expected) and got == expected,
        "the other devices' agents finished their decodes":
            all(x["status"] == "ok" and x["stopped_by"] is None for x in others)
            if others else None,
        "their tokens kept coming after the kill":
            all(x["tokens_after_kill"] > 0 for x in others) if others else None,
        "the killed device's seats were released, its weights kept":
            not after["seats"] and bool(after["models"]),
        "the killed device's worker was respawned and ready":
            dec["respawn"]["respawned_pid"] != dec["kill"]["pid"],
        "the lost agents decoded again on that device":
            bool(rec["agents"]) and all(x["status"] == "ok" and x["device"] == k and
                                        x["generated_tokens"] for x in rec["agents"].values()),
        "a fresh agent pinned there was admitted and decoded":
            fresh["status"] == "ok" and fresh.get("decode", {}).get("status") == "ok",
    }


def not_run(r):
    """What one device could not show."""
    if len(r["gpus"]) > 1:
        return []
    return ["placement across devices: with one device every agent lands on it",
            "pinning to another device: the pinned agent names the only device",
            "another device's agents decoding through the kill: there is no other device "
            "(every agent got WORKER_LOST)"]


def _where(x):
    if x["status"] == "ok":
        return f"device {x['device']}" + (" (pinned)" if x["pinned"] is not None else "")
    why = "; ".join(f"device {d['device']}: {d['reason']}" + (
        f", needs {d['requested_bytes']:,}" if d.get("requested_bytes") else "")
        for d in x.get("devices", []))
    return f"**refused** {x.get('code')}/{x.get('reason')} ({why})"


def _register_table(r):
    n = len(r["gpus"])
    head = "| agent | model | n_ctx | placed | booked bytes | " + " | ".join(
        f"device {i} allocated / cap" for i in range(n)) + " |"
    lines = [head, "| --- | --- | ---: | --- | ---: |" + " ---: |" * n]
    for x in r["register"]:
        ledg = " | ".join(f"{d['allocated']:,} / {d['cap']:,}" for d in x["ledgers"])
        booked = f"{x['booked_bytes']:,}" if x.get("booked_bytes") else "-"
        lines.append(f"| {x['agent']} | {x['model']} | {x['n_ctx']:,} | {_where(x)} | "
                     f"{booked} | {ledg} |")
    for d in r["register"][-1]["ledgers"]:
        lines.append(f"\nDevice {d['device']} ({d['name']}): models {', '.join(d['models'])}; "
                     f"agents {', '.join(d['agents'])}.")
    return lines


def _decode_table(r):
    dec = r["decode"]
    lines = ["| agent | device | outcome | tokens | after the kill | median gap ms | "
             "largest gap around the kill ms |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for a, x in sorted(dec["agents"].items(), key=lambda kv: (kv[1]["device"], kv[0])):
        outcome = "ok" if x["status"] == "ok" else f"**{x.get('code')}**"
        lines.append(f"| {a} | {x['device']} | {outcome} | {x['tokens_streamed']} | "
                     f"{x['tokens_after_kill']} | {x['median_gap_ms']} | "
                     f"{x['max_gap_around_kill_ms']} |")
    kill, sp = dec["kill"], dec["respawn"]
    after = sp["after_loss"]
    states = ", ".join(f"{s} at {t - kill['t']:+.2f} s" for t, s in sp["states"])
    lines += ["", f"The worker of device {kill['device']} (pid {kill['pid']}) was SIGKILLed "
              f"at t = {kill['t']:.2f} s, once every agent had its first token. Its ledger then "
              f"({after['state']}): {after['allocated']:,} B allocated, seats "
              f"{after['seats'] or 'none'}, weights kept: {', '.join(after['models'])}. Its "
              f"worker: {states}; the new one (pid {sp['respawned_pid']}) ready "
              f"**{sp['ready_s']:.2f} s** after the kill."]
    return lines


def _recover_table(r):
    rec = r["recover"]
    again = rec.get("register_again")
    lines = ["| lost agent | DECODE again | tokens | context_reset | device |",
             "| --- | --- | ---: | --- | ---: |"]
    for a, x in sorted(rec["agents"].items()):
        lines.append(f"| {a} | {x['status'] if x['status'] == 'ok' else x['code']} | "
                     f"{x['generated_tokens']} | {x['context_reset']} | {x['device']} |")
    if again:
        lines.append(f"\nREGISTER {again['agent']} again: {again['status']} "
                     f"{again.get('code') or ''} (lmx kept the lost agents registered).")
    fresh = rec["fresh"]
    lines.append(f"A fresh agent pinned to the respawned device: {_where(fresh)}, DECODE "
                 f"{fresh.get('decode', {}).get('status')} "
                 f"({fresh.get('decode', {}).get('generated_tokens')} tokens).")
    return lines


def markdown(r):
    """devices.md: the run's settings, the three tables, the verdicts and what was not run."""
    kind = "GPU" if r["gpu"] else "CPU"
    cards = "; ".join(f"GPU {c['gpu']} {c['name']}, {c['free_after_ballast']:,} B free after "
                      f"its ballast" for c in r["cards"]) or "declared devices"
    lines = [f"{kind}, {len(r['gpus'])} device(s) of {r['card_bytes'] / 2**30:.2f} GiB "
             f"({cards}); models {', '.join(r['models'])}; n_ctx {r['n_ctx']}, "
             f"{r['agents_per_model']} agents per model, {r['tokens']} tokens per stream", "",
             "### REGISTER, one at a time", "", *_register_table(r), "",
             "### Every agent decoding; one worker killed", "", *_decode_table(r), "",
             "### The killed device serves again", "", *_recover_table(r), "", "### Verdicts",
             ""]
    for claim, ok in r["verdicts"].items():
        lines.append(f"- {'not run' if ok is None else 'yes' if ok else '**NO**'}: {claim}")
    lines += [f"- NOT RUN: {what}" for what in r["not_run"]]
    return "\n".join(lines) + "\n"


def draw(r, path):
    """Per device: memory and the ledger over time (the card dashed), and each agent's tokens
    over time; the kill (red) and the new worker's READY (green, dotted) marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n, dec = len(r["gpus"]), r["decode"]
    k, t_kill = dec["kill"]["device"], dec["kill"]["t"]
    fig, axes = plt.subplots(2, n, figsize=(6.5 * n, 8), squeeze=False, sharex=True)
    for i in range(n):
        mem, tok = axes[0][i], axes[1][i]
        for label, pts in sorted(r["samples"][i].items()):
            mem.plot([t for t, _ in pts], [b / 2**20 for _, b in pts], label=label)
        books = r["ledger_samples"].get(i, r["ledger_samples"].get(str(i), []))
        mem.plot([t for t, _ in books], [b / 2**20 for _, b in books], color="black",
                 linewidth=1, drawstyle="steps-post", label="lmx ledger: allocated")
        mem.axhline(r["card_bytes"] / 2**20, color="grey", linestyle="--", label="card")
        for agent, x in sorted(dec["agents"].items()):
            if x["device"] == i and x["times"]:
                tok.step(x["times"], range(1, len(x["times"]) + 1), where="post",
                         label=f"{agent}: {x['status'] if x['status'] == 'ok' else x['code']}")
        for ax in (mem, tok):
            ax.axvline(t_kill, color="red", linewidth=1, label=f"device {k}'s worker killed")
            if i == k:
                ax.axvline(t_kill + dec["respawn"]["ready_s"], color="green", linestyle=":",
                           label="its new worker ready")
            ax.set_xlabel("seconds")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        name = r["cards"][i]["name"] if r["cards"] else "declared CPU device"
        mem.set_title(f"device {i} ({name}): memory")
        mem.set_ylabel("MiB (NVML)" if r["gpu"] else "RSS MiB")
        tok.set_title(f"device {i}: tokens streamed per agent")
        tok.set_ylabel("tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(r, out_dir):
    """results.json, devices.md and devices.png under out_dir; the markdown is printed."""
    r["verdicts"], r["not_run"] = verdicts(r), not_run(r)
    benchlib.dump(r, os.path.join(out_dir, "results.json"))
    text = markdown(r)
    with open(os.path.join(out_dir, "devices.md"), "w") as fh:
        fh.write(text)
    try:
        draw(r, os.path.join(out_dir, "devices.png"))
    except ImportError:
        click.echo("devices_x2: matplotlib missing; no PNG (rerun with --replot)", err=True)
    click.echo(text)

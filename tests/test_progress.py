"""REGISTER load progress: llama.cpp's progress callback in the worker, relayed by the broker as
partial replies to the REGISTER that loads the model (and only when it asked), shown by
lmx-probe as a bar on a terminal."""
import os
import pty
import subprocess
import sys

from lmx.worker.model import LoadProgress


def test_the_relay_throttles_never_goes_back_and_ends_at_one():
    sent, clock = [], [0.0]
    relay = LoadProgress(sent.append, clock=lambda: clock[0])
    for step in range(1000):                       # 1000 readings in 0.5 s
        clock[0] = step * 0.0005
        relay.offer(step / 1000)
    relay.offer(0.5)                               # llama.cpp never goes back; nor do we
    relay.finish()
    relay.finish()
    assert sent[0] == 0.0 and sent[-1] == 1.0 and sent.count(1.0) == 1
    assert sent == sorted(sent)
    assert all(b - a >= LoadProgress.MIN_STEP - 1e-9 for a, b in zip(sent[:-2], sent[1:-1]))
    assert len(sent) <= 1 / LoadProgress.MIN_STEP + 2
    clock[0], late = 10.0, []                      # slow loads: a reading per MIN_GAP_S
    slow = LoadProgress(late.append, clock=lambda: clock[0])
    for i in range(5):
        clock[0] = 10.0 + i * (LoadProgress.MIN_GAP_S + 0.001)
        slow.offer(0.01 * i)
    assert late == [0.0, 0.01, 0.02, 0.03, 0.04]


def test_only_the_register_that_loads_the_model_gets_progress(shared_broker):
    with shared_broker.client() as c:
        replies = list(c.replies(c.send("REGISTER", agent="load-1", model="gemma", n_ctx=256,
                                        progress=True)))
        again = []
        second = c.register("load-2", "gemma", n_ctx=256, progress=again.append)
        silent = list(c.replies(c.send("REGISTER", agent="load-3", model="smol", n_ctx=256)))
        for agent in ("load-1", "load-2", "load-3"):
            c.unregister(agent)
    *partials, final = replies
    fractions = [p["progress"] for p in partials]
    assert final["status"] == "ok" and final["model_loaded"] is True
    assert partials and all(p["status"] == "partial" and p["agent"] == "load-1" and
                            p["id"] == final["id"] for p in partials)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert len(fractions) >= 2 and 0.0 <= fractions[0] < 1.0
    assert second["model_loaded"] is False and again == []       # loaded already: none
    # without progress: the one final reply, as before
    assert [r["status"] for r in silent] == ["ok"] and silent[0]["model_loaded"] is True


def _probe_on_a_terminal(endpoint, *args):
    """lmx-probe with its stdout on a pseudo-terminal: (exit status, what it wrote)."""
    main, other = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "lmx.common.probe", "--endpoint", endpoint,
                             *args], stdout=other, stderr=subprocess.PIPE,
                            env=dict(os.environ, TERM="xterm", COLUMNS="100"))
    os.close(other)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:                            # EIO: the probe closed its side
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    return proc.wait(60), out.decode(errors="replace")


def test_the_probe_shows_a_bar_on_a_terminal_and_nothing_in_a_pipe(shared_broker):
    ep = shared_broker.endpoint
    code, out = _probe_on_a_terminal(ep, "REGISTER", "bar-1", "smol")
    assert code == 0 and "loading smol" in out and "status: ok" in out
    with shared_broker.client() as c:
        c.unregister("bar-1")                      # smol is freed: the next one loads it
    piped = subprocess.run([sys.executable, "-m", "lmx.common.probe", "--endpoint", ep,
                            "REGISTER", "bar-2", "smol"], capture_output=True, text=True)
    assert piped.returncode == 0 and piped.stdout.startswith("status: ok\n")
    assert "model_loaded: true" in piped.stdout
    assert "loading" not in piped.stdout and "\x1b" not in piped.stdout
    with shared_broker.client() as c:
        c.unregister("bar-2")


def test_the_core_relays_progress_only_to_a_register_that_asked():
    from core_harness import Harness
    from lmx.broker.core.events import WorkerProgress
    h = Harness()
    asked = h.send("REGISTER", agent="a", model="small", progress=True)
    quiet = h.send("REGISTER", agent="b", model="big")
    for job in h.jobs("REGISTER"):
        h.feed(WorkerProgress(job.job_id, 0.5, h.now))
    h.run_jobs()
    partials = [r for r in h.replies[(b"c1", asked)] if r["status"] == "partial"]
    assert partials == [{"agent": "a", "progress": 0.5, "status": "partial"}]
    assert h.final(asked)["status"] == "ok"
    assert [r["status"] for r in h.replies[(b"c1", quiet)]] == ["ok"]

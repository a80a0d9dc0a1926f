"""Seats: a group's context holds many agents, and parking or restoring one never rebuilds it.

32 agents on SmolLM2 in one group; 10 more take the seats of 10 parked ones (same model: the
seat is swapped, not rebuilt); the 10 parked ones come back by parking others; every
continuation equals an uninterrupted one; STATUS's context_builds does not move.
"""
import threading

import pytest

N_CTX = 256
PROMPTS = [f"Agent {i} writes: the {w} is" for i, w in
           enumerate(["sky", "sea", "road", "tree", "cat", "door", "song", "book", "lamp",
                      "hill"] * 4)]


@pytest.fixture(scope="module")
def seats_broker(tmp_path_factory, table):
    from conftest import BrokerProc
    b = BrokerProc(tmp_path_factory.mktemp("seats"), [
        "--vram-table", str(table), "--vram-total", "8GiB", "--admit-by-parking",
        "--max-live-contexts", "32", "--default-n-ctx", str(N_CTX)])
    yield b
    b.stop()


def _together(broker, agents, prompts, n):
    """Every agent decodes at once (one client each); their replies by agent."""
    out = {}

    def run(agent, prompt):
        with broker.client() as c:
            out[agent] = c.decode(agent, prompt, n)

    threads = [threading.Thread(target=run, args=a) for a in zip(agents, prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_32_agents_park_and_restore_10_without_a_rebuild(seats_broker):
    p = [f"p{i}" for i in range(32)]
    r = [f"r{i}" for i in range(10)]
    with seats_broker.client() as c:
        for agent in p:
            c.register(agent, "smol")
        grown = c.request("STATUS")
        (group,) = grown["groups"]
        assert (group["seats"], group["seats_used"]) == (32, 32)
        assert grown["context_builds"] == 6          # 1, 2, 4, 8, 16, 32 seats: O(log N)
        first = _together(seats_broker, p, PROMPTS, 12)
        assert max(x["batch"] for x in first.values()) > 1     # decoded together
        victims = []
        with seats_broker.client() as other:         # (32 agents per client at most)
            replies = [other.register(agent, "smol") for agent in r]
        for reply in replies:                        # each parked an idle p, took its seat
            assert len(reply["kv_swap_parked"]) == 1 and reply["kv_swap_parked"][0] in p
            victims += reply["kv_swap_parked"]
        listed = {a["agent"]: a for a in c.list_agents()}
        assert len(set(victims)) == 10
        assert all(listed[v]["residence"] == "parked_ram" for v in victims)
        prompts = [PROMPTS[p.index(v)] for v in victims]
        again = _together(seats_broker, r, prompts, 12)
        for agent, victim in zip(r, victims):        # a fresh seat behaves like a fresh agent
            assert again[agent]["tokens"] == first[victim]["tokens"]
        # The 10 parked agents continue, each parking an idle p (least recently used), and
        # the 10 r agents, never parked, continue the same conversations uninterrupted.
        resumed = {v: c.decode(v, " and then", 10) for v in victims}
        assert all(x["kv_swap_restored"] for x in resumed.values())
        assert not set(sum((x["kv_swap_parked"] for x in resumed.values()), [])) & set(r)
        ref = _together(seats_broker, r, [" and then"] * 10, 10)
        for agent, victim in zip(r, victims):
            assert resumed[victim]["tokens"] == ref[agent]["tokens"]
            assert not ref[agent]["kv_swap_restored"]
        status = c.request("STATUS")
        assert status["context_builds"] == grown["context_builds"]   # parking never rebuilt
        (group,) = status["groups"]
        assert (group["seats"], group["seats_used"], group["rebuilds"]) == (32, 32, 5)
        assert sum(a["parks"] for a in c.list_agents()) == 20
        assert status["ledger_allocated_bytes"] == sum(status["bookings"].values())
        for agent in p + r:
            c.unregister(agent)
        assert c.request("STATUS")["ledger_allocated_bytes"] == 0

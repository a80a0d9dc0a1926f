"""worker/batchplan.py without llama.cpp: every planned batch is one ubatch under llama.cpp's
split_equal(sequential) rule (emulated here), fillers are where they must be, the oldest
newcomer always advances, and no batch passes n_ubatch."""
import random
from types import SimpleNamespace

import pytest

from lmx.worker import batchplan


def ubatches(items, n_ubatch):
    """How many ubatches llama.cpp's split_equal(sequential=True) makes of a batch of
    (seq, pos, token, row) items (llama-batch.cpp: consecutive sequence ids, the same number of
    tokens from each, at most n_ubatch tokens)."""
    used = [False] * len(items)
    count = 0
    while not all(used):
        seqs, last = [], None
        for i, (seq, *_rest) in enumerate(items):
            if used[i] or seq in seqs:
                continue
            if seqs and seq != last + 1:
                continue
            seqs.append(seq)
            last = seq
        per_seq = {s: [i for i, it in enumerate(items) if it[0] == s and not used[i]]
                   for s in seqs}
        k = 0
        while all(len(per_seq[s]) > k for s in seqs):
            for s in seqs:
                used[per_seq[s][k]] = True
            k += 1
            if (k + 1) * len(seqs) > n_ubatch:
                break
        count += 1
    return count


def make_group(capacity, n_ctx=4096):
    """A group of `capacity` free seats."""
    return SimpleNamespace(spec=SimpleNamespace(n_ctx=n_ctx), seats=[None] * capacity)


class Slot:
    def __init__(self, seq, n_past, pending, n_ctx=4096):
        self.seq, self.tokens, self.pending, self.n_ctx = seq, [7] * n_past, pending, n_ctx

    @property
    def n_past(self):
        return len(self.tokens)


def newcomer(group, seq, prompt_len, n_past=0):
    slot = Slot(seq, n_past, list(range(100, 100 + prompt_len)), group.spec.n_ctx)
    group.seats[seq] = slot
    return SimpleNamespace(slot=slot)


def runner(group, seq, n_past):
    slot = Slot(seq, n_past, [5], group.spec.n_ctx)
    group.seats[seq] = slot
    return SimpleNamespace(slot=slot)


def test_sixty_four_newcomers_of_ragged_prompts_go_in_one_ubatch_per_step():
    group = make_group(64)
    seats = random.Random(1).sample(range(64), 64)
    fresh = [newcomer(group, s, 9 + s % 3) for s in seats]
    steps = 0
    while any(len(r.slot.pending) > 1 for r in fresh):
        waiting = [r for r in fresh if len(r.slot.pending) > 1]
        items, fillers, chosen = batchplan.prompt_batch(group, waiting, 512)
        assert len(items) <= 512 and ubatches(items, 512) == 1
        assert waiting[0] in chosen
        steps += 1
    assert steps <= 4             # 64 seats x 8 tokens, then the 1-3 tokens left, a step each
    for r, seq in zip(fresh, seats):   # in the cache in order (at most one left: a row)
        assert r.slot.tokens + r.slot.pending == list(range(100, 109 + seq % 3))


def test_fillers_sit_between_newcomers_at_the_next_positions_of_their_seats():
    group = make_group(8)
    a, b = newcomer(group, 1, 6), newcomer(group, 5, 10)
    busy = runner(group, 3, 40)              # a running agent between them
    items, fillers, chosen = batchplan.prompt_batch(group, [a, b], 512)
    assert chosen == [a, b]
    assert fillers == [(2, 0), (3, 40), (4, 0)]
    assert len(items) == 5 * 6 and ubatches(items, 512) == 1
    assert [it[1] for it in items if it[0] == 3] == list(range(40, 46))
    rows = [it[3] for it in items if it[3] is not None]
    assert rows == [a]                       # a's prompt ended: its row is its last token
    assert b.slot.pending == list(range(106, 110)) and busy.slot.pending == [5]


def test_a_seat_with_no_room_for_fillers_ends_the_window():
    group = make_group(4, n_ctx=64)
    a, b = newcomer(group, 0, 20), newcomer(group, 2, 20)
    runner(group, 1, 64)                     # full: no filler fits
    items, fillers, chosen = batchplan.prompt_batch(group, [a, b], 512)
    assert chosen == [a] and fillers == [] and len(items) == 20


def test_a_long_prompt_is_not_held_to_the_pace_of_a_far_window():
    group = make_group(64)
    old = newcomer(group, 0, 2000)
    far = newcomer(group, 63, 2000)
    items, fillers, chosen = batchplan.prompt_batch(group, [old, far], 512)
    assert chosen == [old] and len(items) == 512 and not fillers   # not 64 seats x 8


@pytest.mark.parametrize("seed", range(20))
def test_random_groups_plan_single_ubatches_within_n_ubatch(seed):
    rnd = random.Random(seed)
    cap, n_ubatch = rnd.choice([4, 16, 64]), rnd.choice([32, 128, 512])
    group = make_group(cap, n_ctx=256)
    runs = []
    for seq in rnd.sample(range(cap), rnd.randint(1, cap)):
        if rnd.random() < 0.5:
            runs.append(runner(group, seq, rnd.randint(0, 254)))
        else:
            runs.append(newcomer(group, seq, rnd.randint(2, 40), rnd.randint(0, 100)))
    rows = batchplan.rows_batch(runs)
    if rows:
        items, fillers = batchplan.contiguous(group, rows)
        assert ubatches(items, 10 ** 6) == 1
        assert not {seq for seq, _ in fillers} & {r.slot.seq for r in runs if r.slot.pending == []}
    fresh = [r for r in runs if len(r.slot.pending) > 1]
    if fresh:
        items, fillers, chosen = batchplan.prompt_batch(group, fresh, n_ubatch)
        assert len(items) <= n_ubatch and ubatches(items, n_ubatch) == 1
        assert fresh[0] in chosen
        for seq, pos in fillers:
            assert pos + len([i for i in items if i[0] == seq]) <= 256


def test_without_fillers_the_window_holds_adjacent_newcomers_only():
    group = make_group(8)
    a, b, c = newcomer(group, 1, 6), newcomer(group, 2, 9), newcomer(group, 5, 10)
    items, fillers, chosen = batchplan.prompt_batch(group, [a, b, c], 512, fillers=False)
    assert chosen == [a, b] and fillers == [] and len(items) == 2 * 6
    items, fillers, chosen = batchplan.prompt_batch(group, [c, a], 512, fillers=False)
    assert chosen == [c] and fillers == [] and len(items) == 10

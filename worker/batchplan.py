"""What one step of a group puts into llama_decode (plain Python: no llama.cpp here).

A group's context keeps one KV stream per seat (``kv_unified`` off), and llama.cpp splits such a
batch into micro-batches (ubatches) with ``split_equal(sequential)``: a ubatch holds consecutive
sequence ids only, and the same number of tokens from each. Every ubatch of a new shape costs a
graph build and a round of kernel launches (about 5 ms for a 30-layer model on the H200,
whatever its size), so a step is planned as at most two batches that split into one ubatch each
(on the CPU, where a batch costs by its tokens, the prompts' batch takes no fillers):

- the rows: the one pending token of every running agent, in seat order, with a one-token
  filler for every seat between them that has none (``contiguous``);
- the prompts: chunks of the newcomers' prompts, all of one length L, over a window of seats,
  with an L-token filler for every other seat inside the window (``prompt_batch``). Prompts of
  different lengths in one batch, or seats with gaps, would otherwise cost a ubatch per
  newcomer (64 newcomers took 50-90 ms a step on the H200 instead of 5-10).

A filler is evaluated without logits at the next positions of its seat and removed right after
the decode (the seat's cells are as before). A seat too close to its n_ctx for a filler ends
the window there.
"""


def _filler_room(group, seq):
    """Positions a filler may take on seat seq (from where): (room, first position)."""
    slot = group.seats[seq]
    if slot is None:
        return group.spec.n_ctx, 0
    return slot.n_ctx - slot.n_past, slot.n_past


def contiguous(group, items):
    """The rows batch in seat order, with a one-token filler for every seat between the first
    and the last row that has none, and those fillers [(seq, pos)] (removed after the decode).
    A full seat gets no filler (it would not fit)."""
    items = sorted(items, key=lambda item: item[0])       # stable: a chunk keeps its order
    present = {item[0] for item in items}
    fillers = []
    for seq in range(items[0][0], items[-1][0] + 1):
        if seq in present:
            continue
        room, pos = _filler_room(group, seq)
        if room > 0:
            fillers.append((seq, pos))
    if not fillers:
        return items, fillers
    merged = items + [(seq, pos, 0, None) for seq, pos in fillers]
    return sorted(merged, key=lambda item: item[0]), fillers


def rows_batch(runs):
    """[(seq, pos, token, run)] for every run with exactly one pending token (its next row);
    the tokens move from pending to the slot's tokens (they are in the KV cache after the
    decode)."""
    items = []
    for run in runs:
        slot = run.slot
        if len(slot.pending) == 1:
            items.append((slot.seq, slot.n_past, slot.pending[0], run))
            slot.tokens.append(slot.pending.pop())
    return items


def _window(group, fresh, n_ubatch, fillers):
    """The newcomers (a run of them in seat order, always with the oldest) and the chunk
    length L that give the most prompt tokens in one ubatch of n_ubatch; without fillers,
    only newcomers on adjacent seats."""
    order = sorted(fresh, key=lambda run: run.slot.seq)
    at = order.index(fresh[0])

    def gap_room(a, b):            # the least filler room over the seats strictly between
        if not fillers and b > a + 1:
            return 0
        rooms = [_filler_room(group, s)[0] for s in range(a + 1, b)]
        return min(rooms, default=n_ubatch)

    def value(i, j, gaps):
        span = order[j].slot.seq - order[i].slot.seq + 1
        length = min(min(len(r.slot.pending) for r in order[i:j + 1]), n_ubatch // span, gaps)
        return (j - i + 1) * length, length

    i = j = at
    gaps = n_ubatch
    best, length = value(i, j, gaps)
    while True:
        options = []
        if i > 0:
            g = min(gaps, gap_room(order[i - 1].slot.seq, order[i].slot.seq))
            options.append((value(i - 1, j, g), i - 1, j, g))
        if j < len(order) - 1:
            g = min(gaps, gap_room(order[j].slot.seq, order[j + 1].slot.seq))
            options.append((value(i, j + 1, g), i, j + 1, g))
        if not options:
            break
        (score, size), ni, nj, ng = max(options, key=lambda o: o[0][0])
        if score <= best:
            break
        best, length, i, j, gaps = score, size, ni, nj, ng
    return order[i:j + 1], max(1, length)


def prompt_batch(group, fresh, n_ubatch, fillers=True):
    """(items, fillers, the runs in it) for the newcomers' prompts (fresh: runs with more than
    one pending token, oldest first): L tokens of each newcomer in a window of seats, an
    L-token filler on every other seat in it; a newcomer whose prompt ends here has its row
    (logits) at its last token. The tokens move from pending to the slot's tokens.

    fillers=False (the CPU, where a batch costs by its tokens, not by its ubatches): the
    window holds newcomers on adjacent seats only, no filler is computed for nothing."""
    chosen, length = _window(group, fresh, n_ubatch, fillers)
    first, last = chosen[0].slot.seq, chosen[-1].slot.seq
    runs = {run.slot.seq: run for run in chosen}
    items, fillers = [], []
    for seq in range(first, last + 1):
        run = runs.get(seq)
        if run is None:
            _, pos = _filler_room(group, seq)
            fillers.append((seq, pos))
            items += [(seq, pos + k, 0, None) for k in range(length)]
            continue
        slot = run.slot
        part, slot.pending = slot.pending[:length], slot.pending[length:]
        end = len(part) - 1 if not slot.pending else -1
        items += [(seq, slot.n_past + k, tok, run if k == end else None)
                  for k, tok in enumerate(part)]
        slot.tokens.extend(part)
    return items, fillers, chosen

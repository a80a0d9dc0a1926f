"""The batch's min-p prefilter picks exactly the token llama.cpp's chain picks over the whole
row (real SmolLM2 on CPU, seeded chains, one batch)."""
from lmx.common.ctxspec import ContextSpec
from lmx.common.jobs import ChatJob, Sampling
from lmx.worker.engine import Engine


def _run_together(eng, jobs, slow):
    runs = [eng.start_chat(j.agent, j) for j in jobs]
    for run, force in zip(runs, slow):
        if force:
            run.chain.min_p = None           # llama_sampler_sample over the whole row
    eng.prepare(runs)
    active = list(runs)
    while active:
        eng.step(active)
        active = [r for r in active if r.result is None]
    for run in runs:
        run.close()
    return [r.result.content for r in runs], [r.chain for r in runs]


def test_prefiltered_rows_equal_whole_row_sampling(smol_path):
    eng = Engine(2, gpu=False, pinned=False, max_batch=8)
    names = [f"a{i}" for i in range(4)]
    try:
        for name in names:
            eng.register(name, smol_path, ContextSpec(n_ctx=512))
        msgs = [{"role": "user", "content": "Write a line about autumn."}]
        jobs = [ChatJob(n, msgs, 24, Sampling(temperature=1.0, top_k=40, top_p=0.95,
                                              min_p=0.05, seed=7 + (i % 2)))
                for i, n in enumerate(names)]
        # a0 and a2 share seed 7, a1 and a3 seed 8; a2 and a3 take the whole-row path
        texts, chains = _run_together(eng, jobs, [False, False, True, True])
        assert chains[0].min_p == 0.05                    # the fast path was really taken
        assert texts[0] == texts[2] and texts[1] == texts[3]
        assert texts[0] != texts[1]                       # different seeds: it can fail
    finally:
        eng.close()

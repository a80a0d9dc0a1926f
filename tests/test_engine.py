"""The worker's engine in-process with real llama.cpp on CPU: refcounts, swaps, exactness."""
import pytest

from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import Code, LmxError, Reason
from ggufs import write_unknown_arch


@pytest.fixture(scope="module")
def engine():
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False)
    yield eng
    eng.close()


def test_models_are_shared_by_refcount(engine, smol_path):
    assert engine.register("a", smol_path, ContextSpec(n_ctx=512))["model_loaded"] is True
    again = engine.register("b", smol_path, ContextSpec(n_ctx=512))
    assert again["model_loaded"] is False and again["model_refs"] == 2
    assert engine.unregister("a") == {"model_freed": False}
    assert engine.unregister("b") == {"model_freed": True}
    assert engine.models == {} and engine.slots == {}


def test_failed_load_leaves_nothing(engine, tmp_path):
    odd = write_unknown_arch(tmp_path / "odd.gguf")
    with pytest.raises(LmxError) as info:
        engine.register("odd", str(odd), ContextSpec(n_ctx=512))
    assert info.value.reason == Reason.LOAD_FAILED
    assert "nonesuch" in info.value.message or "architecture" in info.value.message
    assert engine.models == {} and engine.slots == {}


def test_swap_and_restore_is_exact(engine, smol_path, gemma_path):
    engine.register("s", smol_path, ContextSpec(n_ctx=1024))
    engine.register("g", gemma_path, ContextSpec(n_ctx=1024))
    engine.register("ref", smol_path, ContextSpec(n_ctx=1024))
    try:
        first = engine.decode("s", "Hello, my name is", 16)
        assert first["kv_swap_evicted"] is None and not first["kv_swap_restored"]
        other = engine.decode("g", "The capital of France is", 8)
        assert other["kv_swap_evicted"] == "s"
        assert engine.summary()["slots"]["s"]["parked_bytes"] > 0
        resumed = engine.decode("s", "The weather today is", 16)
        assert resumed["kv_swap_evicted"] == "g" and resumed["kv_swap_restored"] is True
        # The same conversation with no swap in between.
        ref1 = engine.decode("ref", "Hello, my name is", 16)
        ref2 = engine.decode("ref", "The weather today is", 16)
        assert ref1["tokens"] == first["tokens"]
        assert ref2["tokens"] == resumed["tokens"] and ref2["text"] == resumed["text"]
        assert not ref2["kv_swap_restored"]
    finally:
        for agent in ("s", "g", "ref"):
            engine.unregister(agent)


def test_context_full_is_refused_before_any_work(engine, smol_path):
    engine.register("c", smol_path, ContextSpec(n_ctx=64))
    try:
        with pytest.raises(LmxError) as info:
            engine.decode("c", "Hello " * 40, 40)
        assert info.value.code == Code.CONTEXT_FULL
        assert engine.live is None or engine.live.agent != "c"
        assert engine.decode("c", "Hi", 4)["generated_tokens"] >= 1
    finally:
        engine.unregister("c")


def test_several_live_contexts_park_the_least_recently_used(smol_path):
    from lmx.worker.engine import Engine
    eng = Engine(2, gpu=False, pinned=False, max_live=2)
    try:
        for agent in ("a", "b", "c", "ref"):
            eng.register(agent, smol_path, ContextSpec(n_ctx=512))
        a1 = eng.decode("a", "Hello, my name is", 8)
        b1 = eng.decode("b", "The sky is", 4)
        assert b1["kv_swap_evicted"] is None                 # a stays live beside b
        again = eng.decode("a", "I like", 8)
        assert (again["kv_swap_evicted"], again["kv_swap_restored"]) == (None, False)
        assert again["context_measured"] is None             # no context was built
        c1 = eng.decode("c", "Once", 4)
        assert c1["kv_swap_evicted"] == "b"                   # b was the least recently used
        assert sorted(eng.summary()["live_agents"]) == ["a", "c"]
        b2 = eng.decode("b", "and then", 4)
        assert b2["kv_swap_restored"] is True and b2["kv_swap_evicted"] == "a"
        ref1 = eng.decode("ref", "Hello, my name is", 8)
        ref2 = eng.decode("ref", "I like", 8)
        assert [ref1["tokens"], ref2["tokens"]] == [a1["tokens"], again["tokens"]]
        for agent in ("a", "b", "c", "ref"):
            eng.unregister(agent)
        assert not eng.standby and eng.live is None
    finally:
        eng.close()

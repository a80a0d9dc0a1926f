"""Quotas per client (--quotas): the file's checks, then one real broker (its worker,
SmolLM2 on CPU) where each quota is refused with its numbers and nothing booked, STATUS and
the metrics show them, and a gateway turns a refusal into 429 with Retry-After."""
import time

import openai
import pytest

from lmx.broker.core import seats
from lmx.broker.estimate import estimate
from lmx.common import quotas
from lmx.common.config import load_model_table
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import LmxError
from lmx.gateway.launch import GatewayProc, free_port, toml_config
from test_metrics import scrape, value

N_CTX = 256
KEYS = {name: f"sk-test-{name}-key" for name in ("alice", "bob", "carol", "dave", "erin")}


# -- the file ---------------------------------------------------------------------------------

def test_the_example_file_loads():
    config = quotas.load("configs/quotas.example.toml")
    assert config.limits("coder").max_booked_bytes == 1 << 30
    assert config.limits("default").max_agents == 8
    assert config.client_for("sk-lmx-coder-change-me").name == "coder"


@pytest.mark.parametrize("data, words", [
    ({"clients": [{"name": "a", "key": "12345678", "max_agent": 1}]},
     "clients[0]: unknown fields ['max_agent']"),
    ({"default": {"max_n_ctx": "lots"}}, "default.max_n_ctx must be an integer >= 0"),
    ({"default": {"max_booked_bytes": "2 parsecs"}}, "default.max_booked_bytes: not a size"),
    ({"default": {"tokens_per_minute": -1}}, "default.tokens_per_minute must be"),
    ({"default": {"max_agents": True}}, "default.max_agents must be an integer"),
    ({"clients": [{"name": "a", "key": "short"}]}, "clients[0] needs key (8 characters"),
    ({"clients": [{"name": "a", "key_env": "LMX_TEST_UNSET_VAR"}]},
     "environment variable LMX_TEST_UNSET_VAR is not set"),
    ({"clients": [{"name": "default", "key": "12345678"}]}, "clients[0].name must be"),
    ({"clients": [{"name": "a", "key": "12345678"}, {"name": "b", "key": "12345678"}]},
     "clients[1] has the same key as client 'a'"),
    ({"client": []}, "unknown tables ['client']"),
])
def test_a_bad_file_is_refused_naming_the_file_and_field(data, words):
    with pytest.raises(quotas.QuotaFileError) as info:
        quotas.from_dict(data, "q.toml")
    assert str(info.value).startswith("q.toml: ") and words in str(info.value)


def test_sizes_and_key_env(monkeypatch):
    monkeypatch.setenv("LMX_TEST_KEY", "sk-from-the-environment")
    config = quotas.from_dict({"clients": [{"name": "a", "key_env": "LMX_TEST_KEY",
                                            "max_booked_bytes": "2GiB"}]})
    assert config.client_for("sk-from-the-environment").limits.max_booked_bytes == 2 << 30
    assert config.client_for("sk-something-else") is None


# -- a real broker ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seat(table):
    """The seat (KV) bytes one SmolLM2 agent of N_CTX books: what max_booked_bytes counts."""
    est = estimate("smol", ContextSpec(n_ctx=N_CTX, n_gpu_layers=0), load_model_table(table))
    return seats.split(est)[0]


@pytest.fixture(scope="module")
def quota_file(tmp_path_factory, seat):
    path = tmp_path_factory.mktemp("quotas") / "quotas.toml"
    limits = {"alice": "max_agents = 2", "bob": "max_n_ctx = 512",
              "carol": f"max_booked_bytes = {seat + seat // 2}",
              "dave": "tokens_per_minute = 20", "erin": "tokens_per_minute = 10"}
    path.write_text("[default]\nmax_agents = 1\n" + "".join(
        f'[[clients]]\nname = "{n}"\nkey = "{KEYS[n]}"\nmodels = ["smol"]\n{limits[n]}\n'
        for n in KEYS))
    return path


@pytest.fixture(scope="module")
def broker(tmp_path_factory, table, quota_file):
    from conftest import BrokerProc
    port = free_port()
    b = BrokerProc(tmp_path_factory.mktemp("quota-broker"), [
        "--vram-table", str(table), "--default-n-ctx", str(N_CTX), "--quotas", str(quota_file),
        "--metrics", f"127.0.0.1:{port}", "--chat-template", "smol=chatml"])
    b.port = port
    yield b
    b.stop()


def ledger(client):
    s = client.status()
    return s["ledger_allocated_bytes"], s["bookings"]


def refused(client, call, *args, **kw):
    """The QUOTA refusal of a call, checking that the ledger did not move."""
    before = ledger(client)
    with pytest.raises(LmxError) as info:
        call(*args, **kw)
    assert ledger(client) == before
    assert info.value.code == "QUOTA", info.value
    return info.value


def test_max_agents_refused_with_the_numbers(broker):
    with broker.client(key=KEYS["alice"]) as c:
        c.register("alice-1", "smol")
        c.register("alice-2", "smol")
        err = refused(c, c.register, "alice-3", "smol")
        names = {a["agent"] for a in c.list_agents()}
        status = c.status()
    d = err.details
    assert (err.reason, d["quota"], d["client"]) == ("MAX_AGENTS", "max_agents", "alice")
    assert (d["limit"], d["use"], d["requested"], d["retry_after_s"]) == (2, 2, 1, None)
    assert "alice-3" not in names
    q = status["quotas"]["alice"]
    assert q["limits"]["max_agents"] == 2 and q["use"]["max_agents"] == 2
    assert q["limits"]["tokens_per_minute"] is None
    with broker.client(key=KEYS["alice"]) as c:     # unregistering makes room again
        c.unregister("alice-2")
        c.register("alice-3", "smol")
        assert c.status()["quotas"]["alice"]["use"]["max_agents"] == 2


def test_max_n_ctx_refused_with_the_numbers(broker):
    with broker.client(key=KEYS["bob"]) as c:
        err = refused(c, c.register, "bob-big", "smol", n_ctx=1024)
        c.register("bob-ok", "smol", n_ctx=512)
    d = err.details
    assert (err.reason, d["quota"], d["limit"], d["use"]) == ("MAX_N_CTX", "max_n_ctx", 512,
                                                              1024)


def test_max_booked_bytes_counts_seats_and_refuses_with_the_numbers(broker, seat):
    with broker.client(key=KEYS["carol"]) as c:
        c.register("carol-1", "smol")
        agent = next(a for a in c.list_agents() if a["agent"] == "carol-1")
        assert agent["client"] == "carol" and agent["booked_bytes"] == seat
        err = refused(c, c.register, "carol-2", "smol")
    d = err.details
    assert (err.reason, d["quota"]) == ("MAX_BOOKED_BYTES", "max_booked_bytes")
    assert (d["limit"], d["use"], d["requested"]) == (seat + seat // 2, seat, seat)


def test_tokens_per_minute_refused_with_a_plausible_retry(broker):
    with broker.client(key=KEYS["dave"]) as c:
        c.register("dave-1", "smol")
        t0 = time.monotonic()
        first = c.decode("dave-1", "Hello, my name is", 16)
        spent = first["prompt_tokens"] + first["generated_tokens"]
        assert spent >= 20
        err = refused(c, c.decode, "dave-1", " and", 4)
        waited = time.monotonic() - t0
        status = c.status()
    d = err.details
    assert (err.reason, d["quota"], d["limit"], d["use"]) == (
        "TOKENS_PER_MINUTE", "tokens_per_minute", 20, spent)
    # the first run's tokens leave the window 60 s after it ended
    assert 60 - waited - 1 <= d["retry_after_s"] <= 60
    assert status["quotas"]["dave"]["use"]["tokens_per_minute"] == spent


def test_a_wrong_key_is_refused_and_no_key_is_the_default_client(broker):
    with broker.client(key="sk-nobody-has-this") as c:
        before = ledger(c)
        for call, args in ((c.register, ("stranger", "smol")),
                           (c.decode, ("alice-1", "Hi", 2))):
            with pytest.raises(LmxError) as info:
                call(*args)
            assert (info.value.code, info.value.reason) == ("FORBIDDEN", "UNKNOWN_CLIENT_KEY")
        assert ledger(c) == before
    with broker.client() as c:
        c.register("anon-1", "smol")
        err = refused(c, c.register, "anon-2", "smol")
        assert c.decode("alice-1", "Hi", 2)["generated_tokens"] == 2  # anyone may run it
        assert c.status()["quotas"]["default"]["use"]["max_agents"] == 1
    assert (err.details["client"], err.details["limit"], err.details["use"]) == (
        "default", 1, 1)


def test_metrics_show_limits_use_and_denials(broker):
    samples = scrape(broker.port)
    assert value(samples, "lmx_quota_limit", client="alice", quota="max_agents") == 2
    assert value(samples, "lmx_quota_use", client="alice", quota="max_agents") == 2
    assert value(samples, "lmx_quota_denials_total", client="alice", quota="max_agents") == 1
    assert value(samples, "lmx_quota_denials_total", client="bob", quota="max_n_ctx") == 1
    assert value(samples, "lmx_quota_denials_total", client="dave",
                 quota="tokens_per_minute") == 1
    assert value(samples, "lmx_denials_total", code="QUOTA", reason="MAX_BOOKED_BYTES") == 1
    assert ("lmx_quota_limit", frozenset({("client", "alice"),
                                          ("quota", "max_n_ctx")})) not in samples


def test_the_gateway_answers_a_quota_with_429_and_retry_after(broker, quota_file, tmp_path):
    gw = GatewayProc(tmp_path, broker.endpoint, toml_config({
        "smol": {"model": "smol", "n_ctx": N_CTX}, "gemma": {"model": "gemma"}}),
        args=("--quotas", str(quota_file)))
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS["erin"], max_retries=0)
        ask = dict(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        first = client.chat.completions.create(**ask)
        assert first.usage.total_tokens >= 10
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(**ask)
        with pytest.raises(openai.NotFoundError):      # the quotas file's models apply
            client.chat.completions.create(**dict(ask, model="gemma"))
    finally:
        gw.stop()
    err = info.value
    assert err.code == "quota_exceeded" and err.type == "rate_limit_error"
    assert "tokens_per_minute" in err.message and "limit 10" in err.message
    assert 1 <= int(err.response.headers["retry-after"]) <= 60
    with broker.client() as c:
        assert c.status()["quotas"]["erin"]["use"]["tokens_per_minute"] == \
            first.usage.total_tokens


# -- the core alone (pure: a fake worker and a fake clock) ------------------------------------

def _harness(config=None, **limits):
    from core_harness import Harness
    file = quotas.from_dict({"clients": [{"name": "a", "key": "sk-test-aaaa", **limits}]})
    return Harness(quotas=file, **(config or {}))


def _wait(h, dt):
    """Time passes; the worker keeps heartbeating."""
    from lmx.broker.core.events import WorkerHeartbeat
    h.now += dt
    h.feed(WorkerHeartbeat(None, h.now)).tick()


def test_the_token_window_slides_and_retry_after_is_exact():
    h = _harness(tokens_per_minute=25)
    registered = h.send("REGISTER", agent="x", model="small", key="sk-test-aaaa")
    h.run_jobs()
    assert h.final(registered)["status"] == "ok"
    for n in (10, 15):                  # the fake worker: 1 prompt token + n generated
        h.send("DECODE", agent="x", prompt="p", n_predict=n)
        h.run_jobs()
        _wait(h, 10.0)
    first_end = h.now - 20.0
    refused_id = h.send("DECODE", agent="x", prompt="p", n_predict=1)
    err = h.final(refused_id)
    assert (err["code"], err["client"], err["limit"], err["use"]) == ("QUOTA", "a", 25, 27)
    # 27 - 11 < 25 once the first run (11 tokens) leaves the window, 60 s after it ended
    assert abs(err["retry_after_s"] - (first_end + 60 - h.now)) <= 0.1
    assert not h.jobs()                 # nothing was sent to the worker
    _wait(h, err["retry_after_s"] + 0.01)
    ok = h.send("DECODE", agent="x", prompt="p", n_predict=1)
    h.run_jobs()
    assert h.final(ok)["status"] == "ok"


def test_a_journaled_agent_keeps_its_client_while_the_file_names_it():
    from core_harness import MemJournal, MemMeasured, fake_estimate
    from lmx.broker.core import BrokerConfig, Core
    from lmx.broker.core.events import WorkerReady
    from lmx.common.jobs import DeviceReading
    spec = ContextSpec(n_ctx=256).as_dict()
    journal = MemJournal({"x": {"model": "small", "spec": spec, "client": "a"},
                          "y": {"model": "small", "spec": spec, "client": "gone"}})
    config = quotas.from_dict({"clients": [{"name": "a", "key": "sk-test-aaaa"}]})
    core = Core(BrokerConfig(admission_percent=100, quotas=config), fake_estimate,
                MemMeasured(), journal)
    core.handle(WorkerReady(1, DeviceReading("cpu", "declared", "cpu", 1 << 30), 0.0))
    assert (core.agents["x"].client, core.agents["y"].client) == ("a", "default")
    assert core.status_dynamic()["quotas"]["a"]["use"]["max_agents"] == 1


def test_a_register_waiting_for_room_counts_against_its_client():
    h = _harness({"max_live_contexts": 1}, max_agents=2)
    key = {"key": "sk-test-aaaa"}
    h.send("REGISTER", agent="x", model="small", **key)
    h.run_jobs()
    waiting = h.send("REGISTER", agent="y", model="small", **key)  # x must park first
    assert h.jobs("PARK") and h.final(waiting) is None
    third = h.send("REGISTER", agent="z", model="small", **key)
    err = h.final(third)
    assert (err["code"], err["quota"], err["use"]) == ("QUOTA", "max_agents", 2)
    h.run_jobs()
    assert h.final(waiting)["status"] == "ok"

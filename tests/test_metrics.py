"""`lmx-broker --metrics`: scrape /metrics of a real broker while requests, a denial, parks
and restores happen, and check that the counters move."""
import shutil
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmx.broker.estimate import estimate
from lmx.broker.metrics import parse_listen
from lmx.common.config import load_model_table
from lmx.common.ctxspec import ContextSpec
from lmx.common.errors import LmxError

N_CTX = 512


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    """{(sample name, frozenset of labels): value} from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def metered(tmp_path_factory, table):
    """room_for_two of test_parking (two seats of SmolLM2, admit by parking), with metrics."""
    from conftest import BrokerProc
    est = estimate("smol", ContextSpec(n_ctx=N_CTX, n_gpu_layers=0), load_model_table(table))
    kv = est.estimated["kv"]
    total = (256 << 20) + int((est.context - kv) * 1.1 + 2.5 * kv)
    port = free_port()
    b = BrokerProc(tmp_path_factory.mktemp("metrics"), [
        "--vram-table", str(table), "--vram-total", str(total), "--admission-percent", "100",
        "--admit-by-parking", "--park-ram", "600KiB", "--default-n-ctx", str(N_CTX),
        "--metrics", f"127.0.0.1:{port}"])
    b.port = port
    yield b
    b.stop()


def test_parse_listen():
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "host:", ":80", "host:port"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_counters_move_with_requests_denials_and_parks(metered, tmp_path, smol_path):
    before = scrape(metered.port)
    assert value(before, "lmx_admissions_total") == 0
    assert value(before, "lmx_ledger_cap_bytes") > 0
    with metered.client() as c:
        for agent in ("a", "b"):
            c.register(agent, "smol")
            c.decode(agent, "Hello, my name is", 12)
        mid = scrape(metered.port)
        assert value(mid, "lmx_admissions_total") == 2
        assert value(mid, "lmx_live_agents") == 2
        assert value(mid, "lmx_generation_tokens_total") == 24
        assert value(mid, "lmx_prompt_tokens_total") > 0
        assert value(mid, "lmx_time_to_first_token_seconds_count") == 2
        assert value(mid, "lmx_inter_token_latency_seconds_count") == 22
        assert value(mid, "lmx_agent_booked_bytes", agent="a") > 0
        assert value(mid, "lmx_model_booked_bytes", model="smol", kind="weights") == 256 << 20
        assert value(mid, "lmx_ledger_allocated_bytes") <= value(mid, "lmx_ledger_cap_bytes")

        c.register("c", "smol")                 # no room: parks a (into host RAM)
        c.decode("c", "Once upon a time", 12)
        c.register("d", "smol")                 # parks b: past the host budget, to disk
        parked = scrape(metered.port)
        assert value(parked, "lmx_parks_total", target="ram") == 1
        assert value(parked, "lmx_parks_total", target="disk") == 1
        assert value(parked, "lmx_park_bytes_total", target="ram") > 0
        assert value(parked, "lmx_parked_agents") == 2
        assert value(parked, "lmx_agent_booked_bytes", agent="a") == 0

        r = c.decode("a", " and then", 4)       # a comes back from RAM (parking another)
        assert r["kv_swap_restored"] is True
        parts = list(c.decode_stream("a", " so", 5))
        assert parts
        copy = tmp_path / "smol-copy.gguf"      # booked by a bound that grows with n_ctx
        shutil.copyfile(smol_path, copy)
        with pytest.raises(LmxError) as denied:
            c.register("huge", str(copy), n_ctx=1 << 20)
        after = scrape(metered.port)
    assert (denied.value.code, denied.value.reason) == ("VRAM_LEDGER_DENY", "CAP")
    assert value(after, "lmx_denials_total", code="VRAM_LEDGER_DENY", reason="CAP") == 1
    assert value(after, "lmx_request_errors_total", code="VRAM_LEDGER_DENY") == 1
    assert value(after, "lmx_restores_total", target="ram") == 1
    assert value(after, "lmx_restore_seconds_count", target="ram") == 1
    assert value(after, "lmx_parks_total", target="ram") + value(
        after, "lmx_parks_total", target="disk") == 3
    assert value(after, "lmx_generation_tokens_total") == 36 + 4 + 5
    # the streamed run's 4 gaps are measured per token, the others' as their mean
    assert value(after, "lmx_inter_token_latency_seconds_count") == 33 + 3 + 4
    assert value(after, "lmx_requests_finished_total", verb="DECODE") == 5
    assert value(after, "lmx_num_requests_running") == 0
    assert value(after, "lmx_num_requests_waiting") == 0
    assert value(after, "lmx_worker_restarts_total") == 0
    assert value(after, "lmx_context_builds_total") >= 1
    assert value(after, "lmx_seats", state="used") == 2


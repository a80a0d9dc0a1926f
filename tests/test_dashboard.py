"""configs/grafana-lmx.json: valid, unique panel ids, and every PromQL expression names only
metrics that broker/metrics.py registers (with the suffixes prometheus-client exposes)."""
import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "configs" / "grafana-lmx.json"
METRICS = ROOT / "broker" / "metrics.py"
# The constructor (or helper) that registers a metric -> the series names it exposes.
EXPOSED = {
    "Counter": ("_total",),
    "CounterMetricFamily": ("_total",),
    "Histogram": ("_bucket", "_sum", "_count"),
    "_gauge": ("",),
    "GaugeMetricFamily": ("",),
}


def registered():
    """{exposed series name: base metric name} for every metric broker/metrics.py registers."""
    names = {}
    for node in ast.walk(ast.parse(METRICS.read_text())):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr",
                                                                            None)
        first = node.args[0]
        if func in EXPOSED and isinstance(first, ast.Constant) and isinstance(first.value, str):
            for suffix in EXPOSED[func]:
                names[first.value + suffix] = first.value
    return names


def panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])          # a collapsed row holds its panels


@pytest.fixture(scope="module")
def dash():
    return json.loads(DASHBOARD.read_text())


def exprs(dash):
    return [(p["title"], t["expr"]) for p in panels(dash) for t in p.get("targets", [])]


def test_metrics_module_parses_to_the_known_names():
    names = registered()
    assert {"lmx_ledger_cap_bytes", "lmx_generation_tokens_total", "lmx_denials_total",
            "lmx_time_to_first_token_seconds_bucket", "lmx_context_builds_total",
            "lmx_seats", "lmx_device_other_process_bytes"} <= set(names)
    assert "lmx_generation_tokens" not in names     # a counter is exposed only as _total
    assert len(set(names.values())) >= 30


def test_every_expr_names_only_registered_metrics(dash):
    names = registered()
    found = set()
    for title, expr in exprs(dash):
        used = set(re.findall(r"\blmx_[a-z0-9_]+", expr))
        assert used, f"{title}: {expr} reads no lmx metric"
        unknown = used - set(names)
        assert not unknown, f"{title}: {sorted(unknown)} are not series broker/metrics.py exposes"
        if "histogram_quantile" in expr:
            assert all(n.endswith("_bucket") for n in used), f"{title}: quantile of {used}"
        if "rate(" in expr:
            assert all(n.endswith(("_total", "_bucket")) for n in used), f"{title}: rate of {used}"
        found |= {names[n] for n in used}
    # what issue 14 asks the dashboard to show
    assert {"lmx_ledger_cap_bytes", "lmx_ledger_allocated_bytes", "lmx_model_booked_bytes",
            "lmx_agent_booked_bytes", "lmx_live_agents", "lmx_parked_agents",
            "lmx_num_requests_running", "lmx_num_requests_waiting", "lmx_generation_tokens",
            "lmx_time_to_first_token_seconds", "lmx_inter_token_latency_seconds",
            "lmx_denials", "lmx_parks", "lmx_restores", "lmx_context_builds", "lmx_seats",
            "lmx_device_used_bytes", "lmx_device_other_process_bytes"} <= found


def test_panel_ids_unique_and_datasource_templated(dash):
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    assert dash["schemaVersion"] >= 36
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    assert any(v["type"] == "datasource" and v["name"] == "DS_PROMETHEUS"
               for v in dash["templating"]["list"])
    for p in panels(dash):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert p["targets"], p["title"]

"""The monitoring role's alerts, checked and run by promtool (Debian's prometheus package).

Every alert gets series that fire it and series beside them that must not, through
`promtool test rules`; the rules file is rendered from the role's template with its
defaults and one per-model latency threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import monitoring_lab
import pytest
import yaml

pytestmark = pytest.mark.skipif(monitoring_lab.missing("promtool") is not None,
                                reason=str(monitoring_lab.missing("promtool")))

DAY = 86400


def alerts(name: str, at: str, *labels: dict[str, str]) -> dict[str, Any]:
    """An alert_rule_test: at `at`, alert `name` fires exactly for `labels` (none: it does not fire)."""
    return {"eval_time": at, "alertname": name,
            "exp_alerts": [{"exp_labels": {"alertname": name, **lab}} for lab in labels]}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def requests(model: str, status: str, values: str) -> dict[str, str]:
    return series("llm_gateway_requests_total", values, model=model, endpoint="/v1/chat/completions",
                  status=status, key_id="team")


def buckets(model: str, le_one: str, le_sixty: str) -> list[dict[str, str]]:
    """A duration histogram: counts at or under 1 s and under 60 s (and all)."""
    name = "llm_gateway_request_duration_seconds_bucket"
    return [series(name, le_one, model=model, le="1"), series(name, le_sixty, model=model, le="60"),
            series(name, le_sixty, model=model, le="+Inf")]


TESTS = [
    # The health agent says no server of chat is live; embed keeps one.
    {"interval": "1m", "input_series": [
        series("llm_gateway_model_live_servers", "1 0 0 0 0 0", model="chat", upstream="llm_chat"),
        series("llm_gateway_model_live_servers", "1 1 1 1 1 1", model="embed", upstream="llm_embed"),
        # The health agent's count wins over a scrape that fails (a firewall in the way).
        series("up", "0 0 0 0 0 0", job="llm_model_servers", model="embed", instance="gpu1:8002"),
    ], "alert_rule_test": [
        alerts("LLMModelNoLiveServer", "1m"),
        alerts("LLMModelNoLiveServer", "3m", {"model": "chat", "severity": "critical"}),
    ]},
    # No health agent: every scrape of rerank's servers fails; tool keeps one of two.
    {"interval": "1m", "input_series": [
        series("up", "1 0 0 0 0", job="llm_model_servers", model="rerank", instance="gpu1:8003"),
        series("up", "0 0 0 0 0", job="llm_model_servers", model="rerank", instance="gpu2:8003"),
        series("up", "0 0 0 0 0", job="llm_model_servers", model="tool", instance="gpu1:8004"),
        series("up", "1 1 1 1 1", job="llm_model_servers", model="tool", instance="gpu2:8004"),
    ], "alert_rule_test": [
        alerts("LLMModelNoLiveServer", "1m"),
        alerts("LLMModelNoLiveServer", "3m", {"model": "rerank", "severity": "critical"}),
    ]},
    # chat: 10 % 5xx; embed: 1 % (under the 5 % default); client errors never count.
    {"interval": "1m", "input_series": [
        requests("chat", "200", "0+90x20"), requests("chat", "503", "0+10x20"),
        requests("embed", "200", "0+99x20"), requests("embed", "502", "0+1x20"), requests("embed", "404", "0+50x20"),
        requests("none", "401", "0+500x20"),
    ], "alert_rule_test": [
        alerts("LLMModelHighErrorRate", "4m"),
        alerts("LLMModelHighErrorRate", "15m", {"model": "chat", "severity": "warning"}),
    ]},
    # slow: every request 1-60 s, p99 near 60 s > 30 s; fast: all under 1 s;
    # long: as slow, but its own threshold is 120 s.
    {"interval": "1m", "input_series": [
        *buckets("slow", "0+0x30", "0+10x30"), *buckets("fast", "0+10x30", "0+10x30"),
        *buckets("long", "0+0x30", "0+10x30"),
    ], "alert_rule_test": [
        alerts("LLMModelHighLatencyP99", "10m"),
        alerts("LLMModelHighLatencyP99", "20m", {"model": "slow", "severity": "warning", "threshold": "default"}),
    ]},
    {"interval": "1m", "input_series": [
        series("up", "1 0 0 0 0 0", job="llm_gateway", instance="gw1", gateway="gw1"),
        series("up", "1 1 1 1 1 1", job="llm_gateway", instance="gw2", gateway="gw2"),
    ], "alert_rule_test": [
        alerts("LLMGatewayDown", "2m"),
        alerts("LLMGatewayDown", "4m", {"job": "llm_gateway", "instance": "gw1", "gateway": "gw1",
                                        "severity": "critical"}),
    ]},
    # gw1's certificate ends in 7 days, gw2's in 100.
    {"interval": "1m", "input_series": [
        series("probe_ssl_earliest_cert_expiry", f"{7 * DAY}x30", job="llm_gateway_tls", instance="gw1"),
        series("probe_ssl_earliest_cert_expiry", f"{100 * DAY}x30", job="llm_gateway_tls", instance="gw2"),
        series("probe_success", "1x30", job="llm_gateway_tls", instance="gw1"),
        series("probe_success", "0x30", job="llm_gateway_tls", instance="gw3"),
    ], "alert_rule_test": [
        alerts("LLMGatewayCertificateExpiry", "5m"),
        alerts("LLMGatewayCertificateExpiry", "15m", {"job": "llm_gateway_tls", "instance": "gw1",
                                                      "severity": "warning"}),
        alerts("LLMGatewayTLSProbeFailing", "15m", {"job": "llm_gateway_tls", "instance": "gw3",
                                                    "severity": "warning"}),
    ]},
]


@pytest.fixture(name="rules")
def fixture_rules(tmp_path: Path) -> Path:
    return monitoring_lab.render(tmp_path, {}, monitoring_alert_p99_seconds_by_model={"long": 120})["rules"]


def test_rules_pass_promtool_check(rules: Path) -> None:
    checked = monitoring_lab.promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout


def test_every_alert_fires_and_only_where_it_should(rules: Path, tmp_path: Path) -> None:
    tested = {test["alertname"] for group in TESTS for test in group["alert_rule_test"]}
    defined = {rule["alert"] for group in yaml.safe_load(rules.read_text())["groups"] for rule in group["rules"]}
    assert tested == defined
    # promtool compares annotations too; these tests are about who fires, so theirs are dropped.
    document = yaml.safe_load(rules.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "bare.rules.yml").write_text(yaml.safe_dump(document))
    (tmp_path / "tests.yml").write_text(yaml.safe_dump({"rule_files": ["bare.rules.yml"], "tests": TESTS}))
    ran = monitoring_lab.promtool("test", "rules", "tests.yml", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_prometheus_config_passes_promtool_check(tmp_path: Path) -> None:
    paths = monitoring_lab.render(tmp_path, {"llm_gateway": [{"targets": ["10.0.0.1:9145"], "labels": {}}]},
                                  monitoring_gateway_basic_auth={"username": "scraper", "password": "unused"})
    (tmp_path / "password").write_text("secret\n")
    checked = monitoring_lab.promtool("check", "config", str(paths["config"]))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "password_file" in paths["config"].read_text() and "secret" not in paths["config"].read_text()


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's expr parsed by promtool (as a recording rule); the host test runs them for data."""
    queries = monitoring_lab.dashboard_queries()
    assert len(queries) >= 10
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{index}", "expr": monitoring_lab.dashboard_expr(expr)}
        for index, expr in enumerate(queries)]}]}
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump(rules))
    checked = monitoring_lab.promtool("check", "rules", str(tmp_path / "dashboard.rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_panels_cover_the_issue_s_views() -> None:
    """Per-model traffic, errors, latency, overhead and upstream state each have a panel."""
    queries = " ".join(monitoring_lab.dashboard_queries())
    for metric in ("llm_gateway_requests_total", "llm_gateway_request_duration_seconds_bucket",
                   "llm_gateway_upstream_header_seconds_bucket", "llm_gateway_overhead_seconds_bucket",
                   "llm_gateway_upstream_server_live", "llm_gateway_model_live_servers", "nginx_connections_active",
                   'up{job="llm_model_servers"'):
        assert metric in queries, metric

"""Metrics in the lab: mol-gw is also the llm_monitoring host, so its Prometheus scrapes the
gateway's metrics listener and every GPU host's model servers, as a user's would.

Prometheus listens on mol-gw's loopback only: it is asked from mol-gw itself. A known number
of requests per model (successes and errors) goes through the gateway; PromQL must return
those counts, the overhead histogram its samples, a model server's own metrics must be
scraped, stopping every server of a model must fire LLMModelNoLiveServer within its `for`
window, and every query of the dashboard must return data.

The lab's settings are in molecule.yml (llm_monitoring, gateway_metrics_port); chat-large
runs on mol-gpu1 alone.
"""

from __future__ import annotations

import json
import shlex
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import requests
from lab_pytest import bearer, wait_until

testinfra_hosts = ["llm_monitoring"]

DASHBOARD = Path(__file__).resolve().parents[3] / "roles" / "monitoring" / "files" / "llm-gateway-dashboard.json"
# What the test sends: (model, endpoint path, key id or None, expected status, count).
SENT = [("chat-small", "/v1/chat/completions", "tests", 200, 6),
        ("embed-small", "/v1/embeddings", "tests", 200, 4),
        ("chat-small", "/v1/chat/completions", None, 401, 2)]
# The backend's own failure: chat-weighted's servers answer 500 while told to.
FAILED = ("chat-weighted", "/v1/chat/completions", 3)


def promql(host: Any, expr: str, path: str = "query", **params: str) -> list[dict[str, Any]]:
    """A query of mol-gw's Prometheus on its loopback, asked on mol-gw."""
    url = f"http://127.0.0.1:9090/api/v1/{path}?" + urllib.parse.urlencode({"query": expr, **params})
    script = f"import urllib.request,sys; sys.stdout.write(urllib.request.urlopen({url!r}, timeout=10).read().decode())"
    body = json.loads(host.check_output(f"python3 -c {shlex.quote(script)}"))
    assert body["status"] == "success", body
    return body["data"]["result"] if path in ("query", "query_range") else body["data"]


def counts(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(s["metric"].get(label, "") for label in labels): float(s["value"][1]) for s in result}


def increase(host: Any, expr: str, before: dict[tuple[str, ...], float], *labels: str) -> dict[tuple[str, ...], float]:
    """What the counters of `expr` gained since `before` (other tests sent requests too)."""
    now = counts(promql(host, expr), *labels)
    return {key: value - before.get(key, 0.0) for key, value in now.items() if value - before.get(key, 0.0)}


@pytest.fixture(scope="module")
def sent(host, gateway_url, backends) -> dict[str, Any]:
    """The requests of SENT and FAILED, with the counters as they stood before."""
    expr = 'sum by (model, status) (llm_gateway_requests_total{model=~"chat-small|embed-small|chat-weighted"})'
    before = counts(promql(host, expr), "model", "status")
    for model, path, key_id, status, count in SENT:
        body = {"model": model, "input": "hi"} if "embeddings" in path else \
            {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(count):
            reply = requests.post(gateway_url + path, json=body, headers=bearer(key_id) if key_id else {}, timeout=30)
            assert reply.status_code == status, reply.text[:300]
    model, path, count = FAILED
    failing = [b for b in backends if b.model["name"] == model]
    for backend in failing:
        requests.post(f"{backend.url}/_test/behaviour", json={"mode": "fail", "status": 500}, timeout=5)
    try:
        for _ in range(count):
            reply = requests.post(gateway_url + path, headers=bearer(),
                                  json={"model": model, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
            assert reply.status_code == 500, reply.text[:300]
    finally:
        for backend in failing:
            requests.post(f"{backend.url}/_test/behaviour", json={"mode": "ok"}, timeout=5)
    return {"expr": expr, "before": before}


def test_prometheus_runs_on_loopback_only(host):
    assert host.service("prometheus").is_running
    assert host.socket("tcp://127.0.0.1:9090").is_listening
    assert not host.socket("tcp://0.0.0.0:9090").is_listening


def test_every_target_is_up(host):
    assert wait_until(lambda: all(float(s["value"][1]) == 1 for s in promql(host, "up")), 60)
    jobs = {s["metric"]["job"] for s in promql(host, "up")}
    assert {"llm_gateway", "llm_gateway_nginx", "llm_gateway_health", "llm_model_servers", "llm_gateway_tls"} <= jobs


def test_requests_per_model_and_status_are_counted(host, sent):
    expected = {("chat-small", "200"): 6.0, ("embed-small", "200"): 4.0, ("chat-weighted", "500"): 3.0}
    assert wait_until(lambda: increase(host, sent["expr"], sent["before"], "model", "status") == expected, 60), \
        increase(host, sent["expr"], sent["before"], "model", "status")


def test_overhead_histogram_has_samples(host, sent):
    assert wait_until(lambda: bool(promql(host, 'sum(llm_gateway_overhead_seconds_count{model="chat-small"}) >= 6')),
                      60)


def test_a_model_server_s_own_metrics_are_scraped(host, sent, backends):
    """Prometheus holds what chat-small's servers count themselves at their /metrics: at least the
    6 requests sent. Each target is scraped on its own schedule, so the servers' series may lag
    the gateway's by a scrape: wait for them to agree."""
    def own_count(backend) -> float:
        text = requests.get(f"{backend.url}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('llm_test_backend_requests_total{model_name="chat-small"}'))

    served = sum(own_count(b) for b in backends if b.model["name"] == "chat-small")
    assert served >= 6
    expr = 'sum by (model) (llm_test_backend_requests_total{job="llm_model_servers"})'
    assert wait_until(lambda: counts(promql(host, expr), "model").get(("chat-small",)) == served, 30), \
        (served, counts(promql(host, expr), "model"))


def test_stopping_every_server_of_a_model_fires_no_live_server(host, lab_host):
    """chat-large runs on mol-gpu1 alone: its unit stopped, the alert fires within `for` (10 s here)."""
    gpu = lab_host("mol-gpu1")
    gpu.run_expect([0], "systemctl stop llm-model-chat-large.service")
    try:
        stopped = time.time()
        assert wait_until(lambda: bool(promql(host, 'ALERTS{alertname="LLMModelNoLiveServer",'
                                                    'alertstate="firing",model="chat-large"}')), 90)
        # The health agent's fall (2 x (1 s + 0.5 s)) and a scrape (2 s), then `for` (10 s), evaluated every 2 s.
        assert time.time() - stopped < 3 + 2 + 10 + 2 + 5
        assert promql(host, 'llm_gateway_model_live_servers{model="chat-large"} == 0')
        assert not promql(host, 'ALERTS{alertname="LLMModelNoLiveServer",model!="chat-large"}')
    finally:
        gpu.run_expect([0], "systemctl start llm-model-chat-large.service")


def test_every_dashboard_query_returns_data(host, sent):
    dashboard = json.loads(DASHBOARD.read_text())
    empty = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$model", ".+").replace("$__rate_interval", "1m")
            if not wait_until(lambda: bool(promql(host, expr)), 30):
                empty.append(expr)
    assert not empty, empty

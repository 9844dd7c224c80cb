"""The gateway's metrics end to end on this host: the role's nginx, mtail program and
metrics listener, Debian's mtail and prometheus-nginx-exporter, the health agent steering
this nginx as the role runs it, and a real Prometheus configured by the monitoring role's
templates and filter.

A known number of requests per model, key and outcome goes through the gateway; then
Prometheus' HTTP API must return exactly those counts, the histograms must have their
samples, the model servers' own /metrics must be scraped, the "no live server" alert
must fire for the model whose servers are all down (within its `for`), and every query
of the dashboard must return data. Everything listens on 127.0.0.x and stops at the end.
"""

from __future__ import annotations

import collections
import datetime
import http.client
import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gateway_health
import health_agent
import llm_monitoring
import llm_registry
import monitoring_lab
import pytest
from conftest import chat
from gateway_lab import (REPO, Backend, Gateway, basic_auth, free_port, model, nginx_missing, render_gateway,
                         start_backend, start_nginx, stop, wait_for_port)

HOSTS = {"gpu-a": "127.0.0.2", "gpu-b": "127.0.0.3", "gpu-c": "127.0.0.4"}
KEYS = {"team-a": {"key": secrets.token_urlsafe(24), "models": "all"},
        "team-b": {"key": secrets.token_urlsafe(24), "models": ["chat-small"], "rate_per_minute": 1, "burst": 0}}
# How long the "no live server" alert waits here (the role's default is a minute).
NO_LIVE_FOR = "5s"
# What the test sends (model, key, expected status) and how often.
SENT = [("chat-small", "team-a", 200, 7), ("chat-small", "team-b", 200, 1), ("chat-small", "team-b", 429, 1),
        ("embed-small", "team-a", 200, 4), ("embed-small", "team-a", 500, 2), ("down-model", "team-a", 503, 3),
        ("unknown", "team-a", 404, 2), ("chat-small", None, 401, 2)]


@dataclass
class Lab:
    gateway: Gateway
    prometheus: int
    metrics_port: int
    root: Path
    unknown: str
    # When Prometheus started (wall clock): down-model's servers were down from before.
    prometheus_started: float


def reason_to_skip() -> str | None:
    return nginx_missing() or monitoring_lab.missing("mtail", "prometheus", "prometheus-nginx-exporter")


def log_file(root: Path, name: str) -> Any:
    return (root / f"{name}.log").open("wb")


def start_mtail(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Debian's mtail with the role's program over the gateway's access log, as the role's unit runs it."""
    port = free_port()
    proc = subprocess.Popen(["mtail", "--progs", str(root / "llm" / "llm_gateway.mtail"),
                             "--logs", str(root / "logs" / "llm-access.log"), "--address", "127.0.0.1",
                             "--port", str(port), "--logtostderr", "--emit_prog_label=false"],
                            stdout=subprocess.DEVNULL, stderr=log_file(root, "mtail"))
    wait_for_port(port, proc)
    return proc, port


def start_exporter(root: Path, stub_status_port: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(["prometheus-nginx-exporter",
                             f"--nginx.scrape-uri=http://127.0.0.1:{stub_status_port}/stub_status",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=log_file(root, "exporter"))
    wait_for_port(port, proc)
    return proc, port


def start_agent(root: Path, registry: list[dict[str, Any]], upstreams: list[dict[str, Any]],
                conf: Path) -> subprocess.Popen[bytes]:
    """The health agent as the role configures it (its filter), steering this nginx; state under root/health.

    Returns once nginx runs with the agent's view (down-model's one server out), so that every
    request sent afterwards meets the same gateway.
    """
    config = root / "agent.json"
    settings = gateway_health.llm_gateway_health_config(upstreams, registry, [], {
        "key_dir": str(root / "keys"), "include_dir": str(root / "llm" / "upstreams"),
        "state_file": str(root / "health" / "state.json"), "drain_file": str(root / "drain.json"),
        "interval": 1, "timeout": 0.5, "rise": 1, "fall": 1, "min_reload_interval": 1, "max_fails": 0,
        "fail_timeout": "10s", "nginx_user": None})
    # This nginx, not the system's.
    settings.update(nginx_test=["nginx", "-t", "-q", "-p", str(root), "-c", str(conf)],
                    nginx_reload=["nginx", "-p", str(root), "-c", str(conf), "-s", "reload"])
    config.write_text(json.dumps(settings))
    proc = subprocess.Popen([sys.executable, str(health_agent.AGENT), "run", "--config", str(config)],
                            stderr=log_file(root, "agent"))
    state_file = root / "health" / "state.json"

    def applied() -> bool:
        if not state_file.exists():
            return False
        state = json.loads(state_file.read_text())
        servers = {u["model"]: u["servers"] for u in state["upstreams"]}
        return not state["pending"] and [s["nginx"] for s in servers["down-model"]] == ["down"] and \
            all(s["nginx"] == "up" for s in servers["chat-small"] + servers["embed-small"])
    deadline = time.monotonic() + 20
    while not applied():
        assert time.monotonic() < deadline and proc.poll() is None, (root / "agent.log").read_text()
        time.sleep(0.2)
    time.sleep(0.5)  # the reload's new workers take over
    return proc


def send(gw: Gateway, unknown: str) -> None:
    """The requests of SENT, each checked at the client."""
    for name, key_id, status, count in SENT:
        headers = {"Authorization": f"Bearer {KEYS[key_id]['key']}"} if key_id else {}
        path, body = ("/v1/embeddings", {"model": name, "input": "hi"}) if name == "embed-small" \
            else ("/v1/chat/completions", chat(unknown if name == "unknown" else name))
        if status == 500:
            gw.backends["embed"].control("POST", "/_test/behaviour", {"mode": "fail", "status": 500})
        for _ in range(count):
            reply = gw.request("POST", path, body, headers=headers)
            assert reply.status == status, (name, key_id, reply.body[:300])
        if status == 500:
            gw.backends["embed"].control("POST", "/_test/behaviour", {"mode": "ok"})


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = reason_to_skip()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("metrics")
    ports = {"chat-small": free_port(HOSTS["gpu-a"], HOSTS["gpu-b"]), "embed-small": free_port(HOSTS["gpu-b"]),
             "down-model": free_port(HOSTS["gpu-c"])}
    models = [model("chat-small", ["gpu-a", "gpu-b"], ports["chat-small"]),
              model("embed-small", ["gpu-b"], ports["embed-small"], endpoints=["embeddings"], api_prefix=""),
              # Its one server never starts: every server of the model is down.
              model("down-model", ["gpu-c"], ports["down-model"], endpoints=["chat"])]
    backends: dict[str, Backend] = {}
    procs: list[subprocess.Popen[bytes]] = []
    gw: Gateway | None = None
    try:
        backends["small-a"] = start_backend(["chat-small"], HOSTS["gpu-a"], ports["chat-small"])
        backends["small-b"] = start_backend(["chat-small"], HOSTS["gpu-b"], ports["chat-small"])
        backends["embed"] = start_backend(["embed-small"], HOSTS["gpu-b"], ports["embed-small"], api_prefix="")
        http_port, metrics_port, stub_port = free_port(), free_port(), free_port()
        mtail_placeholder, exporter_placeholder = free_port(), free_port()
        # The listener's upstream ports are those of mtail and the exporter, started below on free ports.
        conf = render_gateway(root, models, HOSTS, gateway_http_port=http_port, gateway_https_port=0,
                              gateway_api_keys_required=True,
                              llm_api_keys=[{"id": key_id, **entry} for key_id, entry in KEYS.items()],
                              gateway_address_rate_per_minute=0, gateway_address_concurrency=0,
                              gateway_metrics_port=metrics_port, gateway_metrics_address="127.0.0.1",
                              gateway_metrics_stub_status_port=stub_port,
                              gateway_metrics_mtail_port=mtail_placeholder,
                              gateway_metrics_exporter_port=exporter_placeholder,
                              gateway_metrics_health_file=str(root / "health" / "metrics.prom"),
                              # The agent's server lines in the upstreams, as the role writes them.
                              gateway_health_checks=True,
                              __gateway_health_state_file=str(root / "health" / "state.json"))
        gw = Gateway(root, http_port, 0, backends)
        gw.procs.append(start_nginx(conf, http_port))
        mtail, mtail_port = start_mtail(root)
        exporter, exporter_port = start_exporter(root, stub_port)
        procs += [mtail, exporter]
        # The listener was rendered with placeholders: point it at the ports mtail and the exporter took.
        gateway_conf = root / "llm" / "gateway.conf"
        gateway_conf.write_text(gateway_conf.read_text()
                                .replace(f"127.0.0.1:{mtail_placeholder}/", f"127.0.0.1:{mtail_port}/")
                                .replace(f"127.0.0.1:{exporter_placeholder}/", f"127.0.0.1:{exporter_port}/"))
        subprocess.run(["nginx", "-p", str(root), "-c", str(conf), "-s", "reload"], check=True)
        groups = {"all": sorted(HOSTS), "llm_gpu_hosts": sorted(HOSTS)}
        registry = llm_registry.llm_registry_normalize(models, groups)
        hostvars: dict[str, dict[str, Any]] = {host: {"llm_private_address": address}
                                               for host, address in HOSTS.items()}
        hostvars["gw-test"] = {"llm_private_address": "127.0.0.1", "gateway_metrics_port": metrics_port,
                               "gateway_https_port": 0}
        upstreams = llm_registry.llm_gateway_upstreams(registry, hostvars)
        procs.append(start_agent(root, registry, upstreams, conf))
        targets = llm_monitoring.llm_monitoring_targets(registry, upstreams, ["gw-test"], ["127.0.0.1"], hostvars,
                                                        {"metrics_port": 0, "https_port": 443,
                                                         "engines": ["command"]})
        paths = monitoring_lab.render(root / "prometheus", targets, monitoring_scrape_interval="1s",
                                      monitoring_evaluation_interval="1s",
                                      monitoring_alert_no_live_server_for=NO_LIVE_FOR)
        prometheus_started = time.time()
        prometheus, prometheus_port = monitoring_lab.start_prometheus(root / "prometheus", paths["config"])
        procs.append(prometheus)
        unknown = f"evil-{secrets.token_hex(6)}"
        send(gw, unknown)
        yield Lab(gw, prometheus_port, metrics_port, root, unknown, prometheus_started)
    finally:
        for proc in reversed(procs):
            stop(proc)
        if gw is not None:
            gw.stop()
        else:
            for backend in backends.values():
                stop(backend.proc)


def expected_counts() -> dict[tuple[str, str], int]:
    """(model label, status) -> requests: refused before routing and unknown names count as "none"."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for name, key_id, status, count in SENT:
        routed = name in ("chat-small", "embed-small", "down-model") and status not in (401, 429)
        counts[(name if routed else "none", str(status))] += count
    return dict(counts)


def vector(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(sample["metric"].get(label, "") for label in labels): float(sample["value"][1])
            for sample in result}


def settled(lab: Lab, expr: str, expected: dict[tuple[str, ...], float], *labels: str,
            timeout: float = 30) -> dict[tuple[str, ...], float]:
    """The query's vector once it equals `expected` (scrapes lag the log by a few seconds), or the last one."""
    result = monitoring_lab.wait_for(lab.prometheus, expr, lambda r: vector(r, *labels) == expected, timeout)
    return vector(result, *labels)


def test_requests_per_model_and_status_are_counted_exactly(lab: Lab) -> None:
    expected = {key: float(value) for key, value in expected_counts().items()}
    found = settled(lab, "sum by (model, status) (llm_gateway_requests_total)", expected, "model", "status")
    assert found == expected
    # The log says the same, line by line.
    logged = collections.Counter((entry["model"] or "none", str(entry["status"])) for entry in lab.gateway.access_log())
    assert {key: float(value) for key, value in logged.items()} == expected


def test_requests_are_counted_per_key_and_endpoint(lab: Lab) -> None:
    expected = {("chat-small", "team-a", "/v1/chat/completions"): 7.0,
                ("chat-small", "team-b", "/v1/chat/completions"): 1.0,
                ("embed-small", "team-a", "/v1/embeddings"): 6.0,
                ("down-model", "team-a", "/v1/chat/completions"): 3.0}
    found = settled(lab, 'sum by (model, key_id, endpoint) (llm_gateway_requests_total{model!="none"})', expected,
                    "model", "key_id", "endpoint")
    assert found == expected
    refused = settled(lab, "sum by (reason, key_id) (llm_gateway_refused_total)",
                      {("unauthorized", ""): 2.0, ("rate_limited", "team-b"): 1.0}, "reason", "key_id")
    assert refused == {("unauthorized", ""): 2.0, ("rate_limited", "team-b"): 1.0}


def test_a_client_cannot_add_series_with_the_names_it_sends(lab: Lab) -> None:
    settled(lab, "sum by (model, status) (llm_gateway_requests_total)",
            {key: float(value) for key, value in expected_counts().items()}, "model", "status")
    assert monitoring_lab.query(lab.prometheus, f'{{model=~".*{lab.unknown}.*"}}') == []
    models = vector(monitoring_lab.query(lab.prometheus, "count by (model) (llm_gateway_requests_total)"), "model")
    assert set(models) == {("chat-small",), ("embed-small",), ("down-model",), ("none",)}


def test_histograms_have_a_sample_per_proxied_request(lab: Lab) -> None:
    # Every request a server answered (8 + 6), and down-model's 3: nginx found no live server
    # (the agent took its one out) and logs an upstream time of 0.000 for them.
    proxied = 8 + 6 + 3
    for histogram in ("llm_gateway_overhead_seconds", "llm_gateway_request_duration_seconds"):
        found = settled(lab, f"sum({histogram}_count)", {(): float(proxied)})
        assert found == {(): float(proxied)}, histogram
        assert vector(monitoring_lab.query(lab.prometheus, f'sum({histogram}_bucket{{le="+Inf"}})')) == \
            {(): float(proxied)}
    # Time to first byte exists only where a server sent a header: the 14 answers.
    assert settled(lab, "sum(llm_gateway_upstream_header_seconds_count)", {(): 14.0}) == {(): 14.0}
    overhead = monitoring_lab.query(lab.prometheus, "sum(llm_gateway_overhead_seconds_sum)")
    assert 0 <= float(overhead[0]["value"][1]) < 5


def test_each_model_server_s_own_metrics_are_scraped(lab: Lab) -> None:
    expected = {("chat-small",): 8.0, ("embed-small",): 6.0}
    found = settled(lab, 'sum by (model) (llm_test_backend_requests_total{job="llm_model_servers"})', expected,
                    "model")
    assert found == expected
    # Every server of the registry is a target; down-model's never answers.
    expected_up = {(f"gpu-a:{lab.gateway.backends['small-a'].port}",): 1.0,
                   (f"gpu-b:{lab.gateway.backends['small-b'].port}",): 1.0,
                   (f"gpu-b:{lab.gateway.backends['embed'].port}",): 1.0,
                   (up_instance_of_down_model(lab),): 0.0}
    assert settled(lab, 'up{job="llm_model_servers"}', expected_up, "instance") == expected_up


def up_instance_of_down_model(lab: Lab) -> str:
    targets = json.loads((lab.root / "prometheus" / "targets" / "llm_model_servers.json").read_text())
    return next(t["labels"]["instance"] for t in targets if t["labels"]["model"] == "down-model")


def test_nginx_connections_and_the_health_agent_s_states_are_scraped(lab: Lab) -> None:
    accepted = monitoring_lab.wait_for(lab.prometheus, 'nginx_connections_accepted{job="llm_gateway_nginx"}',
                                       lambda r: bool(r) and float(r[0]["value"][1]) >= 22, 30)
    assert accepted and float(accepted[0]["value"][1]) >= 22  # one connection per request sent
    expected = {("chat-small",): 2.0, ("embed-small",): 1.0, ("down-model",): 0.0}
    assert settled(lab, 'llm_gateway_model_live_servers{job="llm_gateway_health"}', expected, "model") == expected


def test_no_live_server_alert_fires_within_its_for_window(lab: Lab) -> None:
    firing = monitoring_lab.wait_for(lab.prometheus, 'ALERTS{alertname="LLMModelNoLiveServer",alertstate="firing"}',
                                     bool, 40)
    fired_by = time.time()
    assert vector(firing, "model") == {("down-model",): 1.0}
    alert = next(a for a in monitoring_lab.api(lab.prometheus, "alerts")["alerts"]
                 if a["labels"]["alertname"] == "LLMModelNoLiveServer")
    active_at = datetime.datetime.fromisoformat(alert["activeAt"].replace("Z", "+00:00")).timestamp()
    # Pending from the first evaluations after Prometheus' start (1 s scrapes and evaluations here)...
    assert lab.prometheus_started <= active_at < lab.prometheus_started + 10
    # ...and firing once `for` has passed: the first firing sample of ALERTS (a range query
    # sees a sample only from the next step after it: 0.2 s here).
    history = monitoring_lab.api(lab.prometheus, "query_range",
                                 query='ALERTS{alertname="LLMModelNoLiveServer",alertstate="firing",'
                                       'model="down-model"}',
                                 start=str(lab.prometheus_started), end=str(fired_by + 1), step="0.2")["result"]
    first_firing = float(history[0]["values"][0][0])
    window = float(NO_LIVE_FOR.rstrip("s"))
    assert window <= first_firing - active_at <= window + 2.5, (active_at, first_firing)


def test_every_dashboard_query_returns_data(lab: Lab) -> None:
    settled(lab, "sum by (model, status) (llm_gateway_requests_total)",
            {key: float(value) for key, value in expected_counts().items()}, "model", "status")
    empty = []
    for expr in monitoring_lab.dashboard_queries():
        query = monitoring_lab.dashboard_expr(expr)
        if not monitoring_lab.wait_for(lab.prometheus, query, bool, 15):
            empty.append(query)
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_the_metrics_listener_answers_the_allowed_addresses_only(lab: Lab) -> None:
    def get(source: str, path: str) -> bytes:
        with socket.create_connection(("127.0.0.1", lab.metrics_port), timeout=5, source_address=(source, 0)) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            return b"".join(iter(lambda: sock.recv(65536), b""))
    assert get("127.0.0.1", "/metrics").startswith(b"HTTP/1.1 200")
    # gateway_metrics_allow is empty here: loopback's 127.0.0.1 only.
    for path in ("/metrics", "/metrics/nginx", "/metrics/health"):
        assert get("127.0.0.9", path).startswith(b"HTTP/1.1 403"), path
    # The metrics listener logs nothing, so scrapes never count as requests.
    assert not any(entry["path"].startswith("/metrics") for entry in lab.gateway.access_log())


def test_blackbox_probe_reads_the_gateway_certificate_s_expiry(gateway: Gateway, tmp_path: Path) -> None:
    """The role's blackbox module against the shared gateway's TLS port: the expiry the alert reads."""
    reason = monitoring_lab.missing("prometheus-blackbox-exporter")
    if reason:
        pytest.skip(reason)
    paths = monitoring_lab.render(tmp_path, {})
    port = free_port()
    proc = subprocess.Popen(["prometheus-blackbox-exporter", f"--config.file={paths['blackbox']}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=log_file(tmp_path, "blackbox"))
    try:
        wait_for_port(port, proc)
        url = f"http://127.0.0.1:{port}/probe?module=llm_tls&target=127.0.0.1:{gateway.https_port}"
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - loopback
            text = answer.read().decode()
    finally:
        stop(proc)
    values = {name: float(value) for name, value in
              (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}
    assert values["probe_success"] == 1
    certificate = gateway.root / "llm" / "gateway.crt"
    not_after = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(certificate)],
                               capture_output=True, text=True, check=True).stdout.strip().split("=", 1)[1]
    expected = datetime.datetime.strptime(not_after, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=datetime.UTC)
    assert values["probe_ssl_earliest_cert_expiry"] == expected.timestamp()


def test_metrics_basic_auth_asks_for_an_admin_user(tmp_path: Path) -> None:
    """gateway_metrics_basic_auth: the allowed addresses also need a user of gateway_admin_users."""
    if nginx_missing():
        pytest.skip(str(nginx_missing()))
    http_port, metrics_port = free_port(), free_port()
    health_file = tmp_path / "health.prom"
    health_file.write_text("llm_gateway_health_pending 0\n")
    conf = render_gateway(tmp_path, [model("chat-small", ["gpu-a"], free_port(HOSTS["gpu-a"]))], HOSTS,
                          gateway_http_port=http_port, gateway_https_port=0, gateway_metrics_port=metrics_port,
                          gateway_metrics_address="127.0.0.1", gateway_metrics_basic_auth=True,
                          gateway_metrics_stub_status_port=free_port(), gateway_metrics_health_file=str(health_file),
                          gateway_admin_users=[{"name": "scraper", "password": "scraper-password"}])
    proc = start_nginx(conf, http_port)
    try:
        def status(headers: dict[str, str]) -> int:
            connection = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=5)
            connection.request("GET", "/metrics/health", headers=headers)
            answer = connection.getresponse()
            answer.read()
            connection.close()
            return answer.status
        assert status({}) == 401
        assert status({"Authorization": basic_auth("scraper", "wrong")}) == 401
        assert status({"Authorization": basic_auth("scraper", "scraper-password")}) == 200
    finally:
        stop(proc)


def test_the_role_s_mtail_check_accepts_its_program_and_refuses_a_broken_one(lab: Lab, tmp_path: Path) -> None:
    """files/llm-gateway-mtail-check, the template's validate: mtail alone passes over a file not named *.mtail."""
    check = REPO / "roles" / "gateway" / "files" / "llm-gateway-mtail-check"
    program = (lab.root / "llm" / "llm_gateway.mtail").read_text()
    candidate = tmp_path / "tmp1a2b3c"  # the kind of name Ansible's temporary file has
    candidate.write_text(program)
    assert subprocess.run([str(check), str(candidate)], capture_output=True, check=False).returncode == 0
    candidate.write_text(program.replace("llm_gateway_refused_total[", "llm_gateway_refused_totl["))
    refused = subprocess.run([str(check), str(candidate)], capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "llm_gateway_refused_totl" in refused.stderr

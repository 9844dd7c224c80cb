"""The monitoring role's scrape targets, derived from a registry and host variables."""

from __future__ import annotations

from typing import Any

import llm_monitoring
import llm_registry
import pytest
from ansible.errors import AnsibleFilterError

GROUPS = {"all": ["gw1", "gw2", "gpu1", "gpu2"], "llm_gpu_hosts": ["gpu1", "gpu2"]}
HOSTVARS: dict[str, dict[str, Any]] = {
    "gw1": {"llm_private_address": "10.0.0.1", "gateway_metrics_port": 9145},
    "gw2": {"llm_private_address": "10.0.0.5", "gateway_https_port": 0},
    "gpu1": {"llm_private_address": "10.0.0.2"},
    "gpu2": {"ansible_facts": {"default_ipv4": {"address": "10.0.0.3"}}},
}
MODELS = [
    {"name": "chat", "engine": "vllm", "source": "org/chat", "hosts": ["llm_gpu_hosts"], "port": 8001},
    {"name": "embed", "engine": "infinity", "source": "org/embed", "hosts": ["gpu2"], "port": 8002},
    {"name": "tool", "engine": "command", "command": "/usr/bin/tool --port 8003", "endpoints": ["chat"],
     "hosts": ["gpu1"], "port": 8003},
]
OPTIONS = {"metrics_port": 0, "https_port": 443, "engines": ["vllm", "infinity", "command"]}


def targets(hostvars: dict[str, dict[str, Any]] = HOSTVARS, models: list[dict[str, Any]] = MODELS,
            **options: Any) -> dict[str, list[dict[str, Any]]]:
    registry = llm_registry.llm_registry_normalize(models, GROUPS)
    upstreams = llm_registry.llm_gateway_upstreams(registry, hostvars)
    gateways = ["gw1", "gw2"]
    addresses = llm_registry.llm_private_addresses(gateways, hostvars)
    return llm_monitoring.llm_monitoring_targets(registry, upstreams, gateways, addresses, hostvars,
                                                 {**OPTIONS, **options})


def test_gateway_with_a_metrics_port_is_scraped_at_each_path_and_tls_where_https_is_on() -> None:
    jobs = targets()
    for job in ("llm_gateway", "llm_gateway_nginx", "llm_gateway_health"):
        assert jobs[job] == [{"targets": ["10.0.0.1:9145"], "labels": {"instance": "gw1", "gateway": "gw1"}}]
    # gw2 has no metrics listener (the role's default 0) and no TLS port.
    assert jobs["llm_gateway_tls"] == [{"targets": ["10.0.0.1:443"], "labels": {"instance": "gw1", "gateway": "gw1"}}]


def test_metrics_address_of_the_gateway_wins_over_its_private_address() -> None:
    hostvars = {**HOSTVARS, "gw1": {**HOSTVARS["gw1"], "gateway_metrics_address": "192.168.1.1"}}
    assert targets(hostvars)["llm_gateway"][0]["targets"] == ["192.168.1.1:9145"]


def test_every_model_server_is_scraped_at_the_gateways_address() -> None:
    servers = targets()["llm_model_servers"]
    assert [(t["targets"], t["labels"]) for t in servers] == [
        (["10.0.0.2:8001"], {"instance": "gpu1:8001", "model": "chat", "host": "gpu1", "engine": "vllm"}),
        (["10.0.0.3:8001"], {"instance": "gpu2:8001", "model": "chat", "host": "gpu2", "engine": "vllm"}),
        (["10.0.0.3:8002"], {"instance": "gpu2:8002", "model": "embed", "host": "gpu2", "engine": "infinity"}),
        (["10.0.0.2:8003"], {"instance": "gpu1:8003", "model": "tool", "host": "gpu1", "engine": "command"}),
    ]


def test_engines_left_out_are_not_scraped() -> None:
    servers = targets(engines=["vllm"])["llm_model_servers"]
    assert {t["labels"]["model"] for t in servers} == {"chat"}


def test_errors_name_the_gateway_and_field_all_at_once() -> None:
    hostvars = {**HOSTVARS, "gw1": {**HOSTVARS["gw1"], "gateway_metrics_port": "nine"},
                "gw2": {**HOSTVARS["gw2"], "gateway_https_port": 70000}}
    with pytest.raises(AnsibleFilterError) as raised:
        targets(hostvars, engines=["vllm", "infinty"])
    message = str(raised.value)
    assert "gateway 'gw1': gateway_metrics_port must be a port from 0 to 65535, got 'nine'" in message
    assert "gateway 'gw2': gateway_https_port must be a port from 0 to 65535, got 70000" in message
    assert "unknown engine 'infinty' (did you mean 'infinity'?)" in message


def test_model_server_without_an_address_names_the_model_and_host() -> None:
    hostvars = {**HOSTVARS, "gpu2": {}}
    with pytest.raises(AnsibleFilterError, match="model 'chat': host 'gpu2': has no address"):
        targets(hostvars)


def test_upstreams_that_do_not_match_the_registry_name_the_model() -> None:
    registry = llm_registry.llm_registry_normalize(MODELS, GROUPS)
    with pytest.raises(AnsibleFilterError, match="model 'embed': its servers are not in the upstreams given"):
        llm_monitoring.llm_monitoring_targets(registry, [{"model": "chat", "servers": ["a:1", "b:1"]}],
                                              [], [], HOSTVARS, OPTIONS)


def test_inputs_of_the_wrong_kind_are_named() -> None:
    with pytest.raises(AnsibleFilterError, match="hostvars must be a mapping, got a list"):
        llm_monitoring.llm_monitoring_targets([], [], [], [], [], OPTIONS)
    with pytest.raises(AnsibleFilterError, match="options lack engines"):
        llm_monitoring.llm_monitoring_targets([], [], [], [], {}, {"metrics_port": 0, "https_port": 443})


def test_private_addresses_of_a_group() -> None:
    assert llm_registry.llm_private_addresses(["gpu1", "gpu2"], HOSTVARS) == ["10.0.0.2", "10.0.0.3"]
    with pytest.raises(AnsibleFilterError, match="llm_private_addresses: host 'nohost': not found in hostvars"):
        llm_registry.llm_private_addresses(["nohost"], HOSTVARS)
    with pytest.raises(AnsibleFilterError, match="expects a list of host names"):
        llm_registry.llm_private_addresses("gpu1", HOSTVARS)

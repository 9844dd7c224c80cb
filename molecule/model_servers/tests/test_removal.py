"""A model dropped from the registry loses its unit or container, and the gateway stops routing to it.

Runs site.yml again with a registry that lacks the two chat models (one under each
runtime) and test_infinity_systemd.py's venv model, checks, then converges the scenario's
own registry back.
"""

from __future__ import annotations

import pytest
import requests

from lab_pytest import play_output, run_playbook, wait_served

testinfra_hosts = ["llm_gateways"]

REMOVED = {"chat-systemd": ("ms-gpu1", "systemd"), "chat-docker": ("ms-gpu2", "docker")}
KEPT = "minilm"


@pytest.fixture(scope="module")
def removed(registry, gateway_url, tmp_path_factory):
    """Converge without the removed models; afterwards, converge the full registry again."""
    tmp_path = tmp_path_factory.mktemp("removal")
    kept = [model for model in registry if model["name"] not in REMOVED]
    result = run_playbook("site.yml", tmp_path, {"llm_models": kept})
    assert result.returncode == 0, play_output(result)
    wait_served(gateway_url, kept)
    yield result
    restored = run_playbook("site.yml", tmp_path)
    assert restored.returncode == 0, play_output(restored)


def test_removed_systemd_model_has_no_unit_left(removed, lab_host, registry, address_of):
    host = lab_host(REMOVED["chat-systemd"][0])
    unit = "llm-model-chat-systemd.service"
    assert not host.file(f"/etc/systemd/system/{unit}").exists
    assert not host.service(unit).is_running
    port = next(m["port"] for m in registry if m["name"] == "chat-systemd")
    assert not host.socket(f"tcp://{address_of(host.backend.get_hostname())}:{port}").is_listening


def test_removed_docker_model_has_no_container_left(removed, lab_host):
    host = lab_host(REMOVED["chat-docker"][0])
    names = host.check_output("docker ps --all --format '{{.Names}}'").split()
    assert "llm-model-chat-docker" not in names
    assert f"llm-model-{KEPT}" in names, "the model that stayed keeps running"


def test_gateway_no_longer_routes_to_removed_models(removed, gateway_url):
    listed = {m["id"] for m in requests.get(f"{gateway_url}/v1/models", timeout=5).json()["data"]}
    assert listed == {KEPT}
    for name in REMOVED:
        reply = requests.post(f"{gateway_url}/v1/chat/completions", timeout=10,
                              json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 404, reply.text
        assert reply.json()["error"]["code"] == "model_not_found"
    kept = requests.post(f"{gateway_url}/v1/embeddings", json={"model": KEPT, "input": "still here"}, timeout=30)
    assert kept.status_code == 200

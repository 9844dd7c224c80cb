"""A model dropped from the registry loses its unit or container, and the gateway stops routing to it.

Runs site.yml again with a registry that lacks the two chat models (one under each
runtime), checks, then converges the scenario's own registry back.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import requests

testinfra_hosts = ["llm_gateways"]

REMOVED = {"chat-systemd": ("ms-gpu1", "systemd"), "chat-docker": ("ms-gpu2", "docker")}
KEPT = "minilm"


def _site(tmp_path: Path, extra_vars: dict | None = None) -> subprocess.CompletedProcess:
    """site.yml against the scenario's inventory, as molecule's converge runs it."""
    command = ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"],
               str(Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "site.yml")]
    if extra_vars is not None:
        path = tmp_path / "extra_vars.json"
        path.write_text(json.dumps(extra_vars))
        command += ["--extra-vars", f"@{path}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def removed(registry, tmp_path_factory):
    """Converge without the removed models; afterwards, converge the full registry again."""
    tmp_path = tmp_path_factory.mktemp("removal")
    kept = [model for model in registry if model["name"] not in REMOVED]
    result = _site(tmp_path, {"llm_models": kept})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    yield result
    restored = _site(tmp_path)
    assert restored.returncode == 0, restored.stdout[-3000:] + restored.stderr[-2000:]


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

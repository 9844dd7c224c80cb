"""Docker GPU hosts: one container per model, from the registry's image, published on the private address only."""

from __future__ import annotations

import json

import requests

from lab_pytest import assigned_models

testinfra_hosts = ["llm_lab_docker_hosts"]


def _containers(host) -> dict[str, dict]:
    """docker inspect of every container on the host, by name."""
    names = host.check_output("docker ps --all --format '{{.Names}}'").split()
    if not names:
        return {}
    return {c["Name"].lstrip("/"): c for c in json.loads(host.check_output(f"docker inspect {' '.join(names)}"))}


def test_docker_models_run_as_containers_with_the_registry_image(host, inventory):
    models = assigned_models(host, inventory, "docker")
    assert models, "the scenario runs docker models on every docker host"
    containers = _containers(host)
    assert set(containers) == {f"llm-model-{m['name']}" for m in models}, "one container per model, nothing else"
    for model in models:
        container = containers[f"llm-model-{model['name']}"]
        assert container["State"]["Running"], model["name"]
        assert container["Config"]["Image"] == model["image"]
        assert container["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
        assert container["Config"]["Labels"].get("io.llm-gateway.model") == model["name"]
        env = dict(item.split("=", 1) for item in container["Config"]["Env"])
        assert env["LLM_MODEL_NAME"] == model["name"] and env["LLM_MODEL_PORT"] == str(model["port"])
    assert not host.check_output("systemctl list-units --all --no-legend --plain 'llm-model-*'"), \
        "a docker model has no unit"


def test_docker_ports_are_published_on_the_private_address_only(host, inventory, address_of):
    address = address_of(host.backend.get_hostname())
    containers = _containers(host)
    for model in assigned_models(host, inventory, "docker"):
        bindings = containers[f"llm-model-{model['name']}"]["HostConfig"]["PortBindings"]
        assert bindings == {f"{model['port']}/tcp": [{"HostIp": address, "HostPort": str(model["port"])}]}
        assert host.socket(f"tcp://{address}:{model['port']}").is_listening
        assert not host.socket(f"tcp://0.0.0.0:{model['port']}").is_listening


def test_command_model_in_a_container_serves_through_the_gateway(host, inventory, gateway_url):
    models = [m for m in assigned_models(host, inventory, "docker") if m["engine"] == "command"]
    assert models, "the scenario runs a command model in a container on every docker host"
    containers = _containers(host)
    for model in models:
        reply = requests.post(f"{gateway_url}/v1/chat/completions", timeout=10,
                              json={"model": model["name"], "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, reply.text
        # The test backend names the host it runs on: inside a container, the container's hostname.
        assert reply.headers["X-Backend-Host"] == containers[f"llm-model-{model['name']}"]["Config"]["Hostname"]
        assert reply.json()["model"] == model["name"]

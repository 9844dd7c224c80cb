"""The health agent's configuration as the gateway role writes it (filter llm_gateway_health_config)."""

from __future__ import annotations

import health_agent
import llm_registry
import pytest
from gateway_health import AnsibleFilterError, llm_gateway_health_config

SETTINGS = {"key_dir": "/etc/llm-gateway-health/keys", "include_dir": "/etc/nginx/llm/upstreams",
            "state_file": "/run/llm-gateway-health/state.json", "drain_file": "/var/lib/llm-gateway-health/drain.json",
            "interval": 1, "timeout": 0.5, "rise": 2, "fall": 2, "min_reload_interval": 1, "max_fails": 0,
            "fail_timeout": "10s", "nginx_user": "www-data"}
HOSTS = {"gpu1": {"llm_private_address": "10.0.0.1"}, "gpu2": {"llm_private_address": "10.0.0.2"}}


def registry() -> list[dict]:
    return llm_registry.llm_registry_normalize([
        {"name": "chat", "aliases": ["gpt-4o-mini"], "engine": "vllm", "source": "org/chat", "version": "0.8.5",
         "hosts": [{"host": "gpu1", "weight": 3}, "gpu2"], "port": 8001},
        {"name": "embed", "aliases": ["text-embedding-3-small"], "engine": "infinity", "source": "org/embed",
         "version": "0.0.78", "hosts": ["gpu2"], "port": 8002},
        {"name": "tool", "aliases": ["t"], "engine": "command", "command": "serve", "endpoints": ["chat"],
         "hosts": ["gpu1"], "port": 8003, "api_prefix": ""}], {"all": sorted(HOSTS)})


def test_each_upstream_is_checked_as_the_gateway_uses_it() -> None:
    models = registry()
    config = llm_gateway_health_config(llm_registry.llm_gateway_upstreams(models, HOSTS), models, ["chat"], SETTINGS)
    upstreams = {u["model"]: u for u in config["upstreams"]}
    # vLLM lists every served name; Infinity and commands are held to the model's own name.
    assert upstreams["chat"]["served_names"] == ["chat", "gpt-4o-mini"]
    assert upstreams["embed"]["served_names"] == ["embed"]
    assert upstreams["tool"]["served_names"] == ["tool"]
    assert upstreams["chat"]["peers"] == [{"address": "10.0.0.1:8001", "weight": 3, "backup": False},
                                          {"address": "10.0.0.2:8001", "weight": 1, "backup": False}]
    assert upstreams["chat"]["api_key_file"] == "/etc/llm-gateway-health/keys/chat.key"
    assert upstreams["embed"]["api_key_file"] is None
    assert (upstreams["embed"]["api_prefix"], upstreams["tool"]["api_prefix"]) == ("", "")
    assert config["max_fails"] == 0 and config["interval"] == 1
    # The agent itself accepts what the role writes.
    parsed = health_agent.load().parse_config(config)
    assert [u.name for u in parsed.upstreams] == ["llm_chat", "llm_embed", "llm_tool"]


def test_missing_settings_are_named() -> None:
    models = registry()
    with pytest.raises(AnsibleFilterError, match="settings lack rise, fall"):
        llm_gateway_health_config([], models, [], {k: v for k, v in SETTINGS.items() if k not in ("rise", "fall")})
    with pytest.raises(AnsibleFilterError, match="model 'gone' is not in llm_registry"):
        llm_gateway_health_config([{"name": "llm_gone", "model": "gone", "peers": []}], models, [], SETTINGS)

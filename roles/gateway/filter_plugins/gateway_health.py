"""The health agent's configuration, made from the gateway's upstreams and the registry.

The agent (files/llm-gateway-health, HEALTH.md) checks each model server the way the
gateway uses it: `/health`, then `<api_prefix>/models` must list the names the engine
was started with. Those are the model's name and aliases for vLLM (`--served-model-name`
takes them all) and the model's name for Infinity and commands (Infinity serves one
name; a command may list only its own). A model with a key gets a root-only key file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # unit tests without Ansible
    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        """Stand-in so the plugin imports without Ansible."""

SETTINGS = ("include_dir", "state_file", "drain_file", "interval", "timeout", "rise", "fall",
            "min_reload_interval", "max_fails", "fail_timeout", "nginx_user")


def _served_names(model: Mapping[str, Any]) -> list[str]:
    return list(model["served_names"]) if model["engine"] == "vllm" else [model["name"]]


def llm_gateway_health_config(upstreams: Any, registry: Any, keys: Any, settings: Any) -> dict[str, Any]:
    """The agent's config.json: one entry per upstream plus the role's settings.

    `upstreams` is llm_gateway_upstreams, `registry` llm_registry, `keys` the names of the
    models that have a backend key, `settings` the agent's knobs plus `key_dir`.
    """
    if not isinstance(settings, Mapping) or "key_dir" not in settings:
        raise AnsibleFilterError("llm_gateway_health_config: settings must be a mapping with key_dir")
    missing = [name for name in SETTINGS if name not in settings]
    if missing:
        raise AnsibleFilterError(f"llm_gateway_health_config: settings lack {', '.join(missing)}")
    models = {model["name"]: model for model in registry}
    keyed = set(keys or ())
    entries = []
    for upstream in upstreams:
        model = models.get(upstream["model"])
        if model is None:
            raise AnsibleFilterError(f"llm_gateway_health_config: upstream {upstream['name']}: model "
                                     f"'{upstream['model']}' is not in llm_registry")
        entries.append({
            "name": upstream["name"],
            "model": model["name"],
            "peers": [dict(peer) for peer in upstream["peers"]],
            "served_names": _served_names(model),
            "api_prefix": model["api_prefix"],
            "api_key_file": f"{settings['key_dir']}/{model['name']}.key" if model["name"] in keyed else None,
        })
    config = {name: settings[name] for name in SETTINGS}
    config["upstreams"] = entries
    return config


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        """Map filter names to functions."""
        return {"llm_gateway_health_config": llm_gateway_health_config}

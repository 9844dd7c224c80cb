"""Filters of the monitoring role: Prometheus scrape targets derived from the inventory.

Every target comes from what the other roles already read: the gateways' metrics
listeners from their host variables, each model server from the registry and the
addresses llm_gateway_upstreams gives the gateways (so Prometheus scrapes exactly the
servers nginx routes to). The result is file_sd JSON, one list per job, which the
role's own Prometheus reads and a user's Prometheus can include as it is.

Filters:
    llm_monitoring_targets(llm_registry, upstreams, gateways, gateway_addresses, hostvars, options)
        -> {job: [{"targets": [...], "labels": {...}}]} for every job of prometheus.yml
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

FILTER = "llm_monitoring_targets"
# The gateway's metrics paths, one job each: job -> path on the metrics listener.
GATEWAY_JOBS = {"llm_gateway": "/metrics", "llm_gateway_nginx": "/metrics/nginx",
                "llm_gateway_health": "/metrics/health"}
MODEL_JOB = "llm_model_servers"
TLS_JOB = "llm_gateway_tls"
JOBS = (*GATEWAY_JOBS, MODEL_JOB, TLS_JOB)
ENGINES = ("vllm", "infinity", "command")


def _describe(value: Any) -> str:
    """A bad value as it was written, with its YAML type when that is the surprise."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if value is None:
        return "null"
    return "a mapping" if isinstance(value, Mapping) else "a list" if isinstance(value, list) else repr(value)


def _port(value: Any, allow_zero: bool) -> int:
    """A TCP port (0 too, for "off", where allowed); digit strings from templates are taken."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise ValueError(f"must be a port from {low} to 65535, got {_describe(value)}")
    return value


def _engines(value: Any, errors: list[str]) -> list[str]:
    """monitoring_model_engines: which engines' servers are scraped."""
    if not isinstance(value, list):
        errors.append(f"{FILTER}: monitoring_model_engines must be a list of engines, got {_describe(value)}")
        return []
    for engine in value:
        if engine not in ENGINES:
            near = difflib.get_close_matches(str(engine), ENGINES, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            errors.append(f"{FILTER}: monitoring_model_engines: unknown engine {_describe(engine)}{hint}; "
                          f"known: {', '.join(ENGINES)}")
    return [engine for engine in value if engine in ENGINES]


def _gateway_field(errors: list[str], host: str, values: Mapping[str, Any], field: str, default: int) -> int:
    """A gateway's port variable, as its inventory sets it (the role's default otherwise)."""
    try:
        return _port(values.get(field, default), allow_zero=True)
    except ValueError as exc:
        errors.append(f"{FILTER}: gateway '{host}': {field} {exc}")
        return 0


def _gateway_targets(gateways: list[str], addresses: list[str], hostvars: Mapping[str, Any],
                     options: Mapping[str, Any], errors: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The metrics listener of every gateway that has one (three jobs), and its TLS port."""
    jobs: dict[str, list[dict[str, Any]]] = {job: [] for job in (*GATEWAY_JOBS, TLS_JOB)}
    for host, address in zip(gateways, addresses):
        values = hostvars.get(host) or {}
        metrics_port = _gateway_field(errors, host, values, "gateway_metrics_port", options["metrics_port"])
        https_port = _gateway_field(errors, host, values, "gateway_https_port", options["https_port"])
        metrics_address = values.get("gateway_metrics_address") or address
        if not isinstance(metrics_address, str):
            errors.append(f"{FILTER}: gateway '{host}': gateway_metrics_address must be a string, "
                          f"got {_describe(metrics_address)}")
            continue
        labels = {"instance": host, "gateway": host}
        if metrics_port:
            for job in GATEWAY_JOBS:
                jobs[job].append({"targets": [f"{metrics_address}:{metrics_port}"], "labels": dict(labels)})
        if https_port:
            jobs[TLS_JOB].append({"targets": [f"{address}:{https_port}"], "labels": dict(labels)})
    return jobs


def _model_targets(registry: list[Mapping[str, Any]], upstreams: list[Mapping[str, Any]], engines: list[str],
                   errors: list[str]) -> list[dict[str, Any]]:
    """Each server of each model whose engine is scraped, at the address the gateways use."""
    servers = {upstream.get("model"): upstream.get("servers") for upstream in upstreams}
    targets = []
    for model in registry:
        name = model.get("name")
        addresses = servers.get(name)
        hosts = model.get("hosts")
        if not isinstance(addresses, list) or not isinstance(hosts, list) or len(addresses) != len(hosts):
            errors.append(f"{FILTER}: model '{name}': its servers are not in the upstreams given "
                          f"(pass llm_registry | llm_gateway_upstreams(hostvars))")
            continue
        if model.get("engine") not in engines:
            continue
        for host, address in zip(hosts, addresses):
            targets.append({"targets": [address],
                            "labels": {"instance": f"{host}:{model.get('port')}", "model": name, "host": host,
                                       "engine": model.get("engine")}})
    return targets


def llm_monitoring_targets(registry: Any, upstreams: Any, gateways: Any, gateway_addresses: Any, hostvars: Any,
                           options: Any) -> dict[str, list[dict[str, Any]]]:
    """Every scrape target, by job; every error of the inputs at once, naming the host, model and field.

    `options`: {"metrics_port": the gateway role's default gateway_metrics_port,
    "https_port": its default gateway_https_port, "engines": monitoring_model_engines}.
    The backend key is never sent: vLLM's and Infinity's /metrics answer without one.
    """
    errors: list[str] = []
    for what, value, kind in (("llm_registry", registry, list), ("upstreams", upstreams, list),
                              ("gateways", gateways, list), ("gateway_addresses", gateway_addresses, list),
                              ("hostvars", hostvars, Mapping), ("options", options, Mapping)):
        if not isinstance(value, kind):
            errors.append(f"{FILTER}: {what} must be a {'list' if kind is list else 'mapping'}, got {_describe(value)}")
    if errors:
        raise AnsibleFilterError("\n".join(errors))
    if len(gateways) != len(gateway_addresses):
        raise AnsibleFilterError(f"{FILTER}: {len(gateways)} gateways but {len(gateway_addresses)} addresses")
    missing = [key for key in ("metrics_port", "https_port", "engines") if key not in options]
    if missing:
        raise AnsibleFilterError(f"{FILTER}: options lack {', '.join(missing)}")
    engines = _engines(options["engines"], errors)
    jobs = _gateway_targets(gateways, gateway_addresses, hostvars, options, errors)
    jobs[MODEL_JOB] = _model_targets(registry, upstreams, engines, errors)
    if errors:
        raise AnsibleFilterError("\n".join(errors))
    return {job: jobs[job] for job in JOBS}


class FilterModule:
    """The monitoring role's filters."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        """Map filter names to functions."""
        return {"llm_monitoring_targets": llm_monitoring_targets}

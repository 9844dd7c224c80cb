"""Filters over the HTTP services beside the models (the inventory variable ``llm_services``).

Qdrant, Immich ML and any other HTTP service the gateway puts under a path prefix. Like
the model registry, a mistake here (a prefix that shadows the API, a header value nginx
would read as a variable, a task name with a typo) would surface as a silently wrong
route, so every entry is checked here and every error names the service and the field.

Filters:
    llm_services_normalize(services, groups, models=[])  -> normalized list (validated)
    llm_gateway_services(normalized, hostvars)           -> what the gateway renders: upstreams, tasks
    llm_service_router_data(gateway_services)            -> task routes and upstreams for njs (routes.js)
    llm_service_host_ports(normalized, hostname)         -> ports of the services on one host (firewall)
    llm_service_header_var(header name)                  -> the nginx variable of a service header

The values of `headers` are secrets (Qdrant's api-key from the vault): no message quotes one.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

SERVICES = "llm_services"
KINDS = ("http", "immich_ml")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# One or more path segments, no trailing slash: the location is "<prefix>/".
PREFIX_RE = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")
# Paths of the gateway itself and of the LLM API: a service prefix must not cover them.
RESERVED_PREFIXES = ("/v1", "/health", "/ready", "/_llm", "/_svc", "/tokenize", "/detokenize")
SIZE_RE = re.compile(r"^[0-9]{1,6}[kKmMgG]?$")
TIME_RE = re.compile(r"^[0-9]{1,6}(ms|s|m|h)?$")
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#%&'*+.^_`|~-]{1,64}$")
# Headers the gateway sets itself; a service may not override them.
GATEWAY_HEADERS = frozenset({"host", "connection", "content-length", "transfer-encoding", "x-request-id",
                             "x-forwarded-for", "x-forwarded-proto"})
# The credentials a client may send the gateway: never passed to a service (unless replaced).
CLIENT_CREDENTIAL_HEADERS = ("Authorization", "api-key")
# The tasks of Immich ML's /predict, as the gateway names them; "entries" spells them
# {"clip": {"textual": ...}}, {"clip": {"visual": ...}}, {"facial-recognition": ...}, {"ocr": ...}.
IMMICH_TASKS = ("clip_textual", "clip_visual", "facial_recognition", "ocr")
DEFAULTS = {
    "http": {"strip_prefix": True, "client_max_body_size": "16m", "health_path": "/"},
    # Images: Immich uploads previews, and the seed of this feature measured 32 MB as enough.
    "immich_ml": {"strip_prefix": True, "client_max_body_size": "32m", "health_path": "/ping"},
}
PORT_MIN, PORT_MAX = 1, 65535
FIELDS = frozenset({"name", "kind", "prefix", "hosts", "port", "strip_prefix", "headers", "client_max_body_size",
                    "connect_timeout", "send_timeout", "read_timeout", "health_path", "api_keys", "tasks"})
TASK_FIELDS = frozenset({"hosts", "port"})


class _FieldError(ValueError):
    """A field's value is wrong; the caller adds which service and field."""


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)


def _check_name(value: Any) -> str:
    """The name goes into upstream names, the log and njs: lower-case letters, digits, '-', '_'."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _FieldError(f"must match {NAME_RE.pattern}, got {_describe(value)}")
    return value


def _check_kind(value: Any) -> str:
    if value not in KINDS:
        raise _FieldError(f"must be one of {', '.join(KINDS)}, got {_describe(value)}")
    return str(value)


def _check_prefix(value: Any) -> str:
    """A path prefix of whole segments that leaves the gateway's own paths alone."""
    if not isinstance(value, str) or not PREFIX_RE.match(value):
        raise _FieldError(f"must be a path like \"/qdrant\" (segments of letters, digits, '.', '_', '~', '-'; "
                          f"no trailing slash), got {_describe(value)}")
    for reserved in RESERVED_PREFIXES:
        if value == reserved or value.startswith(reserved + "/") or reserved.startswith(value + "/"):
            raise _FieldError(f"{value!r} overlaps the gateway's own path {reserved!r}")
    return value


def _check_hosts(value: Any, groups: Mapping[str, Any]) -> list[str]:
    """Hosts or groups of the inventory, expanded; unknown names are refused."""
    if not isinstance(value, list) or not value:
        raise _FieldError(f"must be a non-empty list of inventory hosts or groups, got {_describe(value)}")
    known = {host for members in groups.values() for host in members}
    hosts: set[str] = set()
    for item in value:
        if isinstance(item, str) and item in groups and item not in ("all", "ungrouped"):
            if not groups[item]:
                raise _FieldError(f"group '{item}' has no hosts")
            hosts.update(str(host) for host in groups[item])
        elif isinstance(item, str) and item in known:
            hosts.add(item)
        else:
            raise _FieldError(f"{_describe(item)} is neither a host nor a group in the inventory")
    return sorted(hosts)


def _check_port(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not PORT_MIN <= value <= PORT_MAX:
        raise _FieldError(f"must be an integer from {PORT_MIN} to {PORT_MAX}, got {_describe(value)}")
    return value


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _FieldError(f"must be true or false, got {_describe(value)}")
    return value


def _check_size(value: Any) -> str:
    if not isinstance(value, str) or not SIZE_RE.match(value):
        raise _FieldError(f"must be an nginx size like \"32m\" (a quoted string), got {_describe(value)}")
    return value


def _check_time(value: Any) -> str:
    if not isinstance(value, str) or not TIME_RE.match(value):
        raise _FieldError(f"must be an nginx time like \"60s\" (a quoted string), got {_describe(value)}")
    return value


def _check_path(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^/[A-Za-z0-9._~/-]*$", value):
        raise _FieldError(f"must be a path starting with '/', got {_describe(value)}")
    return value


def _check_headers(value: Any) -> dict[str, str]:
    """Header name -> value; values are secrets, so a bad one is described, never quoted."""
    if not isinstance(value, Mapping):
        raise _FieldError(f"must be a mapping of header name: value, got {_describe(value)}")
    headers: dict[str, str] = {}
    for name, item in value.items():
        if not isinstance(name, str) or not HEADER_NAME_RE.match(name):
            raise _FieldError(f"has an invalid header name {_describe(name)}")
        if name.lower() in GATEWAY_HEADERS:
            raise _FieldError(f"header '{name}' is set by the gateway itself")
        if name.lower() in {n.lower() for n in headers}:
            raise _FieldError(f"header '{name}' is given twice (names are case-insensitive)")
        if not isinstance(item, str) or not item:
            raise _FieldError(f"header '{name}': must be a non-empty string, "
                              f"got {'null' if item is None else type(item).__name__}")
        # nginx reads "$" as a variable and has no escape for it; quotes and line ends would break the config.
        if re.search(r'[\x00-\x1f\x7f"\\$]', item):
            raise _FieldError(f"header '{name}': its value holds a character nginx cannot carry "
                              f"('\"', '\\', '$' or a control character)")
        headers[name] = item
    return headers


def _check_api_keys(value: Any) -> list[str] | None:
    """"all" (None), or the ids of llm_api_keys that may use the service."""
    if value == "all":
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise _FieldError(f"must be \"all\" or a list of llm_api_keys ids, got {_describe(value)}")
    return sorted(set(value))


class _Entry:
    """Collects one entry's field errors so every bad field is reported, not only the first."""

    def __init__(self, label: str, errors: list[str]) -> None:
        self.label, self.errors, self.ok = label, errors, True

    def check(self, field: str, value: Any, check: Callable[..., Any], *args: Any) -> Any:
        try:
            return check(value, *args)
        except _FieldError as exc:
            self.fail(field, str(exc))
            return None

    def fail(self, field: str, message: str) -> None:
        self.ok = False
        self.errors.append(f"{self.label}: field '{field}': {message}")


def _unknown(key: str, known: frozenset[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"unknown field (did you mean '{close[0]}'?)" if close else f"unknown field; known: {', '.join(sorted(known))}"


def _tasks(entry: _Entry, value: Any, groups: Mapping[str, Any], hosts: Any, port: Any) -> dict[str, Any]:
    """Immich ML's task -> {hosts, port}: each given task's servers, the service's hosts and port by default."""
    if not isinstance(value, Mapping):
        entry.fail("tasks", f"must be a mapping of task: {{hosts, port}}, got {_describe(value)}")
        return {}
    tasks: dict[str, Any] = {}
    for task, spec in value.items():
        field = f"tasks.{task}"
        if task not in IMMICH_TASKS:
            close = difflib.get_close_matches(str(task), IMMICH_TASKS, n=1)
            entry.fail(field, f"unknown task ({f'did you mean {close[0]!r}?' if close else 'known: ' + ', '.join(IMMICH_TASKS)})")
            continue
        if not isinstance(spec, Mapping) or not spec:
            entry.fail(field, f"must be a mapping with hosts and/or port, got {_describe(spec)}")
            continue
        for key in sorted(set(spec) - TASK_FIELDS, key=str):
            entry.fail(f"{field}.{key}", _unknown(str(key), TASK_FIELDS))
        task_hosts = entry.check(f"{field}.hosts", spec["hosts"], _check_hosts, groups) if "hosts" in spec else hosts
        task_port = entry.check(f"{field}.port", spec["port"], _check_port) if "port" in spec else port
        tasks[str(task)] = {"hosts": task_hosts, "port": task_port}
    return tasks


def _normalize(index: int, raw: Any, groups: Mapping[str, Any], errors: list[str]) -> dict[str, Any]:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    label = f"{SERVICES}: service '{name}'" if isinstance(name, str) and NAME_RE.match(name) else f"{SERVICES}[{index}]"
    if not isinstance(raw, Mapping):
        errors.append(f"{label}: must be a mapping with at least name, kind, prefix, hosts and port, "
                      f"got {_describe(raw)}")
        return {}
    entry = _Entry(label, errors)
    for key in sorted(set(raw) - FIELDS, key=str):
        entry.fail(str(key), _unknown(str(key), FIELDS))
    for key in ("name", "kind", "prefix", "hosts", "port"):
        if key not in raw:
            entry.fail(key, "is required")
    kind = entry.check("kind", raw["kind"], _check_kind) if "kind" in raw else None
    defaults = DEFAULTS.get(kind or "http", DEFAULTS["http"])
    service: dict[str, Any] = {
        "name": entry.check("name", raw["name"], _check_name) if "name" in raw else None,
        "kind": kind,
        "prefix": entry.check("prefix", raw["prefix"], _check_prefix) if "prefix" in raw else None,
        "hosts": entry.check("hosts", raw["hosts"], _check_hosts, groups) if "hosts" in raw else None,
        "port": entry.check("port", raw["port"], _check_port) if "port" in raw else None,
        "strip_prefix": entry.check("strip_prefix", raw.get("strip_prefix", defaults["strip_prefix"]), _check_bool),
        "headers": entry.check("headers", raw.get("headers", {}), _check_headers),
        "client_max_body_size": entry.check("client_max_body_size",
                                            raw.get("client_max_body_size", defaults["client_max_body_size"]),
                                            _check_size),
        "health_path": entry.check("health_path", raw.get("health_path", defaults["health_path"]), _check_path),
        "api_keys": entry.check("api_keys", raw.get("api_keys", "all"), _check_api_keys),
    }
    for field in ("connect_timeout", "send_timeout", "read_timeout"):
        service[field] = entry.check(field, raw[field], _check_time) if field in raw else None
    if kind == "immich_ml":
        service["tasks"] = _tasks(entry, raw.get("tasks", {}), groups, service["hosts"], service["port"])
        if service["strip_prefix"] is False:
            entry.fail("strip_prefix", "must be true for kind 'immich_ml' (Immich ML serves /predict at its root)")
    elif "tasks" in raw:
        entry.fail("tasks", f"is only valid with kind 'immich_ml', not {_describe(kind)}")
    service.setdefault("tasks", {})
    return service


def _check_conflicts(services: list[dict[str, Any]], models: list[Any], errors: list[str]) -> None:
    """Names and prefixes are unique; a host's port is used once, by a model or a service."""
    names: set[str] = set()
    prefixes: dict[str, str] = {}
    ports: dict[tuple[str, int], str] = {}
    for model in models if isinstance(models, list) else []:
        if isinstance(model, Mapping) and model.get("hosts") and model.get("port"):
            for host in model["hosts"]:
                ports[(host, model["port"])] = f"model '{model.get('name')}'"
    for service in services:
        name = service.get("name")
        if not name:
            continue
        label = f"{SERVICES}: service '{name}'"
        # Upstream names spell '-' as '_': "immich-ml" and "immich_ml" would share one.
        if _upstream_base(name) in names:
            errors.append(f"{label}: field 'name': '{name}' is used by another service "
                          f"('-' and '_' count as the same)")
        names.add(_upstream_base(name))
        prefix = service.get("prefix")
        for other, owner in prefixes.items():
            if prefix and (prefix == other or prefix.startswith(other + "/") or other.startswith(prefix + "/")):
                errors.append(f"{label}: field 'prefix': {prefix!r} overlaps {other!r} of service '{owner}'")
        if prefix:
            prefixes[prefix] = name
        servers = {(host, service["port"]) for host in service.get("hosts") or [] if service.get("port")}
        for task in (service.get("tasks") or {}).values():
            servers |= {(host, task["port"]) for host in task.get("hosts") or [] if task.get("port")}
        for key in sorted(servers):
            if key in ports and ports[key] != label:
                errors.append(f"{label}: field 'port': port {key[1]} on host '{key[0]}' is already used by {ports[key]}")
            ports.setdefault(key, label)


def llm_services_normalize(services: Any, groups: Mapping[str, Any], models: Any = None) -> list[dict[str, Any]]:
    """Validate llm_services and fill its defaults; `models` (llm_registry) guards against port clashes.

    Raises AnsibleFilterError listing every error of the list in one run.
    """
    if services is None:
        return []
    if not isinstance(services, list):
        raise AnsibleFilterError(f"{SERVICES}: must be a list of services, got {_describe(services)}")
    errors: list[str] = []
    normalized = [_normalize(index, raw, groups, errors) for index, raw in enumerate(services)]
    _check_conflicts(normalized, models or [], errors)
    if len(errors) == 1:
        raise AnsibleFilterError(errors[0])
    if errors:
        raise AnsibleFilterError(f"{SERVICES}: {len(errors)} errors:\n" + "\n".join(f"  {e}" for e in errors))
    return normalized


def _address(hostvars: Mapping[str, Any], host: str, service: str) -> str:
    """The host's private address, by the registry's rule: llm_private_address, else its default IPv4."""
    if host not in hostvars:
        raise AnsibleFilterError(f"{SERVICES}: service '{service}': host '{host}': not found in hostvars")
    values = hostvars[host]
    address = values.get("llm_private_address") or ((values.get("ansible_facts") or {}).get("default_ipv4") or {}).get(
        "address")
    if not address:
        raise AnsibleFilterError(f"{SERVICES}: service '{service}': host '{host}': has no address for the gateway: "
                                 f"gather its facts or set llm_private_address")
    address = str(address)
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _upstream_base(name: str) -> str:
    return "llm_svc_" + name.replace("-", "_")


def _check_key_ids(normalized: list[dict[str, Any]], key_ids: list[str]) -> None:
    """A misspelt key id in api_keys would silently shut its key out: refuse it, with the near miss."""
    errors = []
    for service in normalized:
        for key_id in service["api_keys"] or []:
            if key_id not in key_ids:
                close = difflib.get_close_matches(key_id, key_ids, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"ids: {', '.join(key_ids) or 'none'}"
                errors.append(f"{SERVICES}: service '{service['name']}': field 'api_keys': '{key_id}' is no id "
                              f"of llm_api_keys ({hint})")
    if errors:
        raise AnsibleFilterError("\n".join(errors))


def llm_gateway_services(normalized: Any, hostvars: Mapping[str, Any], key_ids: Any = None) -> list[dict[str, Any]]:
    """What the gateway renders per service: its upstreams (tasks that share servers share one) and routes.

    Each service: name, kind, prefix, strip_prefix, header_names, client_max_body_size, the
    timeouts, api_keys, upstream (the default servers) and, for immich_ml, tasks: {task: upstream}
    for every task of IMMICH_TASKS. Upstreams: [{name, servers, health}]. With `key_ids` (the ids
    of llm_api_keys, when keys are checked) every id in api_keys must be one of them.
    """
    if not isinstance(normalized, list):
        raise AnsibleFilterError("llm_gateway_services: expects the output of llm_services_normalize")
    if key_ids is not None:
        _check_key_ids(normalized, [str(key_id) for key_id in key_ids])
    result = []
    for service in normalized:
        base = _upstream_base(service["name"])

        def servers(hosts: list[str], port: int, name: str = service["name"]) -> list[str]:
            return [f"{_address(hostvars, host, name)}:{port}" for host in hosts]

        default = servers(service["hosts"], service["port"])
        upstreams = [{"name": base, "servers": default, "health": service["health_path"]}]
        by_servers = {tuple(default): base}
        tasks = {}
        for task in IMMICH_TASKS if service["kind"] == "immich_ml" else ():
            spec = service["tasks"].get(task)
            group = servers(spec["hosts"], spec["port"]) if spec else default
            if tuple(group) not in by_servers:
                by_servers[tuple(group)] = f"{base}_{task}"
                upstreams.append({"name": f"{base}_{task}", "servers": group, "health": service["health_path"]})
            tasks[task] = by_servers[tuple(group)]
        result.append({
            "name": service["name"], "kind": service["kind"], "prefix": service["prefix"],
            "strip_prefix": service["strip_prefix"], "header_names": sorted(service["headers"]),
            "client_max_body_size": service["client_max_body_size"], "connect_timeout": service["connect_timeout"],
            "send_timeout": service["send_timeout"], "read_timeout": service["read_timeout"],
            "api_keys": service["api_keys"], "upstream": base, "upstreams": upstreams, "tasks": tasks,
        })
    return result


def llm_service_router_data(services: Any) -> dict[str, Any]:
    """What njs needs (routes.js): each service's task -> upstream, and every upstream for /ready."""
    return {
        "services": {service["name"]: {"name": service["name"], "tasks": dict(service["tasks"])} for service in services},
        "upstreams": [{"name": upstream["name"], "servers": list(upstream["servers"]), "health": upstream["health"],
                       "service": service["name"]} for service in services for upstream in service["upstreams"]],
    }


def llm_service_host_ports(normalized: Any, inventory_hostname: str) -> list[int]:
    """The ports of the services (and their task groups) that run on one host, for its firewall."""
    ports: set[int] = set()
    for service in normalized or []:
        if inventory_hostname in service["hosts"]:
            ports.add(service["port"])
        for task in service["tasks"].values():
            if inventory_hostname in task["hosts"]:
                ports.add(task["port"])
    return sorted(ports)


def llm_service_header_var(name: str) -> str:
    """The nginx variable that carries a service header's value (services-auth.conf)."""
    return "llm_svc_h_" + re.sub(r"[^a-z0-9]", "_", name.lower())


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        return {
            "llm_services_normalize": llm_services_normalize,
            "llm_gateway_services": llm_gateway_services,
            "llm_service_host_ports": llm_service_host_ports,
            "llm_service_router_data": llm_service_router_data,
            "llm_service_header_var": llm_service_header_var,
        }

"""Filters over the model registry (the inventory variable ``llm_models``).

The registry is the single source of truth for what runs where: the model_server
role deploys from it and the gateway role derives its upstreams and routes from
it. Validation lives here, in Python with unit tests, because a registry mistake
(a typo'd key, a port used twice on one host, an alias that shadows another
model) would otherwise surface as a silently wrong route at request time.

It is also the one place that says which API paths exist (API_ENDPOINTS) and
where each engine serves them (backend_path): the gateway renders its locations
from llm_api_endpoints, and every normalised model carries its own `paths`.

Filters:
    llm_registry_normalize(models, groups)      -> normalized list (validated)
    llm_host_models(normalized, hostname)       -> models to run on one host
    llm_gateway_upstreams(normalized, hostvars) -> nginx upstream blocks
    llm_private_addresses(hosts, hostvars)      -> each host's private address (allow lists, scrape targets)
    llm_host_servers(normalized, hostvars, host) -> the servers one host gives the gateways (rollouts)
    llm_agent_servers(agent_config)             -> "<model> <address>" a gateway's health agent checks
    llm_gateway_routes(normalized)              -> name/alias -> route (for njs)
    llm_gateway_cached_routes(normalized)       -> the (model, endpoint) pairs the gateway caches
    llm_api_endpoints(ignored)                  -> [{name, path}] the gateway serves
    llm_backend_key_files(normalized, given, credentials_dir)
                                                -> key files to generate, one per model without a given key
    llm_backend_api_keys(normalized, given, generated)
                                                -> {model name: key} for every model with api_key true
    llm_backend_key_errors(given, normalized, keys, credentials_dir)
                                                -> messages for given or stored keys that are wrong
    llm_services_normalize(services, groups, normalized)
                                                -> llm_services validated (llm_service_registry)
    llm_gateway_services(services, hostvars, key_ids)
                                                -> per service: upstreams, task routes, header names
    llm_service_router_data(gateway_services)   -> task routes and upstreams for njs (routes.js)
    llm_service_host_ports(services, hostname)  -> ports of the services on one host (firewall)
    llm_service_header_var(header name)         -> the nginx variable of a service header

The backend keys are secrets: the filters that see them never put one into a
message, so the task that reports their errors can run without no_log.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
# Hugging Face repo ids: "org/name" or a bare legacy name such as "gpt2".
HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Path segments only: the prefix is pasted into nginx config and URLs verbatim.
API_PREFIX_RE = re.compile(r"^(/[A-Za-z0-9._~-]+)*$")
# [registry[:port]/]path[:tag][@digest], lower-case path as docker requires.
IMAGE_RE = re.compile(r"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# RFC 6750's b64token, what may follow "Bearer " in an Authorization header; also safe
# unquoted in a systemd EnvironmentFile and in docker's env.
BEARER_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")
BEARER_TOKEN_CHAR_RE = re.compile(r"^[A-Za-z0-9._~+/=-]$")
API_KEY_MIN_LENGTH = 16
# Where generated keys live below llm_credentials_dir, one file per model.
BACKEND_KEYS_DIR = "backend-keys"

ENGINES = ("vllm", "infinity", "command")
# Every endpoint the gateway serves, with the path clients call. The one table of the API:
# the gateway's locations, the router's data, the registry's checks and the model_server
# probe all derive from it. Order matters only for readability of generated config.
API_ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("chat", "/v1/chat/completions"),
    ("completions", "/v1/completions"),
    ("embeddings", "/v1/embeddings"),
    ("rerank", "/v1/rerank"),
    ("responses", "/v1/responses"),
    ("score", "/v1/score"),
    ("tokenize", "/tokenize"),
    ("detokenize", "/detokenize"),
    # Multipart uploads (vLLM's Whisper-class models): the model is a form field, not JSON.
    ("audio_transcriptions", "/v1/audio/transcriptions"),
    ("audio_translations", "/v1/audio/translations"),
)
ENDPOINTS = tuple(name for name, _ in API_ENDPOINTS)
# The endpoints whose body is multipart/form-data; every other one takes a JSON body.
MULTIPART_ENDPOINTS = ("audio_transcriptions", "audio_translations")
JSON_ENDPOINTS = tuple(name for name in ENDPOINTS if name not in MULTIPART_ENDPOINTS)
GATEWAY_PATHS = dict(API_ENDPOINTS)
# The part of a gateway path that the model's api_prefix replaces.
GATEWAY_API_PREFIX = "/v1"
# What each engine can serve: Infinity has no generation or tokenizer endpoints.
ENGINE_ENDPOINTS = {"vllm": ENDPOINTS, "infinity": ("embeddings", "rerank"), "command": ENDPOINTS}
RUNTIMES = ("systemd", "docker")
DEFAULT_ENDPOINTS = {"vllm": ["chat", "completions"], "infinity": ["embeddings", "rerank"]}
# Infinity serves /embeddings without /v1 unless started with --url-prefix.
DEFAULT_API_PREFIX = {"vllm": "/v1", "infinity": "", "command": "/v1"}
ENGINES_NEEDING_SOURCE = ("vllm", "infinity")
PORT_MIN, PORT_MAX = 1024, 65535

KNOWN_FIELDS = frozenset(
    {
        "name", "aliases", "engine", "endpoints", "hosts", "port", "api_prefix",
        "command", "source", "runtime", "image", "version", "args", "env", "gpus", "api_key",
        "cache",
    }
)
# A host entry of `hosts` may be a mapping with these fields (weights and backups per model).
HOST_FIELDS = frozenset({"host", "weight", "backup"})
WEIGHT_MAX = 100
# What `cache: true` caches: the endpoints whose answer depends only on model and body.
DETERMINISTIC_ENDPOINTS = ("embeddings", "rerank", "tokenize", "detokenize")
# What `cache: {endpoints: [...]}` may name; chat and completions cache their non-streamed
# answers only (the gateway sends streams past the cache), responses keep server-side state.
CACHEABLE_ENDPOINTS = (*DETERMINISTIC_ENDPOINTS, "chat", "completions", "score")
CACHE_FIELDS = frozenset({"endpoints", "valid", "shared"})
# nginx time: a number and a unit, e.g. 10m, 1h, 7d.
NGINX_TIME_RE = re.compile(r"^[1-9][0-9]{0,5}(ms|s|m|h|d|w|M|y)$")

REGISTRY = "llm_models"
API_KEYS = "llm_model_api_keys"


class _FieldError(ValueError):
    """A field's value is wrong; the caller adds which model and field."""


def _describe(value: Any) -> str:
    """Show a bad value the way the user wrote it, with its YAML type when that is the surprise."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    return repr(value)


def _label(index: int, raw: Any) -> str:
    """Name an entry by its model name when it has a valid one, else by its position."""
    if isinstance(raw, Mapping):
        name = raw.get("name")
        if isinstance(name, str) and NAME_RE.match(name):
            return f"{REGISTRY}: model '{name}'"
    return f"{REGISTRY}[{index}]"


def _is_int(value: Any) -> bool:
    """YAML's true/false are ints to Python; a port or GPU id of `true` is a typo, not 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_name(value: Any) -> str:
    """Names go into URLs, JSON and nginx config, so keep them to a safe character set."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _FieldError(
            f"must be a string matching {NAME_RE.pattern} (letters, digits, '.', '_', ':', '/', '-'), "
            f"got {_describe(value)}"
        )
    return str(value)


def _check_name_list(value: Any) -> list[str]:
    """Aliases follow the same rules as names because clients send them the same way."""
    if not isinstance(value, list):
        raise _FieldError(f"must be a list of names, got {_describe(value)}")
    names = []
    for item in value:
        try:
            names.append(_check_name(item))
        except _FieldError as exc:
            raise _FieldError(f"every entry {exc}") from None
    return names


def _check_choice(value: Any, choices: Iterable[str]) -> str:
    """Refuse unknown values rather than guessing what was meant."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise _FieldError(f"must be one of {', '.join(choices)}, got {_describe(value)}")
    return str(value)


def backend_path(endpoint: str, api_prefix: str) -> str:
    """The path a model's server answers an endpoint at, given its api_prefix.

    Paths under /v1 move under the model's prefix (Infinity's "" serves /embeddings);
    the others (vLLM's /tokenize, /detokenize) sit at the server's root whatever the prefix.
    """
    if endpoint not in GATEWAY_PATHS:
        raise ValueError(f"unknown endpoint {endpoint!r}; known: {', '.join(ENDPOINTS)}")
    path = GATEWAY_PATHS[endpoint]
    if path.startswith(GATEWAY_API_PREFIX + "/"):
        return api_prefix + path[len(GATEWAY_API_PREFIX):]
    return path


def _check_endpoints(value: Any, engine: str | None) -> list[str]:
    """A model must serve at least one endpoint or the gateway could never route to it.

    One its engine lacks is refused too: the gateway would route to it and every request would fail.
    """
    if not isinstance(value, list) or not value:
        raise _FieldError(f"must be a non-empty list from {', '.join(ENDPOINTS)}, got {_describe(value)}")
    bad = [item for item in value if not isinstance(item, str) or item not in ENDPOINTS]
    if bad:
        raise _FieldError(f"must only contain {', '.join(ENDPOINTS)}, got {', '.join(_describe(b) for b in bad)}")
    served = ENGINE_ENDPOINTS.get(engine or "", ENDPOINTS)
    unserved = [endpoint for endpoint in ENDPOINTS if endpoint in value and endpoint not in served]
    if unserved:
        raise _FieldError(f"engine '{engine}' does not serve {', '.join(repr(e) for e in unserved)}; "
                          f"it serves {', '.join(served)}")
    return [endpoint for endpoint in ENDPOINTS if endpoint in value]


def _check_port(value: Any) -> int:
    """Ports below 1024 need root, which model services must not run as."""
    if not _is_int(value) or not PORT_MIN <= value <= PORT_MAX:
        raise _FieldError(f"must be an integer from {PORT_MIN} to {PORT_MAX}, got {_describe(value)}")
    return int(value)


def _check_api_prefix(value: Any) -> str:
    """The prefix replaces /v1 in the gateway's paths (see backend_path), so no trailing slash."""
    if not isinstance(value, str) or not API_PREFIX_RE.match(value):
        raise _FieldError(f"must be \"\" or a path like \"/v1\" (no trailing slash), got {_describe(value)}")
    return str(value)


def _check_text(value: Any) -> str:
    """A non-empty string; numbers are refused because YAML turns `0.10` into 0.1."""
    if not isinstance(value, str) or not value.strip():
        raise _FieldError(f"must be a non-empty string (quote numbers), got {_describe(value)}")
    return str(value)


def _check_source(value: Any) -> str:
    """Either a Hugging Face repo id or an absolute path: relative paths depend on a cwd nobody controls."""
    if isinstance(value, str) and (value.startswith("/") or HF_REPO_RE.match(value)):
        return str(value)
    raise _FieldError(f"must be a Hugging Face repo id (org/name) or an absolute path, got {_describe(value)}")


def _check_image(value: Any) -> str:
    """A docker image reference such as registry.local/team/server:1.2 (tag or digest)."""
    text = _check_text(value)
    if not IMAGE_RE.match(text):
        raise _FieldError(f"must be a docker image reference like 'name:tag', got {text!r}")
    return text


def _scalar_to_str(value: Any) -> str:
    """Numbers in args/env are natural in YAML (`--max-model-len, 4096`); booleans are a trap."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _FieldError(f"must contain only strings or numbers, got {_describe(value)}")


def _check_args(value: Any) -> list[str]:
    """Extra command-line arguments, passed to the engine one word each."""
    if not isinstance(value, list):
        raise _FieldError(f"must be a list of strings, got {_describe(value)}")
    return [_scalar_to_str(item) for item in value]


def _check_env(value: Any) -> dict[str, str]:
    """Environment for the service; keys must be valid shell/systemd variable names."""
    if not isinstance(value, Mapping):
        raise _FieldError(f"must be a mapping of NAME: value, got {_describe(value)}")
    env = {}
    for key, item in value.items():
        if not isinstance(key, str) or not ENV_KEY_RE.match(key):
            raise _FieldError(f"has an invalid variable name {_describe(key)}")
        env[str(key)] = _scalar_to_str(item)
    return env


def _check_gpus(value: Any) -> list[int]:
    """GPU ids are device indices; duplicates would hide a mistake."""
    if not isinstance(value, list) or not all(_is_int(g) and g >= 0 for g in value):
        raise _FieldError(f"must be a list of non-negative integers, got {_describe(value)}")
    if len(set(value)) != len(value):
        raise _FieldError(f"must not repeat a GPU id, got {list(value)}")
    return sorted(int(g) for g in value)


def _check_bool(value: Any) -> bool:
    """A real YAML boolean: the string "false" would otherwise be true."""
    if not isinstance(value, bool):
        raise _FieldError(f"must be true or false, got {_describe(value)}")
    return value


def _host_item(item: Any) -> tuple[str, dict[str, Any]]:
    """One entry of `hosts`: a host or group name, or {host, weight, backup}."""
    if isinstance(item, str):
        return item, {}
    if not isinstance(item, Mapping):
        raise _FieldError(f"must contain host or group names or mappings with 'host', got {_describe(item)}")
    unknown = sorted(set(item) - HOST_FIELDS, key=str)
    if unknown:
        raise _FieldError(f"the entry of host {_describe(item.get('host'))}: unknown key '{unknown[0]}' "
                          f"(known: host, weight, backup)")
    name = item.get("host")
    if not isinstance(name, str) or not name:
        raise _FieldError(f"an entry has no 'host' (a host or group name), got {_describe(name)}")
    options: dict[str, Any] = {}
    if "weight" in item:
        weight = item["weight"]
        if not _is_int(weight) or not 1 <= weight <= WEIGHT_MAX:
            raise _FieldError(f"host '{name}': 'weight' must be an integer from 1 to {WEIGHT_MAX}, got {_describe(weight)}")
        options["weight"] = weight
    if "backup" in item:
        if not isinstance(item["backup"], bool):
            raise _FieldError(f"host '{name}': 'backup' must be true or false, got {_describe(item['backup'])}")
        options["backup"] = item["backup"]
    return name, options


def _check_hosts(value: Any, groups: Mapping[str, Any]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Expand groups like Ansible's host patterns do (a group wins over a host of the same name).

    Returns the sorted hosts and each host's server options: weight (default 1) and backup
    (default false). A host that two entries give options for is an error, not a silent pick.
    """
    if not isinstance(value, list) or not value:
        raise _FieldError(f"must be a non-empty list of inventory hosts or groups, got {_describe(value)}")
    known_hosts = {host for members in groups.values() for host in members}
    hosts: set[str] = set()
    options: dict[str, dict[str, Any]] = {}
    optioned_by: dict[str, str] = {}
    for raw in value:
        item, item_options = _host_item(raw)
        if item in groups:
            members = [str(host) for host in groups[item]]
            if not members:
                raise _FieldError(f"group '{item}' has no hosts")
        elif item in known_hosts:
            members = [str(item)]
        else:
            raise _FieldError(f"'{item}' is neither a host nor a group in the inventory")
        hosts.update(members)
        if item_options:
            for host in members:
                if host in optioned_by:
                    raise _FieldError(f"host '{host}' gets a weight or backup from both '{optioned_by[host]}' "
                                      f"and '{item}'; give it once")
                optioned_by[host] = item
                options[host] = item_options
    servers = {host: {"weight": 1, "backup": False, **options.get(host, {})} for host in sorted(hosts)}
    if all(server["backup"] for server in servers.values()):
        raise _FieldError("has only backup hosts; a backup serves only while every primary host is down")
    return sorted(hosts), servers


def _check_service_hosts(value: Any, groups: Mapping[str, Any]) -> list[str]:
    """A service's hosts: names only (weights and backups are the models' own, for now)."""
    if isinstance(value, list) and any(not isinstance(item, str) for item in value):
        raise _FieldError("must contain only host or group names (weight and backup are for models)")
    hosts, _ = _check_hosts(value, groups)
    return hosts


def _check_cache(value: Any, endpoints: list[str] | None) -> dict[str, Any]:
    """What the gateway caches for a model: {endpoints, valid, shared}, empty endpoints for none.

    `true` caches the deterministic endpoints the model declares; a mapping names them (and
    may add chat and completions, whose streamed answers are never cached).
    """
    declared = endpoints or []
    if value is False:
        return {"endpoints": [], "valid": None, "shared": False}
    if value is True:
        chosen = [endpoint for endpoint in declared if endpoint in DETERMINISTIC_ENDPOINTS]
        if not chosen:
            raise _FieldError(f"true caches {', '.join(DETERMINISTIC_ENDPOINTS)}, and this model declares none of "
                              f"them; name its endpoints to cache: cache: {{endpoints: [...]}}")
        return {"endpoints": chosen, "valid": None, "shared": False}
    if not isinstance(value, Mapping):
        raise _FieldError(f"must be true, false or a mapping with endpoints, valid, shared, got {_describe(value)}")
    unknown = sorted(set(value) - CACHE_FIELDS, key=str)
    if unknown:
        raise _FieldError(f"unknown key '{unknown[0]}' (known: {', '.join(sorted(CACHE_FIELDS))})")
    chosen = value.get("endpoints")
    if not isinstance(chosen, list) or not chosen or not all(isinstance(e, str) for e in chosen):
        raise _FieldError("'endpoints' must be a non-empty list of endpoint names, got "
                          + ("an empty list" if chosen == [] else _describe(chosen)))
    for endpoint in chosen:
        if endpoint not in CACHEABLE_ENDPOINTS:
            raise _FieldError(f"endpoint '{endpoint}' cannot be cached (cacheable: {', '.join(CACHEABLE_ENDPOINTS)})")
        if endpoint not in declared:
            raise _FieldError(f"endpoint '{endpoint}' is not one of the model's endpoints ({', '.join(declared)})")
    valid = value.get("valid")
    if valid is not None and (not isinstance(valid, str) or not NGINX_TIME_RE.match(valid)):
        raise _FieldError(f"'valid' must be an nginx time such as 10m, 1h or 7d, got {_describe(valid)}")
    shared = value.get("shared", False)
    if not isinstance(shared, bool):
        raise _FieldError(f"'shared' must be true or false, got {_describe(shared)}")
    return {"endpoints": [e for e in declared if e in chosen], "valid": valid, "shared": shared}


class _Entry:
    """Collects one entry's field errors so every bad field is reported, not only the first."""

    def __init__(self, label: str, errors: list[str]) -> None:
        self.label = label
        self.errors = errors
        self.ok = True

    def check(self, field: str, value: Any, check: Callable[..., Any], *args: Any) -> Any:
        """Run one field check; on failure record a message that names model and field."""
        try:
            return check(value, *args)
        except _FieldError as exc:
            self.fail(field, str(exc))
            return None

    def fail(self, field: str, message: str) -> None:
        """Record an error for this entry."""
        self.ok = False
        self.errors.append(f"{self.label}: field '{field}': {message}")


def _unknown_field_message(key: str) -> str:
    """Typos must not be ignored; suggesting the likely intended field makes the fix obvious."""
    close = difflib.get_close_matches(key, sorted(KNOWN_FIELDS), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(sorted(KNOWN_FIELDS))}"
    return f"unknown field ({hint})"


def _normalize_entry(index: int, raw: Any, groups: Mapping[str, Any], errors: list[str]) -> tuple[dict[str, Any], bool]:
    """Validate one entry and fill its defaults; returns (model, ok).

    A model with errors is still returned, with None for its bad fields, so the
    registry-wide checks can report e.g. a duplicate name in the same run.
    """
    label = _label(index, raw)
    if not isinstance(raw, Mapping):
        errors.append(f"{label}: must be a mapping with at least name, engine, hosts and port, got {_describe(raw)}")
        return {}, False
    entry = _Entry(label, errors)
    for key in sorted(set(raw) - KNOWN_FIELDS, key=str):
        entry.fail(str(key), _unknown_field_message(str(key)))
    for key in ("name", "engine", "hosts", "port"):
        if key not in raw:
            entry.fail(key, "is required")

    model: dict[str, Any] = {}
    model["name"] = entry.check("name", raw["name"], _check_name) if "name" in raw else None
    model["aliases"] = entry.check("aliases", raw.get("aliases", []), _check_name_list)
    engine = entry.check("engine", raw["engine"], _check_choice, ENGINES) if "engine" in raw else None
    model["engine"] = engine
    checked_hosts = entry.check("hosts", raw["hosts"], _check_hosts, groups) if "hosts" in raw else None
    model["hosts"], model["servers"] = checked_hosts if checked_hosts else (None, None)
    model["port"] = entry.check("port", raw["port"], _check_port) if "port" in raw else None
    model["runtime"] = entry.check("runtime", raw.get("runtime", "systemd"), _check_choice, RUNTIMES)
    model["version"] = entry.check("version", raw["version"], _check_text) if "version" in raw else None
    model["args"] = entry.check("args", raw.get("args", []), _check_args)
    model["env"] = entry.check("env", raw.get("env", {}), _check_env)
    model["gpus"] = entry.check("gpus", raw.get("gpus", []), _check_gpus)
    # Whether the server checks a key (the gateway then sends it one); the key itself is
    # never part of the registry, see llm_backend_api_keys.
    model["api_key"] = entry.check("api_key", raw.get("api_key", True), _check_bool)

    # The rest depends on the engine; with an invalid engine there is nothing sound to check against.
    if "endpoints" in raw:
        model["endpoints"] = entry.check("endpoints", raw["endpoints"], _check_endpoints, engine)
    elif engine in DEFAULT_ENDPOINTS:
        model["endpoints"] = list(DEFAULT_ENDPOINTS[engine])
    elif engine == "command":
        entry.fail("endpoints", "is required for engine 'command' (which endpoints the command serves)")
    if "api_prefix" in raw:
        model["api_prefix"] = entry.check("api_prefix", raw["api_prefix"], _check_api_prefix)
    elif engine:
        model["api_prefix"] = DEFAULT_API_PREFIX[engine]
    if engine == "command":
        if "command" not in raw:
            entry.fail("command", "is required for engine 'command'")
        else:
            model["command"] = entry.check("command", raw["command"], _check_text)
    elif engine and "command" in raw:
        entry.fail("command", f"is only valid with engine 'command', not '{engine}'")
    model.setdefault("command", None)
    # A container needs an image: the engines have official ones, a command of the user's own does not.
    if "image" in raw:
        model["image"] = entry.check("image", raw["image"], _check_image)
        if model["runtime"] != "docker":
            entry.fail("image", f"is only valid with runtime 'docker', not '{model['runtime']}'")
    elif engine == "command" and model["runtime"] == "docker":
        entry.fail("image", "is required for engine 'command' with runtime 'docker' (the image the command runs in)")
    model.setdefault("image", None)
    if "source" in raw:
        model["source"] = entry.check("source", raw["source"], _check_source)
    elif engine in ENGINES_NEEDING_SOURCE:
        entry.fail("source", f"is required for engine '{engine}' (Hugging Face repo id or absolute path)")
    model.setdefault("source", None)

    if "endpoints" in model and model["endpoints"] is not None:
        model["cache"] = entry.check("cache", raw.get("cache", False), _check_cache, model["endpoints"])
    else:
        model["cache"] = None

    valid_names = model["name"] is not None and model["aliases"] is not None
    model["served_names"] = [model["name"], *model["aliases"]] if valid_names else None
    # Computed once here so the gateway's routes and the model_server probe cannot disagree.
    endpoints, api_prefix = model.get("endpoints"), model.get("api_prefix")
    model["paths"] = ({endpoint: backend_path(endpoint, api_prefix) for endpoint in endpoints}
                      if endpoints is not None and api_prefix is not None else None)
    return model, entry.ok


def _owner(models: list[dict[str, Any]], other: int, index: int) -> str:
    """Name the model that already holds a name, as seen from model `index`."""
    return "this model" if other == index else f"model '{models[other]['name']}' ({REGISTRY}[{other}])"


def _check_unique_names(models: list[dict[str, Any]], errors: list[str]) -> None:
    """A name or alias used twice would make the gateway's route depend on list order.

    So would two names that differ only in case: the gateway's name lookup does not tell
    them apart. Names are ASCII (NAME_RE), so lower() is the whole case rule.
    """
    owner: dict[str, int] = {}
    first_spelling: dict[str, tuple[str, int]] = {}
    for index, model in enumerate(models):
        if not model.get("served_names"):
            continue
        for position, served in enumerate(model["served_names"]):
            field = "name" if position == 0 else "aliases"
            label = f"{REGISTRY}: model '{model['name']}': field '{field}'"
            if served in owner:
                errors.append(f"{label}: '{served}' is already used by {_owner(models, owner[served], index)}")
                continue
            owner[served] = index
            if served.lower() in first_spelling:
                spelling, other = first_spelling[served.lower()]
                errors.append(f"{label}: '{served}' differs only in case from '{spelling}' of "
                              f"{_owner(models, other, index)}; the gateway's name lookup does not tell them apart: "
                              f"rename one")
            else:
                first_spelling[served.lower()] = (served, index)


def _check_host_conflicts(models: list[dict[str, Any]], errors: list[str]) -> None:
    """Two services on one host cannot bind the same port or (usefully) share a GPU."""
    ports: dict[tuple[str, int], str] = {}
    gpus: dict[tuple[str, int], str] = {}
    for model in models:
        if not model.get("name") or model.get("hosts") is None or model.get("port") is None:
            continue
        for host in model["hosts"]:
            key = (host, model["port"])
            if key in ports:
                errors.append(f"{REGISTRY}: model '{model['name']}': field 'port': port {model['port']} "
                              f"on host '{host}' is already used by model '{ports[key]}'")
            else:
                ports[key] = model["name"]
            for gpu in model["gpus"] or []:
                gkey = (host, gpu)
                if gkey in gpus:
                    errors.append(f"{REGISTRY}: model '{model['name']}': field 'gpus': GPU {gpu} "
                                  f"on host '{host}' is already used by model '{gpus[gkey]}'")
                else:
                    gpus[gkey] = model["name"]


def _upstream_names(names: list[str]) -> dict[str, str]:
    """Readable nginx upstream names; a short hash keeps `chat.small` and `chat-small` apart."""
    def base(name: str) -> str:
        return "llm_" + (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "model")

    counts: dict[str, int] = {}
    for name in names:
        counts[base(name)] = counts.get(base(name), 0) + 1
    result = {}
    for name in names:
        upstream = base(name)
        if counts[upstream] > 1:
            upstream += "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
        result[name] = upstream
    return result


def _raise_errors(errors: list[str]) -> None:
    """One error reads as one line; several are listed so a single run shows them all."""
    if len(errors) == 1:
        raise AnsibleFilterError(errors[0])
    if errors:
        raise AnsibleFilterError(f"{REGISTRY}: {len(errors)} errors:\n" + "\n".join(f"  {e}" for e in errors))


def llm_registry_normalize(models: Any, groups: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Validate the registry and return it with defaults filled, hosts expanded and upstream names.

    `groups` is Ansible's `groups` magic variable, needed to expand group names and to
    refuse hosts that are not in the inventory. Raises AnsibleFilterError listing every error.
    """
    if not isinstance(models, list):
        raise AnsibleFilterError(f"{REGISTRY}: must be a list of models, got {_describe(models)}")
    if not isinstance(groups, Mapping):
        raise AnsibleFilterError("llm_registry_normalize: the second argument must be the 'groups' variable")
    errors: list[str] = []
    checked = [_normalize_entry(index, raw, groups, errors) for index, raw in enumerate(models)]
    normalized = [model for model, _ in checked]
    _check_unique_names(normalized, errors)
    _check_host_conflicts(normalized, errors)
    _raise_errors(errors)
    upstreams = _upstream_names([model["name"] for model in normalized])
    for model in normalized:
        model["upstream"] = upstreams[model["name"]]
    return normalized


def _require_normalized(normalized: Any, filter_name: str) -> list[Mapping[str, Any]]:
    """Catch the easy mistake of passing raw llm_models where llm_registry is expected."""
    if not isinstance(normalized, list) or not all(
        isinstance(m, Mapping) and {"upstream", "served_names", "paths", "api_key", "servers", "cache"} <= set(m) for m in normalized
    ):
        raise AnsibleFilterError(
            f"{filter_name}: expects the output of llm_registry_normalize (llm_registry), not raw llm_models"
        )
    return normalized


def llm_host_models(normalized: Any, inventory_hostname: str) -> list[dict[str, Any]]:
    """The models one host runs, so the model_server role loops over exactly these."""
    return [dict(m) for m in _require_normalized(normalized, "llm_host_models") if inventory_hostname in m["hosts"]]


def _host_address(hostvars: Mapping[str, Any], host: str, model: str) -> str:
    """The private address the gateway uses to reach a host: explicit wins over facts."""
    return _private_address(hostvars, host, f"{REGISTRY}: model '{model}': host '{host}'")


def llm_private_addresses(hosts: Any, hostvars: Mapping[str, Any]) -> list[str]:
    """The private address of each host (a group's, say), by the rule the upstreams follow.

    For allow lists and scrape targets of hosts outside the registry (llm_monitoring).
    """
    if not isinstance(hosts, list) or not all(isinstance(host, str) for host in hosts):
        raise AnsibleFilterError(f"llm_private_addresses: expects a list of host names, got {_describe(hosts)}")
    return [_private_address(hostvars, host, f"llm_private_addresses: host '{host}'") for host in hosts]


def _private_address(hostvars: Mapping[str, Any], host: str, prefix: str) -> str:
    """llm_private_address, else the default IPv4 of the host's facts; IPv6 in brackets."""
    if host not in hostvars:
        raise AnsibleFilterError(f"{prefix}: not found in hostvars")
    host_vars = hostvars[host]
    explicit = host_vars.get("llm_private_address")
    if explicit not in (None, ""):
        if not isinstance(explicit, str):
            raise AnsibleFilterError(f"{prefix}: llm_private_address must be a string, got {_describe(explicit)}")
        address = str(explicit)
    else:
        facts = host_vars.get("ansible_facts") or {}
        default_ipv4 = (facts.get("default_ipv4") or {}) if isinstance(facts, Mapping) else {}
        address = default_ipv4.get("address") if isinstance(default_ipv4, Mapping) else None
        if not address:
            raise AnsibleFilterError(
                f"{prefix}: has no address for the gateway: gather its facts in this run "
                f"(a play on it with gather_facts: true) or set llm_private_address for it"
            )
        address = str(address)
    # nginx needs IPv6 literals in brackets before the port.
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def llm_gateway_upstreams(normalized: Any, hostvars: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One nginx upstream per model, sorted by upstream name.

    `servers` lists every server as ADDR:PORT in host order; `peers` the same servers with
    their weight and backup flag, as nginx's `server` lines need them.
    """
    upstreams = []
    for model in _require_normalized(normalized, "llm_gateway_upstreams"):
        peers = [{"address": f"{_host_address(hostvars, host, model['name'])}:{model['port']}",
                  "weight": model["servers"][host]["weight"], "backup": model["servers"][host]["backup"]}
                 for host in model["hosts"]]
        upstreams.append({"name": model["upstream"], "model": model["name"],
                          "servers": [peer["address"] for peer in peers], "peers": peers})
    return sorted(upstreams, key=lambda upstream: upstream["name"])


def llm_host_servers(normalized: Any, hostvars: Mapping[str, Any], host: str) -> list[dict[str, Any]]:
    """The servers one host gives the gateways: per model its address as the upstream names it.

    `peers` is how many servers the model has in all, so a rollout knows when draining
    this one leaves the model none; `key` is "<model> <address>", as llm_agent_servers names it.
    """
    servers = []
    for model in _require_normalized(normalized, "llm_host_servers"):
        if host in model["hosts"]:
            address = f"{_host_address(hostvars, host, model['name'])}:{model['port']}"
            servers.append({"model": model["name"], "upstream": model["upstream"], "peers": len(model["hosts"]),
                            "address": address, "key": f"{model['name']} {address}"})
    return servers


def llm_agent_servers(agent_config: Any) -> list[str]:
    """"<model> <address>" for every server in a health agent's config.json (what a gateway routes to)."""
    if not isinstance(agent_config, Mapping) or not isinstance(agent_config.get("upstreams"), list):
        raise AnsibleFilterError("llm_agent_servers: expected the health agent's configuration (upstreams)")
    return sorted(f"{upstream['model']} {peer['address']}"
                  for upstream in agent_config["upstreams"] for peer in upstream["peers"])


def llm_gateway_routes(normalized: Any) -> dict[str, dict[str, Any]]:
    """Every name and alias a client may send, mapped to where the njs router sends it."""
    routes: dict[str, dict[str, Any]] = {}
    for model in _require_normalized(normalized, "llm_gateway_routes"):
        for served in model["served_names"]:
            if served in routes:
                raise AnsibleFilterError(f"llm_gateway_routes: name '{served}' is served by two models")
            # A copy per name: shared objects would render as YAML anchors if anyone dumps them.
            routes[served] = {
                "id": model["name"],
                "upstream": model["upstream"],
                "endpoints": list(model["endpoints"]),
                "paths": dict(model["paths"]),
                "engine": model["engine"],
                "aliases": list(model["aliases"]),
            }
    return routes


def llm_gateway_cached_routes(normalized: Any) -> list[dict[str, Any]]:
    """The (model, endpoint) pairs a gateway caches, each with its model's location path.

    `path` is where the model's server answers the endpoint (the gateway's location is
    /_llm/<upstream><path>); `streams` says the endpoint can answer with a stream, which
    the gateway then sends past the cache.
    """
    cached = []
    for model in _require_normalized(normalized, "llm_gateway_cached_routes"):
        for endpoint in model["cache"]["endpoints"]:
            cached.append({"model": model["name"], "upstream": model["upstream"], "endpoint": endpoint,
                           "path": model["paths"][endpoint], "streams": endpoint in ("chat", "completions"),
                           "valid": model["cache"]["valid"], "shared": model["cache"]["shared"]})
    return cached


def llm_api_endpoints(_ignored: Any = None) -> list[dict[str, str]]:
    """The gateway's API as [{name, path, body}] in table order, for templates: `{{ none | llm_api_endpoints }}`.

    `body` is "json" or "multipart": how the gateway finds the model in a request.

    A filter needs an input; this one takes any and ignores it, so the table stays here
    rather than being copied into the gateway's variables.
    """
    return [{"name": name, "path": path, "body": "multipart" if name in MULTIPART_ENDPOINTS else "json"}
            for name, path in API_ENDPOINTS]


# --- backend API keys ---------------------------------------------------------------------
# Each model server gets a key of its own, which the gateway sends it. The keys come from
# the vault (llm_model_api_keys) or are generated once on the controller; none of these
# filters puts a key into a message, and llm_registry never holds one.


def _keyed_names(normalized: list[Mapping[str, Any]]) -> list[str]:
    """The models whose server checks a key, in registry order."""
    return [str(model["name"]) for model in normalized if model.get("api_key", True)]


def _given(given: Any) -> Mapping[str, Any]:
    """The vault's keys; a wrong shape is reported by llm_backend_key_errors, not raised here."""
    return given if isinstance(given, Mapping) else {}


def backend_key_file(credentials_dir: str, name: str) -> str:
    """The controller file of a model's generated key: <credentials_dir>/backend-keys/<name>.

    Names may hold '/' and ':' (Hugging Face style). Every character outside letters, digits,
    '.', '_' and '-' is percent-encoded, so a '/' never makes a directory, no name reaches
    outside the directory, and no two names share a file; usual names keep their spelling.
    """
    return f"{str(credentials_dir).rstrip('/')}/{BACKEND_KEYS_DIR}/{urllib.parse.quote(name, safe='')}"


def llm_backend_key_files(normalized: Any, given: Any, credentials_dir: str) -> list[str]:
    """The key files the password lookup must read or create: models with api_key and no given key."""
    keys = _given(given)
    models = _require_normalized(normalized, "llm_backend_key_files")
    return [backend_key_file(credentials_dir, name) for name in _keyed_names(models) if name not in keys]


def llm_backend_api_keys(normalized: Any, given: Any, generated: Any) -> dict[str, Any]:
    """{model name: key} for every model with api_key true: the given key, else the generated one.

    `generated` is the password lookup's answer for llm_backend_key_files, in the same order.
    Values are not checked here (the task that calls this hides its output); see
    llm_backend_key_errors.
    """
    keys = _given(given)
    names = _keyed_names(_require_normalized(normalized, "llm_backend_api_keys"))
    missing = [name for name in names if name not in keys]
    if not isinstance(generated, list) or len(generated) != len(missing):
        count = len(generated) if isinstance(generated, list) else "no list"
        raise AnsibleFilterError(f"llm_backend_api_keys: expected {len(missing)} generated keys "
                                 f"(one per file of llm_backend_key_files), got {count}")
    made = dict(zip(missing, generated))
    return {name: keys[name] if name in keys else made[name] for name in names}


def _key_problem(value: Any) -> str | None:
    """Why a value cannot be a backend key, without quoting any of it; None when it can."""
    if not isinstance(value, str):
        return f"must be a string, got {'null' if value is None else type(value).__name__}"
    if len(value) < API_KEY_MIN_LENGTH:
        return f"must be at least {API_KEY_MIN_LENGTH} characters long, got {len(value)}"
    if not BEARER_TOKEN_RE.match(value):
        bad = sum(1 for char in value if not BEARER_TOKEN_CHAR_RE.match(char))
        where = f"{bad} character{'s' if bad != 1 else ''}" if bad else "a '=' before the end"
        return (f"holds {where} not valid in a Bearer token (letters, digits, '-', '.', '_', '~', '+', '/', "
                f"then '=' padding only at the end)")
    return None


def _unknown_key_name(name: str, normalized: list[Mapping[str, Any]]) -> str:
    """An alias is a likely slip (keys go by model name); else suggest the near miss."""
    for model in normalized:
        if name in model["served_names"][1:]:
            return f"'{name}' is an alias of model '{model['name']}'; give the key under the model's name"
    names = sorted(str(model["name"]) for model in normalized)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"models: {', '.join(names) or 'none'}"
    return f"no such model in {REGISTRY} ({hint})"


def llm_backend_key_errors(given: Any, normalized: Any, keys: Any, credentials_dir: str) -> list[str]:
    """Every problem of the backend keys, one message each, naming the model and never quoting a key.

    `given` is llm_model_api_keys, `keys` what llm_backend_api_keys made of it: a given key must
    belong to a model that takes one and look like a Bearer token; a generated one read back
    from its file (where someone may have edited it) must too.
    """
    models = _require_normalized(normalized, "llm_backend_key_errors")
    if not isinstance(given, Mapping):
        return [f"{API_KEYS}: must be a mapping of model name: key, got {_describe(given)}"]
    errors = []
    by_name = {str(model["name"]): model for model in models}
    for name in sorted(given, key=str):
        label = f"{API_KEYS}: model '{name}'"
        model = by_name.get(str(name)) if isinstance(name, str) else None
        if model is None:
            errors.append(f"{label}: {_unknown_key_name(str(name), models)}")
        elif not model["api_key"]:
            errors.append(f"{label}: its {REGISTRY} entry sets api_key: false, so no key is sent to it; "
                          f"remove the key or set api_key: true")
        elif (problem := _key_problem(given[name])) is not None:
            errors.append(f"{label}: {problem}")
    stored = keys if isinstance(keys, Mapping) else {}
    for name in _keyed_names(models):
        if name in given:
            continue
        problem = _key_problem(stored.get(name))
        if problem is not None:
            errors.append(f"llm_credentials_dir: model '{name}': the key in {backend_key_file(credentials_dir, name)} "
                          f"{problem}; delete the file to have a new key generated, or give one in {API_KEYS}")
    return errors


# --- services beside the models ----------------------------------------------------------
# llm_services: Qdrant, Immich ML and any HTTP service the gateway puts under a path prefix.
# A mistake here (a prefix that shadows the API, a header value nginx would read as a variable,
# a misspelt task) would surface as a silently wrong route, so every entry is checked and every
# error names the service and the field. Header values are secrets (Qdrant's api-key from the
# vault): no message quotes one.

SERVICES = "llm_services"
SERVICE_KINDS = ("http", "immich_ml")
SERVICE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# One or more path segments, no trailing slash: the location is "<prefix>/".
SERVICE_PREFIX_RE = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")
# Paths of the gateway itself and of the LLM API: a service prefix must not cover them.
RESERVED_PREFIXES = ("/v1", "/health", "/ready", "/_llm", "/_svc", "/tokenize", "/detokenize")
SIZE_RE = re.compile(r"^[0-9]{1,6}[kKmMgG]?$")
TIME_RE = re.compile(r"^[0-9]{1,6}(ms|s|m|h)?$")
HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#%&'*+.^_`|~-]{1,64}$")
# Headers the gateway sets itself; a service may not override them.
GATEWAY_HEADERS = frozenset({"host", "connection", "content-length", "transfer-encoding", "x-request-id",
                             "x-forwarded-for", "x-forwarded-proto"})
# The tasks of Immich ML's /predict, as the gateway names them; "entries" spells them
# {"clip": {"textual": ...}}, {"clip": {"visual": ...}}, {"facial-recognition": ...}, {"ocr": ...}.
IMMICH_TASKS = ("clip_textual", "clip_visual", "facial_recognition", "ocr")
SERVICE_DEFAULTS = {
    "http": {"strip_prefix": True, "client_max_body_size": "16m", "health_path": "/"},
    # Images: Immich's server uploads previews; 32 MB holds them with room to spare.
    "immich_ml": {"strip_prefix": True, "client_max_body_size": "32m", "health_path": "/ping"},
}
SERVICE_PORT_MIN, SERVICE_PORT_MAX = 1, 65535
SERVICE_FIELDS = frozenset({"name", "kind", "prefix", "hosts", "port", "strip_prefix", "headers",
                            "client_max_body_size", "connect_timeout", "send_timeout", "read_timeout", "health_path",
                            "api_keys", "tasks"})
SERVICE_TASK_FIELDS = frozenset({"hosts", "port"})


def _check_service_name(value: Any) -> str:
    """The name goes into upstream names, the log and njs: lower-case letters, digits, '-', '_'."""
    if not isinstance(value, str) or not SERVICE_NAME_RE.match(value):
        raise _FieldError(f"must match {SERVICE_NAME_RE.pattern}, got {_describe(value)}")
    return value


def _check_service_kind(value: Any) -> str:
    if value not in SERVICE_KINDS:
        raise _FieldError(f"must be one of {', '.join(SERVICE_KINDS)}, got {_describe(value)}")
    return str(value)


def _check_service_prefix(value: Any) -> str:
    """A path prefix of whole segments that leaves the gateway's own paths alone."""
    if not isinstance(value, str) or not SERVICE_PREFIX_RE.match(value):
        raise _FieldError(f"must be a path like \"/qdrant\" (segments of letters, digits, '.', '_', '~', '-'; "
                          f"no trailing slash), got {_describe(value)}")
    for reserved in RESERVED_PREFIXES:
        if value == reserved or value.startswith(reserved + "/") or reserved.startswith(value + "/"):
            raise _FieldError(f"{value!r} overlaps the gateway's own path {reserved!r}")
    return value


def _check_service_port(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not SERVICE_PORT_MIN <= value <= SERVICE_PORT_MAX:
        raise _FieldError(f"must be an integer from {SERVICE_PORT_MIN} to {SERVICE_PORT_MAX}, got {_describe(value)}")
    return value


def _check_service_size(value: Any) -> str:
    if not isinstance(value, str) or not SIZE_RE.match(value):
        raise _FieldError(f"must be an nginx size like \"32m\" (a quoted string), got {_describe(value)}")
    return value


def _check_service_time(value: Any) -> str:
    if not isinstance(value, str) or not TIME_RE.match(value):
        raise _FieldError(f"must be an nginx time like \"60s\" (a quoted string), got {_describe(value)}")
    return value


def _check_service_path(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^/[A-Za-z0-9._~/-]*$", value):
        raise _FieldError(f"must be a path starting with '/', got {_describe(value)}")
    return value


def _check_service_headers(value: Any) -> dict[str, str]:
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


def _check_service_api_keys(value: Any) -> list[str] | None:
    """"all" (None), or the ids of llm_api_keys that may use the service."""
    if value == "all":
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise _FieldError(f"must be \"all\" or a list of llm_api_keys ids, got {_describe(value)}")
    return sorted(set(value))


def _unknown_service_field(key: str, known: frozenset[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"unknown field (did you mean '{close[0]}'?)" if close else f"unknown field; known: {', '.join(sorted(known))}"


def _service_tasks(entry: _Entry, value: Any, groups: Mapping[str, Any], hosts: Any, port: Any) -> dict[str, Any]:
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
        for key in sorted(set(spec) - SERVICE_TASK_FIELDS, key=str):
            entry.fail(f"{field}.{key}", _unknown_service_field(str(key), SERVICE_TASK_FIELDS))
        task_hosts = entry.check(f"{field}.hosts", spec["hosts"], _check_service_hosts, groups) if "hosts" in spec else hosts
        task_port = entry.check(f"{field}.port", spec["port"], _check_service_port) if "port" in spec else port
        tasks[str(task)] = {"hosts": task_hosts, "port": task_port}
    return tasks


def _normalize_service(index: int, raw: Any, groups: Mapping[str, Any], errors: list[str]) -> dict[str, Any]:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    label = f"{SERVICES}: service '{name}'" if isinstance(name, str) and SERVICE_NAME_RE.match(name) else f"{SERVICES}[{index}]"
    if not isinstance(raw, Mapping):
        errors.append(f"{label}: must be a mapping with at least name, kind, prefix, hosts and port, "
                      f"got {_describe(raw)}")
        return {}
    entry = _Entry(label, errors)
    for key in sorted(set(raw) - SERVICE_FIELDS, key=str):
        entry.fail(str(key), _unknown_service_field(str(key), SERVICE_FIELDS))
    for key in ("name", "kind", "prefix", "hosts", "port"):
        if key not in raw:
            entry.fail(key, "is required")
    kind = entry.check("kind", raw["kind"], _check_service_kind) if "kind" in raw else None
    defaults = SERVICE_DEFAULTS.get(kind or "http", SERVICE_DEFAULTS["http"])
    service: dict[str, Any] = {
        "name": entry.check("name", raw["name"], _check_service_name) if "name" in raw else None,
        "kind": kind,
        "prefix": entry.check("prefix", raw["prefix"], _check_service_prefix) if "prefix" in raw else None,
        "hosts": entry.check("hosts", raw["hosts"], _check_service_hosts, groups) if "hosts" in raw else None,
        "port": entry.check("port", raw["port"], _check_service_port) if "port" in raw else None,
        "strip_prefix": entry.check("strip_prefix", raw.get("strip_prefix", defaults["strip_prefix"]), _check_bool),
        "headers": entry.check("headers", raw.get("headers", {}), _check_service_headers),
        "client_max_body_size": entry.check("client_max_body_size",
                                            raw.get("client_max_body_size", defaults["client_max_body_size"]),
                                            _check_service_size),
        "health_path": entry.check("health_path", raw.get("health_path", defaults["health_path"]), _check_service_path),
        "api_keys": entry.check("api_keys", raw.get("api_keys", "all"), _check_service_api_keys),
    }
    for field in ("connect_timeout", "send_timeout", "read_timeout"):
        service[field] = entry.check(field, raw[field], _check_service_time) if field in raw else None
    if kind == "immich_ml":
        service["tasks"] = _service_tasks(entry, raw.get("tasks", {}), groups, service["hosts"], service["port"])
        if service["strip_prefix"] is False:
            entry.fail("strip_prefix", "must be true for kind 'immich_ml' (Immich ML serves /predict at its root)")
    elif "tasks" in raw:
        entry.fail("tasks", f"is only valid with kind 'immich_ml', not {_describe(kind)}")
    service.setdefault("tasks", {})
    return service


def _check_service_conflicts(services: list[dict[str, Any]], models: list[Any], errors: list[str]) -> None:
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
        if _service_upstream(name) in names:
            errors.append(f"{label}: field 'name': '{name}' is used by another service "
                          f"('-' and '_' count as the same)")
        names.add(_service_upstream(name))
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
    normalized = [_normalize_service(index, raw, groups, errors) for index, raw in enumerate(services)]
    _check_service_conflicts(normalized, models or [], errors)
    if len(errors) == 1:
        raise AnsibleFilterError(errors[0])
    if errors:
        raise AnsibleFilterError(f"{SERVICES}: {len(errors)} errors:\n" + "\n".join(f"  {e}" for e in errors))
    return normalized


def _service_address(hostvars: Mapping[str, Any], host: str, service: str) -> str:
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


def _service_upstream(name: str) -> str:
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
        base = _service_upstream(service["name"])

        def servers(hosts: list[str], port: int, name: str = service["name"]) -> list[str]:
            return [f"{_service_address(hostvars, host, name)}:{port}" for host in hosts]

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
        """Map filter names to functions."""
        return {
            "llm_registry_normalize": llm_registry_normalize,
            "llm_host_models": llm_host_models,
            "llm_gateway_upstreams": llm_gateway_upstreams,
            "llm_private_addresses": llm_private_addresses,
            "llm_host_servers": llm_host_servers,
            "llm_agent_servers": llm_agent_servers,
            "llm_gateway_routes": llm_gateway_routes,
            "llm_gateway_cached_routes": llm_gateway_cached_routes,
            "llm_api_endpoints": llm_api_endpoints,
            "llm_backend_key_files": llm_backend_key_files,
            "llm_backend_api_keys": llm_backend_api_keys,
            "llm_backend_key_errors": llm_backend_key_errors,
            "llm_services_normalize": llm_services_normalize,
            "llm_gateway_services": llm_gateway_services,
            "llm_service_host_ports": llm_service_host_ports,
            "llm_service_router_data": llm_service_router_data,
            "llm_service_header_var": llm_service_header_var,
        }

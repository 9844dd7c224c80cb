"""Filters of the model_server role: what one registry model becomes on a GPU host.

The engine command lines, environments, venvs, images, weight downloads and the
request that proves a model serves are derived here, in Python with unit tests
(tests/unit/test_model_server_templates.py), rather than in Jinja spread over
templates and tasks: a wrong flag or a lost alias would otherwise only show up
when a GPU host fails to serve.

Filters:
    model_server_plan(models, settings)     -> one plan per model (see _plan)
    model_server_downloads(plans, hf_home)  -> unique Hugging Face repos to fetch before start
    model_server_systemd_quote(words)       -> an ExecStart= command line, escaped for systemd
    model_server_systemd_env_value(value)   -> a value for Environment="KEY=value"
    model_server_redact(text, keys)         -> text with every backend key replaced

A model's API key never enters a plan: plans are shown in the play's output. A plan
names the variable the engine reads its key from (api_key_env) and, under systemd,
the root-only file that holds it (env_file); the tasks that write or send the key
take it from llm_backend_api_keys, with no_log.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

# The engines this role installs (pip in a venv, or an official image) and their executables.
ENGINE_EXECUTABLES = {"vllm": "vllm", "infinity": "infinity_emb"}
# Same rule as the unit file names have always used: model names may hold '/' or ':'.
UNIT_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# A word systemd would split, expand or unquote unless it is quoted.
SYSTEMD_UNSAFE = re.compile(r"[\s\"'\\;]")
# Inside a container the engine listens on every interface of its own network
# namespace; docker publishes the port on the bind address only.
CONTAINER_BIND = "0.0.0.0"
# The variables systemd expands in a command model's ExecStart: ${NAME} and a lone $NAME word.
BRACED_VARIABLE = re.compile(r"\$\{(LLM_[A-Z_]+)\}")
LONE_VARIABLE = re.compile(r"\$(LLM_[A-Z_]+)")
TENSOR_PARALLEL_FLAGS = ("--tensor-parallel-size", "-tp")
# Where each engine reads the key it checks from: both engines take it from the environment
# as well as from --api-key, and the environment keeps it off the command line (ps, journal).
API_KEY_VARIABLES = {"vllm": "VLLM_API_KEY", "infinity": "INFINITY_API_KEY", "command": "LLM_API_KEY"}
API_KEY_FLAGS = ("--api-key",)
REDACTED = "********"
PROBE_TEXT = "ping"
# The ready check's request for each endpoint, in the order the probe prefers them: a
# generation when the model has one, else a vector or a score; the tokenizer last, as it
# proves the served name but not the weights. Every registry endpoint has an entry.
PROBE_BODIES: dict[str, dict[str, Any]] = {
    "chat": {"messages": [{"role": "user", "content": PROBE_TEXT}], "max_tokens": 1},
    "completions": {"prompt": PROBE_TEXT, "max_tokens": 1},
    "embeddings": {"input": PROBE_TEXT},
    "rerank": {"query": PROBE_TEXT, "documents": [PROBE_TEXT]},
    "responses": {"input": PROBE_TEXT, "max_output_tokens": 1},
    "score": {"text_1": PROBE_TEXT, "text_2": PROBE_TEXT},
    "tokenize": {"prompt": PROBE_TEXT},
    "detokenize": {"tokens": [0]},
}

SETTINGS_KEYS = ("prefix", "home", "hf_home", "bind_address", "offline", "versions", "images", "pip_packages",
                 "key_dir")


def _need(settings: Mapping[str, Any]) -> None:
    """The settings come from role variables; a missing one is a bug in the role, say which."""
    missing = [key for key in SETTINGS_KEYS if key not in settings]
    if missing:
        raise AnsibleFilterError(f"model_server_plan: settings lack {', '.join(missing)}")


def _truthy(value: Any) -> bool:
    """Role variables may arrive as strings after templating; "false" must stay false."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def unit_base(name: str) -> str:
    """The part of unit and container names that comes from the model name."""
    return UNIT_NAME_UNSAFE.sub("-", name)


def is_local_path(source: str | None) -> bool:
    """Absolute paths are used as they are; anything else is a Hugging Face repo id."""
    return bool(source) and str(source).startswith("/")


def url_host(address: str) -> str:
    """IPv6 literals need brackets in URLs and in docker's published ports."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _has_flag(args: Iterable[str], flags: Iterable[str]) -> bool:
    """True when args already set a flag, as `--flag value` or `--flag=value`."""
    flags = tuple(flags)
    return any(arg in flags or arg.startswith(tuple(f"{flag}=" for flag in flags)) for arg in args)


def engine_argv(model: Mapping[str, Any], host: str) -> list[str]:
    """The engine's arguments after its executable; registry args come last so they can override.

    vLLM answers to every served name (name and aliases). Infinity takes one served name per
    model and loads the model once per --model-id, so it is started with the model's name only.
    """
    engine, args = model["engine"], list(model["args"])
    port = str(model["port"])
    if engine == "vllm":
        argv = ["serve", model["source"], "--served-model-name", *model["served_names"],
                "--host", host, "--port", port]
        # One model over several GPUs is tensor parallelism unless the registry says otherwise.
        if len(model["gpus"]) > 1 and not _has_flag(args, TENSOR_PARALLEL_FLAGS):
            argv += ["--tensor-parallel-size", str(len(model["gpus"]))]
        return argv + args
    if engine == "infinity":
        argv = ["v2", "--model-id", model["source"], "--served-model-name", model["name"],
                "--host", host, "--port", port]
        # Infinity serves /embeddings at the root unless told a prefix; the registry's
        # api_prefix is what the gateway sends, so both must agree.
        if model["api_prefix"]:
            argv += ["--url-prefix", model["api_prefix"]]
        return argv + args
    raise AnsibleFilterError(f"model_server: model '{model['name']}': engine '{engine}' has no argv")


def service_variables(model: Mapping[str, Any], bind_address: str) -> list[list[str]]:
    """What every model's process is told about itself, under both runtimes (LLM_*)."""
    return [
        ["LLM_MODEL_NAME", model["name"]],
        ["LLM_SERVED_NAMES", " ".join(model["served_names"])],
        ["LLM_MODEL_PORT", str(model["port"])],
        ["LLM_BIND_ADDRESS", bind_address],
    ]


def command_argv(model: Mapping[str, Any], bind_address: str) -> list[str]:
    """The registry's command as the argv of a container, expanded the way systemd would.

    Docker runs the words without a shell, so the role does what systemd does in ExecStart:
    `${LLM_X}` becomes one word, a lone `$LLM_X` word splits at whitespace. Other `$` stay as
    they are; registry args are appended, one word each.
    """
    variables = dict(service_variables(model, bind_address))
    try:
        words = shlex.split(model["command"])
    except ValueError as error:
        raise AnsibleFilterError(f"model_server: model '{model['name']}': field 'command': {error}") from error
    argv: list[str] = []
    for word in words:
        whole = LONE_VARIABLE.fullmatch(word)
        if whole and whole.group(1) in variables:
            argv += variables[whole.group(1)].split()
            continue
        argv.append(BRACED_VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), word))
    return argv + [str(arg) for arg in model["args"]]


def probe(model: Mapping[str, Any]) -> dict[str, Any]:
    """The smallest real request the model must answer after a start: one token or one vector.

    /health only says the process is up; a request through the model's own endpoint proves
    that the weights loaded and that the served name the gateway sends is the one it answers to.
    The path is the registry's (the normalised entry's `paths`), the one the gateway proxies to.
    """
    endpoint = next((endpoint for endpoint in PROBE_BODIES if endpoint in model["endpoints"]), None)
    if endpoint is None and any(endpoint.startswith("audio_") for endpoint in model["endpoints"]):
        # An audio-only model takes multipart uploads only: its model list proves the served name.
        return {"path": f"{model['api_prefix']}/models", "method": "GET", "body": None}
    if endpoint is None:
        raise AnsibleFilterError(f"model_server: model '{model['name']}': no ready probe for endpoints "
                                 f"{', '.join(model['endpoints'])}")
    # A copy: plans that shared the nested lists would render as YAML anchors in a dump.
    body = copy.deepcopy(PROBE_BODIES[endpoint])
    return {"path": model["paths"][endpoint], "method": "POST", "body": {"model": model["name"], **body}}


def _environment(model: Mapping[str, Any], settings: Mapping[str, Any], runtime: str) -> list[list[str]]:
    """What the role adds to the environment, then the registry's env (sorted), which wins.

    Engines read weights from HF_HOME, which the role filled before the start, so they run
    with HF_HUB_OFFLINE=1: a restart never depends on the Hub, and no token sits in a unit or
    container. Their usage statistics are switched off. In a container the GPUs are chosen by
    docker, not CUDA_VISIBLE_DEVICES.
    """
    pairs: list[list[str]] = []
    is_engine = model["engine"] in ENGINE_EXECUTABLES
    if is_engine:
        pairs.append(["HF_HOME", str(settings["hf_home"])])
    if is_engine or _truthy(settings["offline"]):
        pairs.append(["HF_HUB_OFFLINE", "1"])
    if is_engine:
        # Both engines phone home with usage statistics unless told not to; a private
        # cluster should not try (and on an air-gapped one each attempt only times out).
        pairs.append(["DO_NOT_TRACK", "1"])
        if model["engine"] == "vllm":
            pairs.append(["VLLM_NO_USAGE_STATS", "1"])
    if runtime == "systemd" and model["gpus"]:
        pairs.append(["CUDA_VISIBLE_DEVICES", ",".join(str(gpu) for gpu in model["gpus"])])
    pairs += [[key, value] for key, value in sorted(model["env"].items())]
    return pairs


def api_key_variable(model: Mapping[str, Any]) -> str | None:
    """The variable a model's server reads its key from, or None when it takes no key.

    A key set any other way would not be the one the gateway sends: the registry's env or
    args must not set it (and --api-key would show the key in ps and the journal).
    """
    if not model.get("api_key", True):
        return None
    variable = API_KEY_VARIABLES[model["engine"]]
    if variable in model["env"]:
        raise AnsibleFilterError(f"model_server: model '{model['name']}': field 'env': {variable} is the key the "
                                 f"gateway sends; give it in llm_model_api_keys (vault), not in the registry")
    if model["engine"] in ENGINE_EXECUTABLES and _has_flag(model["args"], API_KEY_FLAGS):
        raise AnsibleFilterError(f"model_server: model '{model['name']}': field 'args': --api-key would put the "
                                 f"key on the command line; the role passes it in {variable} "
                                 f"(from llm_model_api_keys or generated)")
    return variable


def _plan(model: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the tasks and templates need about one model, computed once."""
    engine, runtime, name = model["engine"], model["runtime"], model["name"]
    base = unit_base(name)
    key_variable = api_key_variable(model)
    version = model["version"] or settings["versions"].get(engine)
    is_engine = engine in ENGINE_EXECUTABLES
    source = model["source"]
    plan: dict[str, Any] = {
        "name": name,
        "engine": engine,
        "runtime": runtime,
        "version": version,
        "served_names": list(model["served_names"]),
        "port": model["port"],
        "url": f"http://{url_host(settings['bind_address'])}:{model['port']}",
        "gpus": list(model["gpus"]),
        "unit": f"{settings['prefix']}{base}.service",
        "container": f"{settings['prefix']}{base}",
        "source": source,
        "local_source": source if is_engine and is_local_path(source) else None,
        "download": bool(is_engine and source and not is_local_path(source) and not _truthy(settings["offline"])),
        "environment": _environment(model, settings, runtime),
        "api_key_env": key_variable,
        # Root-only, read by systemd itself; containers get the variable from docker.
        "env_file": f"{settings['key_dir']}/{base}.env" if key_variable and runtime == "systemd" else None,
        "probe": probe(model),
        "venv": None,
        "pip_spec": None,
        "image": None,
    }
    if engine == "command" and runtime == "systemd":
        # Verbatim, as the command engine has always run: systemd expands ${LLM_*} in it.
        plan["exec_start"] = " ".join([model["command"], *model["args"]])
        return plan
    if runtime == "systemd":
        venv = f"{settings['home']}/venvs/{engine}-{version}"
        plan["venv"] = venv
        plan["pip_spec"] = f"{settings['pip_packages'][engine]}=={version}"
        plan["exec_start"] = systemd_quote(
            [f"{venv}/bin/{ENGINE_EXECUTABLES[engine]}", *engine_argv(model, settings["bind_address"])])
    else:
        plan["image"] = model.get("image") or str(settings["images"][engine]).replace("{version}", str(version))
        if engine == "command":
            words = command_argv(model, CONTAINER_BIND)
            plan["entrypoint"], plan["command"] = words[:1], words[1:]
        else:
            plan["entrypoint"] = [ENGINE_EXECUTABLES[engine]]
            plan["command"] = engine_argv(model, CONTAINER_BIND)
        plan["env"] = dict(service_variables(model, CONTAINER_BIND) + plan["environment"])
        plan["published_ports"] = [f"{url_host(settings['bind_address'])}:{model['port']}:{model['port']}"]
        volumes = [f"{settings['hf_home']}:{settings['hf_home']}"] if is_engine else []
        if plan["local_source"]:
            volumes.append(f"{source}:{source}:ro")
        plan["volumes"] = volumes
        plan["device_requests"] = (
            [{"driver": "nvidia", "device_ids": [str(gpu) for gpu in model["gpus"]], "capabilities": [["gpu"]]}]
            if model["gpus"] else []
        )
    return plan


def model_server_plan(models: Any, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One plan per model of this host (the output of llm_host_models), in registry order."""
    if not isinstance(models, list):
        raise AnsibleFilterError("model_server_plan: expects the list of llm_host_models")
    _need(settings)
    for model in models:
        engine = model.get("engine")
        if engine in ENGINE_EXECUTABLES and engine not in settings["versions"]:
            raise AnsibleFilterError(f"model_server_plan: no default version for engine '{engine}'")
    return [_plan(model, settings) for model in models]


def download_marker(hf_home: str, source: str) -> str:
    """A file written after a complete download: the Hub's own cache has no such mark."""
    return f"{hf_home}/.llm-gateway-downloads/{source.replace('/', '--')}"


def model_server_downloads(plans: list[Mapping[str, Any]], hf_home: str) -> list[dict[str, Any]]:
    """Each repo once, fetched with a model's venv when one runs under systemd, else its image."""
    chosen: dict[str, Mapping[str, Any]] = {}
    for plan in plans:
        if not plan["download"]:
            continue
        current = chosen.get(plan["source"])
        if current is None or (current["runtime"] != "systemd" and plan["runtime"] == "systemd"):
            chosen[plan["source"]] = plan
    return [
        {"source": source, "model": plan["name"], "runtime": plan["runtime"],
         "python": f"{plan['venv']}/bin/python" if plan["venv"] else None, "image": plan["image"],
         "marker": download_marker(hf_home, source)}
        for source, plan in chosen.items()
    ]


def systemd_escape_value(value: Any) -> str:
    """Escape for a double-quoted systemd setting: specifiers (%), backslashes and quotes."""
    return str(value).replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')


def systemd_quote(words: Iterable[Any]) -> str:
    """A command line systemd splits back into exactly these words, with no $VAR or % expansion."""
    quoted = []
    for word in (str(w) for w in words):
        word_escaped = word.replace("$", "$$")
        if word == "" or SYSTEMD_UNSAFE.search(word):
            quoted.append(f'"{systemd_escape_value(word_escaped)}"')
        else:
            quoted.append(word_escaped.replace("%", "%%"))
    return " ".join(quoted)


def redact(text: Any, keys: Any) -> str:
    """A message with every backend key in it replaced, for errors of tasks that saw keys."""
    result = str(text)
    values = keys.values() if isinstance(keys, Mapping) else keys
    for key in sorted((str(k) for k in values if k), key=len, reverse=True):
        result = result.replace(key, REDACTED)
    return result


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        """Map filter names to functions."""
        return {
            "model_server_plan": model_server_plan,
            "model_server_downloads": model_server_downloads,
            "model_server_systemd_quote": systemd_quote,
            "model_server_systemd_env_value": systemd_escape_value,
            "model_server_redact": redact,
        }

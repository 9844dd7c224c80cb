"""Unit tests for the model_server role: its plan filter and the systemd unit it renders.

vLLM cannot run here (no GPU, no weights), so what it would be started with is
asserted instead: the unit's ExecStart and environment, and the container spec.
The command engine's unit is pinned line by line because the lab and the molecule
scenario run the test backend through it.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest
from ansible.errors import AnsibleFilterError

import llm_registry as reg
import model_server as ms

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "model_server"



GROUPS = {"all": ["gpu1", "gpu2"], "llm_gpu_hosts": ["gpu1", "gpu2"]}
BIND = "10.20.0.11"
ROLE_VARS: dict[str, Any] = {
    "ansible_managed": "Ansible managed",
    "model_server_user": "llm",
    "model_server_group": "llm",
    "model_server_home": "/var/lib/llm",
    "model_server_bind_address": BIND,
    "model_server_ready_timeout": 600,
}
LAB_COMMAND = ("/usr/bin/python3 /opt/llm-test-backend/llm_test_backend.py "
               "--host ${LLM_BIND_ADDRESS} --port ${LLM_MODEL_PORT} --model $LLM_SERVED_NAMES")


def settings(**overrides: Any) -> dict[str, Any]:
    """What vars/main.yml hands the plan filter, with the role's defaults."""
    values: dict[str, Any] = {
        "prefix": "llm-model-",
        "home": "/var/lib/llm",
        "hf_home": "/var/lib/llm/huggingface",
        "bind_address": BIND,
        "offline": False,
        "versions": {"vllm": "0.33.0", "infinity": "0.0.78"},
        "images": {"vllm": "vllm/vllm-openai:v{version}", "infinity": "michaelf34/infinity:{version}"},
        "pip_packages": {"vllm": "vllm", "infinity": "infinity-emb[server,torch]"},
        "key_dir": "/etc/llm-models",
    }
    values.update(overrides)
    return values


def plan_of(entry: dict[str, Any], **setting_overrides: Any) -> dict[str, Any]:
    """Validate one registry entry like the model_registry role, then plan it like model_server."""
    entry = {"hosts": ["gpu1"], **entry}
    [model] = reg.llm_registry_normalize([entry], GROUPS)
    [plan] = ms.model_server_plan(reg.llm_host_models([model], "gpu1"), settings(**setting_overrides))
    return plan


def render_unit(plan: dict[str, Any], **var_overrides: Any) -> str:
    """Render templates/model.service.j2 with the options of Ansible's template module."""
    return render("model.service.j2", plan, **var_overrides)


def render(template: str, plan: dict[str, Any], **var_overrides: Any) -> str:
    """Render one of the role's templates with the options of Ansible's template module."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(ROLE / "templates"),
        trim_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(ms.FilterModule().filters())
    return env.get_template(template).render({**ROLE_VARS, **var_overrides, "__plan": plan})


def directives(unit: str, key: str) -> list[str]:
    """Every value of one directive in a unit file, in order."""
    return [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith(f"{key}=")]


def environment(unit: str) -> dict[str, str]:
    """The unit's Environment= settings as systemd reads them (quotes removed)."""
    env = {}
    for value in directives(unit, "Environment"):
        key, _, item = shlex.split(value)[0].partition("=")
        env[key] = item
    return env


def exec_start(unit: str) -> list[str]:
    """ExecStart split into words (shell rules match systemd's for what the role writes)."""
    [line] = directives(unit, "ExecStart")
    return shlex.split(line)


VLLM = {"name": "qwen-chat", "aliases": ["gpt-4o-mini"], "engine": "vllm", "source": "Qwen/Qwen2.5-7B-Instruct",
        "port": 8001, "gpus": [0, 1], "args": ["--max-model-len", 8192, "--gpu-memory-utilization", 0.85],
        "env": {"VLLM_LOGGING_LEVEL": "INFO"}}
INFINITY = {"name": "bge-m3", "aliases": ["text-embedding-3-small"], "engine": "infinity", "source": "BAAI/bge-m3",
            "port": 8002, "gpus": [2]}
COMMAND = {"name": "chat-small", "aliases": ["gpt-4o-mini"], "engine": "command", "command": LAB_COMMAND,
           "endpoints": ["chat", "completions"], "port": 8101}


# --- systemd units ---------------------------------------------------------------------------


def test_vllm_unit_runs_vllm_serve_from_its_venv_on_the_bind_address() -> None:
    unit = render_unit(plan_of(VLLM))
    assert exec_start(unit) == [
        "/var/lib/llm/venvs/vllm-0.33.0/bin/vllm", "serve", "Qwen/Qwen2.5-7B-Instruct",
        "--served-model-name", "qwen-chat", "gpt-4o-mini", "--host", BIND, "--port", "8001",
        "--tensor-parallel-size", "2", "--max-model-len", "8192", "--gpu-memory-utilization", "0.85",
    ]
    assert directives(unit, "User") == ["llm"] and directives(unit, "Group") == ["llm"]
    env = environment(unit)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["HF_HOME"] == "/var/lib/llm/huggingface"
    assert env["HF_HUB_OFFLINE"] == "1", "weights are downloaded before the start; the engine never needs the Hub"
    assert env["VLLM_LOGGING_LEVEL"] == "INFO"
    assert env["LLM_MODEL_NAME"] == "qwen-chat" and env["LLM_SERVED_NAMES"] == "qwen-chat gpt-4o-mini"
    assert env["LLM_MODEL_PORT"] == "8001" and env["LLM_BIND_ADDRESS"] == BIND
    assert "HF_TOKEN" not in env


def test_vllm_tensor_parallel_size_from_args_wins() -> None:
    for args in (["--tensor-parallel-size", 1], ["-tp", 1], ["--tensor-parallel-size=1"]):
        words = exec_start(render_unit(plan_of({**VLLM, "args": args})))
        assert words.count("--tensor-parallel-size") + words.count("-tp") <= 1
        assert "2" not in words[words.index("--port") + 2:], "no derived size when args set one"


def test_vllm_on_one_gpu_has_no_tensor_parallel_flag() -> None:
    words = exec_start(render_unit(plan_of({**VLLM, "gpus": [3], "args": []})))
    assert "--tensor-parallel-size" not in words
    assert environment(render_unit(plan_of({**VLLM, "gpus": [3]})))["CUDA_VISIBLE_DEVICES"] == "3"


def test_infinity_unit_serves_the_model_name_with_the_registry_prefix() -> None:
    unit = render_unit(plan_of({**INFINITY, "version": "0.0.70", "api_prefix": "/v1", "args": ["--batch-size", 32]}))
    assert exec_start(unit) == [
        "/var/lib/llm/venvs/infinity-0.0.70/bin/infinity_emb", "v2", "--model-id", "BAAI/bge-m3",
        "--served-model-name", "bge-m3", "--host", BIND, "--port", "8002", "--url-prefix", "/v1",
        "--batch-size", "32",
    ]
    assert environment(unit)["CUDA_VISIBLE_DEVICES"] == "2"


def test_infinity_default_prefix_is_empty_so_no_url_prefix_flag() -> None:
    words = exec_start(render_unit(plan_of(INFINITY)))
    assert "--url-prefix" not in words
    assert words[words.index("--model-id") + 1] == "BAAI/bge-m3"


def test_engine_units_are_hardened_without_hiding_gpus() -> None:
    unit = render_unit(plan_of(VLLM))
    for setting in ("NoNewPrivileges=true", "ProtectSystem=strict", "ReadWritePaths=/var/lib/llm",
                    "ProtectHome=true", "Restart=on-failure", "CapabilityBoundingSet=", "PrivateTmp=true"):
        assert setting in unit.splitlines(), setting
    for breaks_cuda in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute"):
        assert not directives(unit, breaks_cuda), f"{breaks_cuda} would hide /dev/nvidia* or break JIT"


def test_model_without_gpus_gets_no_cuda_visible_devices() -> None:
    assert "CUDA_VISIBLE_DEVICES" not in environment(render_unit(plan_of({**INFINITY, "gpus": []})))


def test_registry_env_overrides_what_the_role_sets() -> None:
    unit = render_unit(plan_of({**VLLM, "env": {"HF_HUB_OFFLINE": "0"}}))
    values = [v for v in directives(unit, "Environment") if "HF_HUB_OFFLINE" in v]
    assert values == ['"HF_HUB_OFFLINE=1"', '"HF_HUB_OFFLINE=0"'], "the later assignment wins in systemd"


def test_local_path_source_is_used_as_is_and_not_downloaded() -> None:
    plan = plan_of({**VLLM, "source": "/srv/models/qwen"})
    assert exec_start(render_unit(plan))[2] == "/srv/models/qwen"
    assert plan["local_source"] == "/srv/models/qwen" and plan["download"] is False


COMMAND_UNIT = """\
# Ansible managed
# Model chat-small (command engine) from the llm_models registry.
[Unit]
Description=LLM model chat-small
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=llm
Group=llm
WorkingDirectory=/var/lib/llm
Environment=HOME=/var/lib/llm
Environment=LLM_MODEL_NAME=chat-small
Environment="LLM_SERVED_NAMES=chat-small gpt-4o-mini"
Environment=LLM_MODEL_PORT=8101
Environment=LLM_BIND_ADDRESS=10.20.0.11
ExecStart=/usr/bin/python3 /opt/llm-test-backend/llm_test_backend.py \
--host ${LLM_BIND_ADDRESS} --port ${LLM_MODEL_PORT} --model $LLM_SERVED_NAMES
Restart=on-failure
RestartSec=5
# Model loading is slow; systemd must not kill a start that is still loading.
TimeoutStartSec=600
# Hardening that leaves GPU device nodes (/dev/nvidia*) reachable for CUDA.
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=full
ProtectHome=true
ProtectKernelTunables=true
ProtectControlGroups=true
RestrictSUIDSGID=true

[Install]
WantedBy=multi-user.target
"""


def test_command_unit_without_a_key_is_unchanged() -> None:
    """Byte for byte what the role wrote before engines and keys existed: systemd still expands ${LLM_*}."""
    assert render_unit(plan_of({**COMMAND, "api_key": False})) == COMMAND_UNIT


def test_command_unit_with_a_key_only_adds_its_environment_file() -> None:
    keyed = render_unit(plan_of(COMMAND))
    added = [line for line in keyed.splitlines() if line not in COMMAND_UNIT.splitlines()]
    assert added[-1] == "EnvironmentFile=/etc/llm-models/chat-small.env"
    assert all(line.startswith("#") for line in added[:-1]), added
    assert keyed.index("EnvironmentFile=") < keyed.index("ExecStart="), "before ExecStart, beside Environment="


def test_command_unit_appends_args_and_env_verbatim() -> None:
    unit = render_unit(plan_of({**COMMAND, "args": ["--api-prefix", "''"], "env": {"B": "2", "A": "x y"},
                                "gpus": [1]}))
    [line] = directives(unit, "ExecStart")
    assert line == LAB_COMMAND + " --api-prefix ''"
    assert directives(unit, "Environment")[-3:] == ['"CUDA_VISIBLE_DEVICES=1"', '"A=x y"', '"B=2"']


def test_offline_sets_hf_hub_offline_for_command_models_and_stops_downloads() -> None:
    assert environment(render_unit(plan_of(COMMAND, offline=True)))["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in environment(render_unit(plan_of(COMMAND)))
    assert plan_of(VLLM, offline=True)["download"] is False
    assert plan_of(VLLM, offline="false")["download"] is True, "a templated 'false' is false"


def test_unit_and_container_names_replace_unsafe_characters() -> None:
    plan = plan_of({**VLLM, "name": "Qwen/Qwen2.5:7b", "aliases": []})
    assert plan["unit"] == "llm-model-Qwen-Qwen2.5-7b.service"
    assert plan["container"] == "llm-model-Qwen-Qwen2.5-7b"


# --- systemd escaping ------------------------------------------------------------------------


@pytest.mark.parametrize(("words", "expected"), [
    (["vllm", "serve", "org/m"], "vllm serve org/m"),
    (["--chat-template", "{% if x %}"], '--chat-template "{%% if x %%}"'),
    (["--x", "a b", ""], '--x "a b" ""'),
    (["--json", '{"k": "v"}'], '--json "{\\"k\\": \\"v\\"}"'),
    (["$HOME", "50%"], "$$HOME 50%%"),
    (["a;b", ";"], '"a;b" ";"'),
    (["back\\slash"], '"back\\\\slash"'),
])
def test_systemd_quote(words: list[str], expected: str) -> None:
    assert ms.systemd_quote(words) == expected


def test_engine_args_with_spaces_and_specifiers_survive_the_unit() -> None:
    unit = render_unit(plan_of({**VLLM, "args": ["--override-generation-config", '{"temperature": 0.5}']}))
    [line] = directives(unit, "ExecStart")
    assert '"{\\"temperature\\": 0.5}"' in line


# --- docker ----------------------------------------------------------------------------------


def test_vllm_container_spec() -> None:
    plan = plan_of({**VLLM, "runtime": "docker", "version": "0.30.1"})
    assert plan["image"] == "vllm/vllm-openai:v0.30.1"
    assert plan["container"] == "llm-model-qwen-chat"
    assert plan["entrypoint"] == ["vllm"]
    assert plan["command"][:9] == ["serve", "Qwen/Qwen2.5-7B-Instruct", "--served-model-name", "qwen-chat",
                                   "gpt-4o-mini", "--host", "0.0.0.0", "--port", "8001"]
    assert plan["published_ports"] == [f"{BIND}:8001:8001"], "published on the bind address only"
    assert plan["device_requests"] == [{"driver": "nvidia", "device_ids": ["0", "1"], "capabilities": [["gpu"]]}]
    assert plan["volumes"] == ["/var/lib/llm/huggingface:/var/lib/llm/huggingface"]
    assert plan["env"] == {"LLM_MODEL_NAME": "qwen-chat", "LLM_SERVED_NAMES": "qwen-chat gpt-4o-mini",
                           "LLM_MODEL_PORT": "8001", "LLM_BIND_ADDRESS": "0.0.0.0",
                           "HF_HOME": "/var/lib/llm/huggingface", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
                           "VLLM_NO_USAGE_STATS": "1", "VLLM_LOGGING_LEVEL": "INFO"}
    assert "CUDA_VISIBLE_DEVICES" not in plan["env"], "docker picks the GPUs; inside they are renumbered from 0"
    assert plan["venv"] is None


def test_infinity_container_mounts_a_local_source_read_only() -> None:
    plan = plan_of({**INFINITY, "runtime": "docker", "source": "/srv/models/bge-m3", "gpus": []})
    assert plan["image"] == "michaelf34/infinity:0.0.78"
    assert plan["entrypoint"] == ["infinity_emb"]
    assert plan["command"][:3] == ["v2", "--model-id", "/srv/models/bge-m3"]
    assert "/srv/models/bge-m3:/srv/models/bge-m3:ro" in plan["volumes"]
    assert plan["device_requests"] == []


def test_ipv6_bind_address_is_bracketed_in_urls_and_ports() -> None:
    plan = plan_of({**VLLM, "runtime": "docker"}, bind_address="fd00::11")
    assert plan["published_ports"] == ["[fd00::11]:8001:8001"]
    assert plan["url"] == "http://[fd00::11]:8001"


def test_image_setting_is_a_template_of_the_version() -> None:
    plan = plan_of({**VLLM, "runtime": "docker"}, images={"vllm": "registry.lan/vllm:v{version}-cu128",
                                                          "infinity": "x"})
    assert plan["image"] == "registry.lan/vllm:v0.33.0-cu128"


def test_registry_image_overrides_the_engine_image() -> None:
    plan = plan_of({**INFINITY, "runtime": "docker", "image": "registry.lan/infinity:0.0.78-cpu"})
    assert plan["image"] == "registry.lan/infinity:0.0.78-cpu"


def test_command_container_runs_the_command_words_expanded_like_systemd() -> None:
    plan = plan_of({**COMMAND, "runtime": "docker", "image": "llm-lab/test-backend:1", "args": ["--delay", 0.5]})
    assert plan["image"] == "llm-lab/test-backend:1"
    assert plan["entrypoint"] == ["/usr/bin/python3"]
    # ${X} stays one word, a lone $X word splits: chat-small and its alias are two words.
    assert plan["command"] == ["/opt/llm-test-backend/llm_test_backend.py", "--host", "0.0.0.0", "--port", "8101",
                               "--model", "chat-small", "gpt-4o-mini", "--delay", "0.5"]
    assert plan["env"]["LLM_BIND_ADDRESS"] == "0.0.0.0", "the container listens inside; docker publishes"
    assert plan["published_ports"] == [f"{BIND}:8101:8101"]
    assert plan["volumes"] == []
    assert "HF_HOME" not in plan["env"], "a command of the user's own gets no engine environment"


def test_command_container_keeps_other_dollars_and_quotes() -> None:
    command = "/srv/run --name=${LLM_MODEL_NAME}-x --text 'a b' --raw $HOME ${OTHER}"
    plan = plan_of({**COMMAND, "runtime": "docker", "image": "srv:1", "command": command})
    assert plan["command"] == ["--name=chat-small-x", "--text", "a b", "--raw", "$HOME", "${OTHER}"]


def test_command_container_with_unbalanced_quotes_names_the_model() -> None:
    with pytest.raises(AnsibleFilterError, match="model 'chat-small': field 'command'"):
        plan_of({**COMMAND, "runtime": "docker", "image": "srv:1", "command": "/srv/run 'open"})


# --- readiness probe and downloads -----------------------------------------------------------


@pytest.mark.parametrize(("entry", "path", "body_keys"), [
    (VLLM, "/v1/chat/completions", {"model", "messages", "max_tokens"}),
    ({**VLLM, "endpoints": ["completions"]}, "/v1/completions", {"model", "prompt", "max_tokens"}),
    (INFINITY, "/embeddings", {"model", "input"}),
    ({**INFINITY, "endpoints": ["rerank"], "api_prefix": "/v1"}, "/v1/rerank", {"model", "query", "documents"}),
    (COMMAND, "/v1/chat/completions", {"model", "messages", "max_tokens"}),
    ({**COMMAND, "api_prefix": "/api", "endpoints": ["rerank", "embeddings"]}, "/api/embeddings", {"model", "input"}),
    ({**VLLM, "endpoints": ["tokenize", "responses", "score"]}, "/v1/responses",
     {"model", "input", "max_output_tokens"}),
    ({**VLLM, "api_prefix": "/api", "endpoints": ["tokenize", "score"]}, "/api/score", {"model", "text_1", "text_2"}),
    ({**VLLM, "api_prefix": "/api", "endpoints": ["detokenize", "tokenize"]}, "/tokenize", {"model", "prompt"}),
    ({**COMMAND, "api_prefix": "", "endpoints": ["detokenize"]}, "/detokenize", {"model", "tokens"}),
])
def test_probe_uses_the_models_first_endpoint(entry: dict[str, Any], path: str, body_keys: set[str]) -> None:
    probe = plan_of(entry)["probe"]
    assert probe["path"] == path
    assert set(probe["body"]) == body_keys
    assert probe["body"]["model"] == entry["name"]
    assert probe["body"].get("max_tokens", 1) == 1
    assert probe["body"].get("max_output_tokens", 1) == 1


def test_probe_path_is_the_registry_backend_path() -> None:
    """The ready check must hit the path the gateway proxies to, so both read the registry's paths."""
    for entry in (VLLM, INFINITY, COMMAND, {**COMMAND, "api_prefix": "/api"}, {**INFINITY, "api_prefix": "/v1"}):
        [model] = reg.llm_registry_normalize([{"hosts": ["gpu1"], **entry}], GROUPS)
        [plan] = ms.model_server_plan([model], settings())
        endpoint = next(e for e in ("chat", "completions", "embeddings", "rerank") if e in model["endpoints"])
        assert plan["probe"]["path"] == model["paths"][endpoint] == reg.backend_path(endpoint, model["api_prefix"])


def test_every_registry_endpoint_has_a_probe_and_chat_comes_first() -> None:
    assert set(ms.PROBE_BODIES) == set(reg.JSON_ENDPOINTS)
    assert list(ms.PROBE_BODIES)[:4] == ["chat", "completions", "embeddings", "rerank"]


def test_an_audio_only_model_is_probed_by_its_model_list() -> None:
    probe = plan_of({**VLLM, "endpoints": ["audio_transcriptions", "audio_translations"]})["probe"]
    assert probe == {"path": "/v1/models", "method": "GET", "body": None}
    assert plan_of({**VLLM, "endpoints": ["audio_transcriptions", "chat"]})["probe"]["method"] == "POST"


def test_probe_bodies_are_not_shared_between_plans() -> None:
    first, second = plan_of(VLLM), plan_of({**VLLM, "name": "other", "aliases": []})
    first["probe"]["body"]["messages"][0]["content"] = "changed"
    assert second["probe"]["body"]["messages"][0]["content"] == ms.PROBE_TEXT
    assert ms.PROBE_BODIES["chat"]["messages"][0]["content"] == ms.PROBE_TEXT


def test_probe_without_a_known_endpoint_names_the_model() -> None:
    [model] = reg.llm_registry_normalize([{"hosts": ["gpu1"], **VLLM}], GROUPS)
    with pytest.raises(AnsibleFilterError, match="model 'qwen-chat': no ready probe for endpoints images"):
        ms.probe({**model, "endpoints": ["images"], "paths": {}})


def test_probe_is_answered_by_the_test_backend() -> None:
    """The ready check of command models must work against the lab's test backend."""
    sys.path.insert(0, str(REPO / "tests" / "backend"))
    import llm_test_backend as backend  # noqa: PLC0415 - a fixture module outside the package tree

    config = backend.Config(host="127.0.0.1", port=8101, models=["chat-small", "gpt-4o-mini"], api_prefix="/v1",
                            stream_interval=0, keepalive_timeout=5)
    for entry in (COMMAND, {**COMMAND, "endpoints": ["embeddings"], "api_prefix": ""}):
        probe = plan_of(entry)["probe"]
        route = probe["path"].removeprefix(entry.get("api_prefix", "/v1"))
        answer, _ = backend.ROUTES[route]
        result = answer(probe["body"], probe["body"]["model"], config)
        assert result["model"] == "chat-small"


def test_downloads_fetch_each_repo_once_preferring_a_venv() -> None:
    models = reg.llm_registry_normalize([
        {**VLLM, "hosts": ["gpu1"], "runtime": "docker"},
        {**VLLM, "name": "qwen-b", "aliases": [], "hosts": ["gpu1"], "port": 8005, "gpus": [5]},
        {**INFINITY, "hosts": ["gpu1"], "source": "/srv/local"},
        {**INFINITY, "name": "e5", "aliases": [], "hosts": ["gpu1"], "port": 8006, "gpus": [], "runtime": "docker",
         "source": "intfloat/e5-small"},
    ], GROUPS)
    plans = ms.model_server_plan(models, settings())
    downloads = ms.model_server_downloads(plans, "/var/lib/llm/huggingface")
    assert downloads == [
        {"source": "Qwen/Qwen2.5-7B-Instruct", "model": "qwen-b", "runtime": "systemd",
         "python": "/var/lib/llm/venvs/vllm-0.33.0/bin/python", "image": None,
         "marker": "/var/lib/llm/huggingface/.llm-gateway-downloads/Qwen--Qwen2.5-7B-Instruct"},
        {"source": "intfloat/e5-small", "model": "e5", "runtime": "docker", "python": None,
         "image": "michaelf34/infinity:0.0.78",
         "marker": "/var/lib/llm/huggingface/.llm-gateway-downloads/intfloat--e5-small"},
    ]


def test_command_models_download_nothing() -> None:
    plan = plan_of({**COMMAND, "source": "org/model"})
    assert plan["download"] is False and plan["local_source"] is None


def test_plan_refuses_bad_input() -> None:
    with pytest.raises(AnsibleFilterError, match="expects the list of llm_host_models"):
        ms.model_server_plan("x", settings())
    with pytest.raises(AnsibleFilterError, match="settings lack images"):
        ms.model_server_plan([], {k: v for k, v in settings().items() if k != "images"})
    [model] = reg.llm_registry_normalize([{**VLLM, "hosts": ["gpu1"]}], GROUPS)
    with pytest.raises(AnsibleFilterError, match="no default version for engine 'vllm'"):
        ms.model_server_plan([model], settings(versions={"infinity": "1"}))


def test_filter_module_exposes_all_filters() -> None:
    assert set(ms.FilterModule().filters()) == {
        "model_server_plan", "model_server_downloads", "model_server_systemd_quote", "model_server_systemd_env_value",
        "model_server_redact",
    }


# --- API keys --------------------------------------------------------------------------------
# The key reaches the engine from root-only places; the unit, the plan and the command line,
# which the play shows, never hold it.

KEY = "Zq7Rm2Xv9Lk4Tb8Nw1Hc6Jd3Fs5Gp0Ay7Ue2Wi4Oo9Ll6Kk1"


@pytest.mark.parametrize(("entry", "variable"), [
    (VLLM, "VLLM_API_KEY"), (INFINITY, "INFINITY_API_KEY"), (COMMAND, "LLM_API_KEY"),
])
def test_each_engine_reads_its_key_from_its_own_variable(entry: dict[str, Any], variable: str) -> None:
    plan = plan_of(entry)
    assert plan["api_key_env"] == variable
    assert plan["env_file"] == f"/etc/llm-models/{entry['name']}.env"


@pytest.mark.parametrize("entry", [VLLM, INFINITY, COMMAND])
def test_unit_reads_the_key_file_and_never_holds_a_key(entry: dict[str, Any]) -> None:
    plan = plan_of(entry)
    unit = render_unit(plan)
    assert directives(unit, "EnvironmentFile") == [plan["env_file"]], "not '-'-prefixed: no key, no start"
    assert plan["api_key_env"] not in environment(unit)
    assert not any(word.startswith("--api-key") for word in exec_start(unit))


def test_env_file_holds_the_variable_and_the_key_as_systemd_reads_it() -> None:
    plan = plan_of(VLLM)
    text = render("model.env.j2", plan, __model_server_api_key=KEY)
    settings_lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert settings_lines == [f"VLLM_API_KEY={KEY}"]
    assert text.endswith("\n") and "qwen-chat" in text.splitlines()[1]


def test_plans_leave_the_key_variable_to_the_no_log_tasks() -> None:
    """Plans are shown in the play's output: the key's variable is named, never set, in them."""
    for entry in (VLLM, INFINITY, COMMAND):
        for runtime in ("systemd", "docker"):
            extra = {"image": "srv:1"} if entry is COMMAND and runtime == "docker" else {}
            plan = plan_of({**entry, "runtime": runtime, **extra})
            variable = plan["api_key_env"]
            assert variable and variable not in dict(plan["environment"]), plan["name"]
            assert variable not in plan.get("env", {}), plan["name"]


def test_docker_models_get_no_key_file_and_a_variable_to_set() -> None:
    plan = plan_of({**INFINITY, "runtime": "docker"})
    assert plan["env_file"] is None and plan["api_key_env"] == "INFINITY_API_KEY"
    assert "INFINITY_API_KEY" not in plan["env"], "the key is added by the task, with no_log"


def test_model_without_api_key_gets_no_variable_and_no_key_file() -> None:
    plan = plan_of({**COMMAND, "api_key": False})
    assert plan["api_key_env"] is None and plan["env_file"] is None
    assert directives(render_unit(plan), "EnvironmentFile") == []


def test_key_file_name_follows_the_unit_name_and_the_key_dir_setting() -> None:
    plan = plan_of({**VLLM, "name": "Qwen/Qwen2.5:7b"}, key_dir="/srv/keys")
    assert plan["unit"] == "llm-model-Qwen-Qwen2.5-7b.service"
    assert plan["env_file"] == "/srv/keys/Qwen-Qwen2.5-7b.env"


@pytest.mark.parametrize(("entry", "message"), [
    ({**VLLM, "env": {"VLLM_API_KEY": KEY}},
     "model 'qwen-chat': field 'env': VLLM_API_KEY is the key the gateway sends; give it in llm_model_api_keys"),
    ({**COMMAND, "env": {"LLM_API_KEY": KEY}}, "model 'chat-small': field 'env': LLM_API_KEY is the key"),
    ({**INFINITY, "args": ["--api-key", KEY]}, "model 'bge-m3': field 'args': --api-key would put the key on the "
                                               "command line; the role passes it in INFINITY_API_KEY"),
    ({**VLLM, "args": [f"--api-key={KEY}"]}, "model 'qwen-chat': field 'args': --api-key would put the key"),
])
def test_a_key_set_in_the_registry_is_refused_without_showing_it(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=re.escape(message)) as info:
        plan_of(entry)
    assert KEY not in str(info.value)


def test_registry_may_set_the_variable_of_a_model_without_api_key() -> None:
    plan = plan_of({**COMMAND, "api_key": False, "env": {"LLM_API_KEY": "its-own"}})
    assert ["LLM_API_KEY", "its-own"] in plan["environment"]


def test_redact_replaces_every_key_longest_first() -> None:
    keys = {"a": "k" * 20, "b": "k" * 30}
    text = f"env {'k' * 30} and {'k' * 20}; none here"
    assert ms.redact(text, keys) == f"env {ms.REDACTED} and {ms.REDACTED}; none here"
    assert ms.redact("nothing", {}) == "nothing"
    assert ms.redact(None, {"a": "x" * 16}) == "None"

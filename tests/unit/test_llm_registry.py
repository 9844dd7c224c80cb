"""Unit tests for roles/model_registry/filter_plugins/llm_registry.py.

Every validation error is asserted on its message, because the message (model and
field named) is the product: it is what an operator reads when a play fails.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible.errors import AnsibleFilterError

import llm_registry as reg

GROUPS: dict[str, list[str]] = {
    "all": ["gw1", "gpu1", "gpu2", "gpu3"],
    "ungrouped": [],
    "llm_gateways": ["gw1"],
    "llm_gpu_hosts": ["gpu1", "gpu2"],
    "spare": ["gpu3"],
    "empty": [],
}


def chat(**overrides: Any) -> dict[str, Any]:
    """A valid command-engine entry; tests change one field at a time."""
    entry: dict[str, Any] = {
        "name": "chat-small",
        "aliases": ["gpt-4o-mini"],
        "engine": "command",
        "command": "/usr/bin/python3 /opt/b.py",
        "endpoints": ["chat", "completions"],
        "hosts": ["llm_gpu_hosts"],
        "port": 8101,
    }
    entry.update(overrides)
    return entry


def vllm(**overrides: Any) -> dict[str, Any]:
    """A minimal valid vllm entry, relying on every default."""
    entry: dict[str, Any] = {"name": "qwen", "engine": "vllm", "source": "Qwen/Qwen2.5-7B", "hosts": ["gpu1"],
                             "port": 8001}
    entry.update(overrides)
    return entry


def infinity(**overrides: Any) -> dict[str, Any]:
    """A minimal valid infinity entry, relying on every default."""
    entry: dict[str, Any] = {"name": "bge-m3", "engine": "infinity", "source": "/srv/models/bge-m3",
                             "hosts": ["gpu2"], "port": 8002}
    entry.update(overrides)
    return entry


def errors_of(models: Any, groups: dict[str, list[str]] | None = None) -> str:
    """Run normalize expecting failure and return the message."""
    with pytest.raises(AnsibleFilterError) as info:
        reg.llm_registry_normalize(models, GROUPS if groups is None else groups)
    return str(info.value.message)


# --- normalize: the happy path -------------------------------------------------------------


def test_normalize_fills_defaults_for_vllm() -> None:
    [model] = reg.llm_registry_normalize([vllm()], GROUPS)
    assert model == {
        "name": "qwen",
        "aliases": [],
        "engine": "vllm",
        "endpoints": ["chat", "completions"],
        "hosts": ["gpu1"],
        "servers": {"gpu1": {"weight": 1, "backup": False}},
        "port": 8001,
        "api_prefix": "/v1",
        "command": None,
        "source": "Qwen/Qwen2.5-7B",
        "runtime": "systemd",
        "image": None,
        "version": None,
        "args": [],
        "env": {},
        "gpus": [],
        "api_key": True,
        "cache": {"endpoints": [], "valid": None, "shared": False},
        "served_names": ["qwen"],
        "paths": {"chat": "/v1/chat/completions", "completions": "/v1/completions"},
        "upstream": "llm_qwen",
    }


def test_normalize_fills_defaults_for_infinity() -> None:
    [model] = reg.llm_registry_normalize([infinity()], GROUPS)
    assert model["endpoints"] == ["embeddings", "rerank"]
    assert model["api_prefix"] == ""
    assert model["paths"] == {"embeddings": "/embeddings", "rerank": "/rerank"}
    assert model["source"] == "/srv/models/bge-m3"


def test_normalize_command_defaults_to_v1_prefix_and_keeps_explicit_values() -> None:
    [model] = reg.llm_registry_normalize(
        [chat(runtime="docker", image="srv:1", version="0.10", args=["--max-model-len", 4096, 0.9], env={"A": "x", "N": 4},
              gpus=[1, 0], endpoints=["completions", "chat"])],
        GROUPS,
    )
    assert model["api_prefix"] == "/v1"
    assert model["runtime"] == "docker"
    assert model["version"] == "0.10"
    assert model["args"] == ["--max-model-len", "4096", "0.9"]
    assert model["env"] == {"A": "x", "N": "4"}
    assert model["gpus"] == [0, 1]
    assert model["endpoints"] == ["chat", "completions"], "endpoints come back in canonical order"
    assert model["served_names"] == ["chat-small", "gpt-4o-mini"]


def test_normalize_expands_groups_to_sorted_unique_hosts() -> None:
    [model] = reg.llm_registry_normalize([chat(hosts=["gpu2", "llm_gpu_hosts", "spare"])], GROUPS)
    assert model["hosts"] == ["gpu1", "gpu2", "gpu3"]


def test_normalize_accepts_empty_api_prefix_and_empty_registry() -> None:
    [model] = reg.llm_registry_normalize([chat(api_prefix="")], GROUPS)
    assert model["api_prefix"] == ""
    assert reg.llm_registry_normalize([], GROUPS) == []


def test_normalize_does_not_modify_its_input() -> None:
    models = [chat(hosts=["llm_gpu_hosts"])]
    before = copy.deepcopy(models)
    reg.llm_registry_normalize(models, GROUPS)
    assert models == before


def test_normalize_allows_same_port_and_gpu_on_different_hosts() -> None:
    models = [chat(hosts=["gpu1"], gpus=[0]), vllm(name="other", hosts=["gpu2"], port=8101, gpus=[0])]
    assert len(reg.llm_registry_normalize(models, GROUPS)) == 2


def test_upstream_names_are_readable_and_unique() -> None:
    models = [chat(name="chat.small", aliases=[], hosts=["gpu1"], port=9001),
              chat(name="chat-small", aliases=[], hosts=["gpu1"], port=9002),
              chat(name="Org/Model:7B", aliases=[], hosts=["gpu1"], port=9003)]
    upstreams = [m["upstream"] for m in reg.llm_registry_normalize(models, GROUPS)]
    assert len(set(upstreams)) == 3
    assert upstreams[0].startswith("llm_chat_small_") and upstreams[1].startswith("llm_chat_small_")
    assert upstreams[2] == "llm_org_model_7b"
    # Deterministic: the same registry gives the same names on every run.
    assert upstreams == [m["upstream"] for m in reg.llm_registry_normalize(models, GROUPS)]


def test_lab_inventory_registry_is_valid() -> None:
    """The registry the lab ships with must pass its own validation."""
    path = Path(__file__).resolve().parents[2] / "inventories/lab/group_vars/all/llm_models.yml"
    models = yaml.safe_load(path.read_text())["llm_models"]
    lab_groups = {"all": ["gw1", "gpu1", "gpu2"], "llm_gateways": ["gw1"], "llm_gpu_hosts": ["gpu1", "gpu2"]}
    names = [m["name"] for m in reg.llm_registry_normalize(models, lab_groups)]
    assert names == ["chat-small", "chat-large", "all-minilm-l6-v2"]


# --- normalize: every validation error -----------------------------------------------------

BAD_FIELDS = [
    # (entry, expected message fragment)
    (chat(port="abc"), "llm_models: model 'chat-small': field 'port': must be an integer from 1024 to 65535, "
                       "got 'abc'"),
    (chat(port=80), "model 'chat-small': field 'port': must be an integer from 1024 to 65535, got 80"),
    (chat(port=65536), "field 'port': must be an integer from 1024 to 65535, got 65536"),
    (chat(port=True), "field 'port': must be an integer from 1024 to 65535, got boolean true"),
    (chat(engine="vlm"), "model 'chat-small': field 'engine': must be one of vllm, infinity, command, got 'vlm'"),
    (chat(aliases="gpt-4o"), "model 'chat-small': field 'aliases': must be a list of names, got 'gpt-4o'"),
    (chat(aliases=["ok", "bad name"]), "model 'chat-small': field 'aliases': every entry must be a string matching"),
    (chat(endpoints=[]), "model 'chat-small': field 'endpoints': must be a non-empty list"),
    (chat(endpoints=["chat", "images"]), "field 'endpoints': must only contain chat, completions, embeddings, "
                                         "rerank, responses, score, tokenize, detokenize, audio_transcriptions, "
                                         "audio_translations, got 'images'"),
    (infinity(endpoints=["embeddings", "chat"]), "llm_models: model 'bge-m3': field 'endpoints': engine 'infinity' "
                                                 "does not serve 'chat'; it serves embeddings, rerank"),
    (infinity(endpoints=["tokenize", "score"]), "model 'bge-m3': field 'endpoints': engine 'infinity' does not "
                                                "serve 'score', 'tokenize'; it serves embeddings, rerank"),
    (chat(endpoints="chat"), "field 'endpoints': must be a non-empty list"),
    (chat(hosts=[]), "model 'chat-small': field 'hosts': must be a non-empty list of inventory hosts or groups"),
    (chat(hosts="gpu1"), "field 'hosts': must be a non-empty list"),
    (chat(hosts=["gpu9"]), "model 'chat-small': field 'hosts': 'gpu9' is neither a host nor a group in the inventory"),
    (chat(hosts=["empty"]), "model 'chat-small': field 'hosts': group 'empty' has no hosts"),
    (chat(hosts=[1]), "field 'hosts': must contain host or group names or mappings with 'host', got 1"),
    (chat(hosts=[{"host": "gpu1", "weight": 0}]), "model 'chat-small': field 'hosts': host 'gpu1': 'weight' must "
                                                  "be an integer from 1 to 100, got 0"),
    (chat(hosts=[{"host": "gpu1", "weight": "3"}]), "host 'gpu1': 'weight' must be an integer from 1 to 100, got '3'"),
    (chat(hosts=[{"host": "gpu1", "weight": True}]), "'weight' must be an integer from 1 to 100, got boolean true"),
    (chat(hosts=[{"host": "gpu1", "backup": "yes"}]), "host 'gpu1': 'backup' must be true or false, got 'yes'"),
    (chat(hosts=[{"host": "gpu1", "wieght": 2}]), "field 'hosts': the entry of host 'gpu1': unknown key "
                                                  "'wieght' (known: host, weight, backup)"),
    (chat(hosts=[{"weight": 2}]), "field 'hosts': an entry has no 'host' (a host or group name), got null"),
    (chat(hosts=[{"host": "gpu9", "weight": 2}]), "field 'hosts': 'gpu9' is neither a host nor a group"),
    (chat(hosts=[{"host": "gpu1", "backup": True}]), "model 'chat-small': field 'hosts': has only backup hosts; a "
                                                     "backup serves only while every primary host is down"),
    (chat(hosts=[{"host": "llm_gpu_hosts", "weight": 2}, {"host": "gpu1", "backup": True}]),
     "field 'hosts': host 'gpu1' gets a weight or backup from both 'llm_gpu_hosts' and 'gpu1'; give it once"),
    (chat(cache="yes"), "model 'chat-small': field 'cache': must be true, false or a mapping with endpoints, valid, "
                        "shared, got 'yes'"),
    (chat(cache=True), "model 'chat-small': field 'cache': true caches embeddings, rerank, tokenize, detokenize, and "
                       "this model declares none of them; name its endpoints to cache: cache: {endpoints: [...]}"),
    (chat(cache={"endpoints": ["embeddings"]}), "field 'cache': endpoint 'embeddings' is not one of the model's "
                                                "endpoints (chat, completions)"),
    (chat(endpoints=["chat", "responses"], cache={"endpoints": ["responses"]}),
     "field 'cache': endpoint 'responses' cannot be cached (cacheable: embeddings, rerank, tokenize, detokenize, chat, "
     "completions, score)"),
    (chat(cache={"endpoints": []}), "field 'cache': 'endpoints' must be a non-empty list of endpoint names, got an empty list"),
    (chat(cache={"endpoints": ["chat"], "valid": "1 hour"}), "field 'cache': 'valid' must be an nginx time such as "
                                                             "10m, 1h or 7d, got '1 hour'"),
    (chat(cache={"endpoints": ["chat"], "shared": "no"}), "field 'cache': 'shared' must be true or false, got 'no'"),
    (chat(cache={"endpoints": ["chat"], "ttl": "1h"}), "field 'cache': unknown key 'ttl' (known: endpoints, shared, "
                                                       "valid)"),
    (chat(api_prefix="v1"), "model 'chat-small': field 'api_prefix': must be \"\" or a path like \"/v1\""),
    (chat(api_prefix="/v1/"), "field 'api_prefix': must be \"\" or a path like \"/v1\" (no trailing slash), "
                              "got '/v1/'"),
    (chat(api_prefix=None), "field 'api_prefix': must be \"\" or a path like \"/v1\" (no trailing slash), got null"),
    (chat(command=""), "model 'chat-small': field 'command': must be a non-empty string"),
    (chat(command=["python3", "b.py"]), "field 'command': must be a non-empty string (quote numbers), got a list"),
    (chat(source="models/x y"), "model 'chat-small': field 'source': must be a Hugging Face repo id (org/name) or an "
                                "absolute path, got 'models/x y'"),
    (chat(source="./relative"), "field 'source': must be a Hugging Face repo id"),
    (chat(runtime="podman"), "model 'chat-small': field 'runtime': must be one of systemd, docker, got 'podman'"),
    (chat(version=0.1), "model 'chat-small': field 'version': must be a non-empty string (quote numbers), got 0.1"),
    (chat(args="--x"), "model 'chat-small': field 'args': must be a list of strings, got '--x'"),
    (chat(args=["--flag", True]), "field 'args': must contain only strings or numbers, got boolean true"),
    (chat(env=["A=1"]), "model 'chat-small': field 'env': must be a mapping of NAME: value, got a list"),
    (chat(env={"1BAD": "x"}), "model 'chat-small': field 'env': has an invalid variable name '1BAD'"),
    (chat(env={"A": None}), "field 'env': must contain only strings or numbers, got null"),
    (chat(gpus=[0, -1]), "model 'chat-small': field 'gpus': must be a list of non-negative integers"),
    (chat(gpus=0), "field 'gpus': must be a list of non-negative integers, got 0"),
    (chat(gpus=[False]), "field 'gpus': must be a list of non-negative integers"),
    (chat(gpus=[1, 1]), "model 'chat-small': field 'gpus': must not repeat a GPU id, got [1, 1]"),
    (chat(prot=8101), "model 'chat-small': field 'prot': unknown field (did you mean 'port'?)"),
    (chat(zzzz=1), "model 'chat-small': field 'zzzz': unknown field (known fields: aliases, api_key, api_prefix"),
    (chat(api_kye=False), "model 'chat-small': field 'api_kye': unknown field (did you mean 'api_key'?)"),
    (chat(api_key="false"), "model 'chat-small': field 'api_key': must be true or false, got 'false'"),
    (chat(api_key=0), "model 'chat-small': field 'api_key': must be true or false, got 0"),
    (vllm(command="x"), "model 'qwen': field 'command': is only valid with engine 'command', not 'vllm'"),
    (vllm(source=None), "model 'qwen': field 'source': must be a Hugging Face repo id"),
    ({k: v for k, v in vllm().items() if k != "source"},
     "model 'qwen': field 'source': is required for engine 'vllm'"),
    ({k: v for k, v in infinity().items() if k != "source"},
     "model 'bge-m3': field 'source': is required for engine 'infinity'"),
    ({k: v for k, v in chat().items() if k != "command"},
     "model 'chat-small': field 'command': is required for engine 'command'"),
    ({k: v for k, v in chat().items() if k != "endpoints"},
     "model 'chat-small': field 'endpoints': is required for engine 'command'"),
    (chat(runtime="docker"),
     "model 'chat-small': field 'image': is required for engine 'command' with runtime 'docker'"),
    (vllm(image="vllm/vllm-openai:v0.33.0"), "model 'qwen': field 'image': is only valid with runtime 'docker'"),
    (vllm(runtime="docker", image="Vllm/Upper:1"), "model 'qwen': field 'image': must be a docker image reference"),
    (vllm(runtime="docker", image="a b:1"), "model 'qwen': field 'image': must be a docker image reference"),
    (vllm(runtime="docker", image=1), "model 'qwen': field 'image': must be a non-empty string"),
]


@pytest.mark.parametrize(("entry", "expected"), BAD_FIELDS, ids=[e for _, e in BAD_FIELDS])
def test_bad_field_is_reported_with_model_and_field(entry: dict[str, Any], expected: str) -> None:
    assert expected in errors_of([entry])


@pytest.mark.parametrize("image", ["srv:1", "registry.lan:5000/team/vllm-openai:v0.33.0-cu128",
                                   "llm-lab/test-backend@sha256:" + "a" * 64, "michaelf34/infinity"])
def test_image_references_accepted(image: str) -> None:
    [model] = reg.llm_registry_normalize([chat(runtime="docker", image=image)], GROUPS)
    assert model["image"] == image


@pytest.mark.parametrize("field", ["name", "engine", "hosts", "port"])
def test_missing_required_field(field: str) -> None:
    entry = {k: v for k, v in vllm().items() if k != field}
    label = "llm_models[0]" if field == "name" else "llm_models: model 'qwen'"
    assert f"{label}: field '{field}': is required" in errors_of([entry])


@pytest.mark.parametrize("name", ["-leading-dash", "has space", "", 42, None, "ü"])
def test_invalid_name_is_reported_by_index(name: Any) -> None:
    message = errors_of([vllm(), vllm(name=name, port=8002)])
    assert "llm_models[1]: field 'name': must be a string matching" in message


def test_entry_that_is_not_a_mapping_is_reported_by_index() -> None:
    message = errors_of([vllm(), "qwen"])
    assert "llm_models[1]: must be a mapping with at least name, engine, hosts and port, got 'qwen'" in message


def test_registry_that_is_not_a_list() -> None:
    assert errors_of({"name": "x"}) == "llm_models: must be a list of models, got a mapping"


def test_groups_must_be_a_mapping() -> None:
    with pytest.raises(AnsibleFilterError, match="second argument must be the 'groups' variable"):
        reg.llm_registry_normalize([], ["gpu1"])  # type: ignore[arg-type]


def test_duplicate_name_across_models() -> None:
    message = errors_of([chat(aliases=[]), chat(aliases=[], hosts=["spare"])])
    assert "llm_models: model 'chat-small': field 'name': 'chat-small' is already used by this model" not in message
    assert ("model 'chat-small': field 'name': 'chat-small' is already used by model 'chat-small' "
            "(llm_models[0])") in message


def test_alias_that_shadows_another_models_name() -> None:
    message = errors_of([chat(), vllm(aliases=["chat-small"])])
    expected = "model 'qwen': field 'aliases': 'chat-small' is already used by model 'chat-small' (llm_models[0])"
    assert expected in message


def test_alias_used_by_two_models() -> None:
    message = errors_of([chat(), vllm(aliases=["gpt-4o-mini"])])
    assert "model 'qwen': field 'aliases': 'gpt-4o-mini' is already used by model 'chat-small'" in message


def test_alias_repeating_the_models_own_name() -> None:
    message = errors_of([vllm(aliases=["qwen"])])
    assert "model 'qwen': field 'aliases': 'qwen' is already used by this model" in message


def test_names_of_two_models_that_differ_only_in_case() -> None:
    message = errors_of([vllm(name="a", aliases=["Qwen-Chat"]), chat(name="b", aliases=["qwen-chat"])])
    assert message == ("llm_models: model 'b': field 'aliases': 'qwen-chat' differs only in case from 'Qwen-Chat' "
                       "of model 'a' (llm_models[0]); the gateway's name lookup does not tell them apart: rename one")


def test_a_name_that_differs_only_in_case_from_another_models_name() -> None:
    message = errors_of([vllm(name="Qwen"), chat(name="QWEN", aliases=[])])
    assert ("llm_models: model 'QWEN': field 'name': 'QWEN' differs only in case from 'Qwen' of model 'Qwen' "
            "(llm_models[0])") in message


def test_an_alias_that_differs_only_in_case_from_its_own_models_name() -> None:
    message = errors_of([vllm(aliases=["QWEN"])])
    assert message.startswith("llm_models: model 'qwen': field 'aliases': 'QWEN' differs only in case from 'qwen' "
                              "of this model;")


def test_an_exact_duplicate_keeps_its_own_message_not_the_case_one() -> None:
    message = errors_of([chat(), vllm(aliases=["Chat-Small", "chat-small"])])
    assert "model 'qwen': field 'aliases': 'chat-small' is already used by model 'chat-small'" in message
    assert "'Chat-Small' differs only in case from 'chat-small' of model 'chat-small' (llm_models[0])" in message
    assert message.count("differs only in case") == 1
    assert message.startswith("llm_models: 2 errors:\n")


def test_two_models_on_one_host_must_not_share_a_port() -> None:
    message = errors_of([chat(), vllm(port=8101)])
    assert ("llm_models: model 'qwen': field 'port': port 8101 on host 'gpu1' is already used by model "
            "'chat-small'") in message
    assert "host 'gpu2'" not in message, "qwen runs only on gpu1"


def test_two_models_on_one_host_must_not_share_a_gpu() -> None:
    message = errors_of([chat(gpus=[0, 1]), vllm(gpus=[1])])
    expected = "llm_models: model 'qwen': field 'gpus': GPU 1 on host 'gpu1' is already used by model 'chat-small'"
    assert expected in message


def test_duplicate_name_is_found_even_when_the_entry_has_other_errors() -> None:
    message = errors_of([chat(port="abc"), chat(aliases=[])])
    assert "field 'port': must be an integer" in message
    assert "field 'name': 'chat-small' is already used by model 'chat-small' (llm_models[0])" in message


def test_all_errors_are_reported_at_once() -> None:
    message = errors_of([chat(port="abc", engine="nope"), {"engine": "vllm"}, 5])
    assert message.startswith("llm_models: 7 errors:\n")
    for fragment in ("model 'chat-small': field 'port'", "model 'chat-small': field 'engine'",
                     "llm_models[1]: field 'name': is required", "llm_models[1]: field 'hosts': is required",
                     "llm_models[1]: field 'port': is required", "llm_models[1]: field 'source': is required",
                     "llm_models[2]: must be a mapping"):
        assert fragment in message


def test_a_single_error_is_one_line() -> None:
    assert errors_of([chat(port="abc")]) == (
        "llm_models: model 'chat-small': field 'port': must be an integer from 1024 to 65535, got 'abc'"
    )


# --- llm_host_models -----------------------------------------------------------------------


@pytest.fixture(name="registry")
def fixture_registry() -> list[dict[str, Any]]:
    """A normalised registry across two hosts, shared by the derived-filter tests."""
    return reg.llm_registry_normalize([chat(), vllm(port=8001, gpus=[0]), infinity()], GROUPS)


def test_host_models_selects_models_of_that_host(registry: list[dict[str, Any]]) -> None:
    assert [m["name"] for m in reg.llm_host_models(registry, "gpu1")] == ["chat-small", "qwen"]
    assert [m["name"] for m in reg.llm_host_models(registry, "gpu2")] == ["chat-small", "bge-m3"]
    assert reg.llm_host_models(registry, "gw1") == []


def test_derived_filters_refuse_raw_llm_models() -> None:
    for call in (lambda: reg.llm_host_models([chat()], "gpu1"),
                 lambda: reg.llm_gateway_upstreams([chat()], {}),
                 lambda: reg.llm_gateway_routes([chat()]),
                 lambda: reg.llm_gateway_routes("nope")):
        with pytest.raises(AnsibleFilterError, match="expects the output of llm_registry_normalize"):
            call()


# --- llm_gateway_upstreams -----------------------------------------------------------------


def facts(address: str) -> dict[str, Any]:
    """hostvars of a host whose facts were gathered."""
    return {"ansible_facts": {"default_ipv4": {"address": address}}}


HOSTVARS: dict[str, dict[str, Any]] = {
    "gw1": facts("10.0.0.1"),
    "gpu1": {"llm_private_address": "192.168.9.1", **facts("10.0.0.11")},
    "gpu2": facts("10.0.0.12"),
}


def test_upstreams_use_private_address_then_facts(registry: list[dict[str, Any]]) -> None:
    assert reg.llm_gateway_upstreams(registry, HOSTVARS) == [
        {"name": "llm_bge_m3", "model": "bge-m3", "servers": ["10.0.0.12:8002"],
         "peers": [peer("10.0.0.12:8002")]},
        {"name": "llm_chat_small", "model": "chat-small", "servers": ["192.168.9.1:8101", "10.0.0.12:8101"],
         "peers": [peer("192.168.9.1:8101"), peer("10.0.0.12:8101")]},
        {"name": "llm_qwen", "model": "qwen", "servers": ["192.168.9.1:8001"], "peers": [peer("192.168.9.1:8001")]},
    ]


def peer(address: str, weight: int = 1, backup: bool = False) -> dict[str, Any]:
    return {"address": address, "weight": weight, "backup": backup}


def test_weights_and_backups_per_model_reach_the_upstream_peers() -> None:
    registry = reg.llm_registry_normalize([
        chat(hosts=[{"host": "gpu1", "weight": 3}, "gpu2"]),
        vllm(hosts=["gpu2", {"host": "gpu1", "backup": True}]),
    ], GROUPS)
    upstreams = {u["model"]: u for u in reg.llm_gateway_upstreams(registry, HOSTVARS)}
    assert upstreams["chat-small"]["peers"] == [peer("192.168.9.1:8101", weight=3), peer("10.0.0.12:8101")]
    # The same host, another model: its own options.
    assert upstreams["qwen"]["peers"] == [peer("192.168.9.1:8001", backup=True), peer("10.0.0.12:8001")]
    assert registry[0]["hosts"] == ["gpu1", "gpu2"]


def test_a_group_entry_gives_its_options_to_every_member() -> None:
    [model] = reg.llm_registry_normalize([chat(hosts=[{"host": "llm_gpu_hosts", "weight": 2},
                                                      {"host": "spare", "backup": True}])], GROUPS)
    assert model["servers"] == {"gpu1": {"weight": 2, "backup": False}, "gpu2": {"weight": 2, "backup": False},
                                "gpu3": {"weight": 1, "backup": True}}


def test_upstreams_bracket_ipv6(registry: list[dict[str, Any]]) -> None:
    hostvars = {**HOSTVARS, "gpu1": {"llm_private_address": "fd00::1"}}
    [qwen] = [u for u in reg.llm_gateway_upstreams(registry, hostvars) if u["model"] == "qwen"]
    assert qwen["servers"] == ["[fd00::1]:8001"]


@pytest.mark.parametrize("gpu2_vars", [{}, {"ansible_facts": {}}, {"ansible_facts": {"default_ipv4": {}}},
                                       {"llm_private_address": ""}])
def test_upstreams_without_address_name_host_and_model(registry: list[dict[str, Any]],
                                                       gpu2_vars: dict[str, Any]) -> None:
    with pytest.raises(AnsibleFilterError) as info:
        reg.llm_gateway_upstreams(registry, {**HOSTVARS, "gpu2": gpu2_vars})
    message = str(info.value.message)
    assert "llm_models: model 'chat-small': host 'gpu2': has no address" in message
    assert "gather its facts" in message and "llm_private_address" in message


def test_upstreams_host_missing_from_hostvars(registry: list[dict[str, Any]]) -> None:
    with pytest.raises(AnsibleFilterError, match="model 'chat-small': host 'gpu2': not found in hostvars"):
        reg.llm_gateway_upstreams(registry, {"gpu1": HOSTVARS["gpu1"]})


def test_upstreams_private_address_must_be_a_string(registry: list[dict[str, Any]]) -> None:
    with pytest.raises(AnsibleFilterError, match="host 'gpu1': llm_private_address must be a string, got 42"):
        reg.llm_gateway_upstreams(registry, {**HOSTVARS, "gpu1": {"llm_private_address": 42}})


# --- llm_gateway_routes --------------------------------------------------------------------


def test_routes_map_every_name_and_alias(registry: list[dict[str, Any]]) -> None:
    routes = reg.llm_gateway_routes(registry)
    assert set(routes) == {"chat-small", "gpt-4o-mini", "qwen", "bge-m3"}
    chat_route = {"id": "chat-small", "upstream": "llm_chat_small", "endpoints": ["chat", "completions"],
                  "paths": {"chat": "/v1/chat/completions", "completions": "/v1/completions"},
                  "engine": "command", "aliases": ["gpt-4o-mini"]}
    assert routes["chat-small"] == chat_route
    assert routes["gpt-4o-mini"] == chat_route
    assert routes["bge-m3"] == {"id": "bge-m3", "upstream": "llm_bge_m3", "endpoints": ["embeddings", "rerank"],
                                "paths": {"embeddings": "/embeddings", "rerank": "/rerank"},
                                "engine": "infinity", "aliases": []}


def test_routes_paths_follow_each_models_prefix_and_keep_root_paths() -> None:
    models = [vllm(endpoints=["detokenize", "chat", "tokenize", "score"]),
              chat(name="api", aliases=[], api_prefix="/api", endpoints=["tokenize", "responses"], port=8102)]
    routes = reg.llm_gateway_routes(reg.llm_registry_normalize(models, GROUPS))
    assert routes["qwen"]["endpoints"] == ["chat", "score", "tokenize", "detokenize"]
    assert routes["qwen"]["paths"] == {"chat": "/v1/chat/completions", "score": "/v1/score",
                                       "tokenize": "/tokenize", "detokenize": "/detokenize"}
    assert routes["api"]["paths"] == {"responses": "/api/responses", "tokenize": "/tokenize"}
    assert "prefix" not in routes["qwen"], "the gateway reads paths, not the prefix"


def test_routes_do_not_share_objects_between_names(registry: list[dict[str, Any]]) -> None:
    routes = reg.llm_gateway_routes(registry)
    routes["chat-small"]["paths"]["chat"] = "/changed"
    assert routes["gpt-4o-mini"]["paths"]["chat"] == "/v1/chat/completions"
    assert registry[0]["paths"]["chat"] == "/v1/chat/completions"


def test_routes_refuse_a_name_served_twice(registry: list[dict[str, Any]]) -> None:
    tampered = copy.deepcopy(registry)
    tampered[1]["served_names"].append("gpt-4o-mini")
    with pytest.raises(AnsibleFilterError, match="name 'gpt-4o-mini' is served by two models"):
        reg.llm_gateway_routes(tampered)


# --- the API table: llm_api_endpoints and backend_path --------------------------------------


API_TABLE = [
    {"name": "chat", "path": "/v1/chat/completions", "body": "json"},
    {"name": "completions", "path": "/v1/completions", "body": "json"},
    {"name": "embeddings", "path": "/v1/embeddings", "body": "json"},
    {"name": "rerank", "path": "/v1/rerank", "body": "json"},
    {"name": "responses", "path": "/v1/responses", "body": "json"},
    {"name": "score", "path": "/v1/score", "body": "json"},
    {"name": "tokenize", "path": "/tokenize", "body": "json"},
    {"name": "detokenize", "path": "/detokenize", "body": "json"},
    {"name": "audio_transcriptions", "path": "/v1/audio/transcriptions", "body": "multipart"},
    {"name": "audio_translations", "path": "/v1/audio/translations", "body": "multipart"},
]


@pytest.mark.parametrize("ignored", [None, [], "anything", {"a": 1}])
def test_api_endpoints_are_the_table_in_order_whatever_the_input(ignored: Any) -> None:
    assert reg.llm_api_endpoints(ignored) == API_TABLE
    assert reg.llm_api_endpoints() == API_TABLE


def test_api_endpoints_returns_fresh_objects() -> None:
    reg.llm_api_endpoints()[0]["path"] = "/changed"
    assert reg.llm_api_endpoints()[0]["path"] == "/v1/chat/completions"


def test_endpoint_names_come_from_the_table() -> None:
    assert list(reg.ENDPOINTS) == [row["name"] for row in API_TABLE]


@pytest.mark.parametrize(("api_prefix", "expected"), [
    ("/v1", {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings",
             "rerank": "/v1/rerank", "responses": "/v1/responses", "score": "/v1/score"}),
    ("", {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings",
          "rerank": "/rerank", "responses": "/responses", "score": "/score"}),
    ("/api", {"chat": "/api/chat/completions", "completions": "/api/completions", "embeddings": "/api/embeddings",
              "rerank": "/api/rerank", "responses": "/api/responses", "score": "/api/score"}),
])
def test_backend_path_replaces_v1_with_the_prefix_and_keeps_root_paths(api_prefix: str,
                                                                       expected: dict[str, str]) -> None:
    expected = {**expected, "tokenize": "/tokenize", "detokenize": "/detokenize",
                "audio_transcriptions": api_prefix + "/audio/transcriptions",
                "audio_translations": api_prefix + "/audio/translations"}
    assert {endpoint: reg.backend_path(endpoint, api_prefix) for endpoint in reg.ENDPOINTS} == expected


@pytest.mark.parametrize(("entry", "api_prefix", "paths"), [
    (vllm(endpoints=list(reg.ENDPOINTS)), "/v1",
     {"chat": "/v1/chat/completions", "completions": "/v1/completions", "embeddings": "/v1/embeddings",
      "rerank": "/v1/rerank", "responses": "/v1/responses", "score": "/v1/score", "tokenize": "/tokenize",
      "detokenize": "/detokenize", "audio_transcriptions": "/v1/audio/transcriptions",
      "audio_translations": "/v1/audio/translations"}),
    (vllm(api_prefix="", endpoints=["responses", "tokenize"]), "",
     {"responses": "/responses", "tokenize": "/tokenize"}),
    (infinity(), "", {"embeddings": "/embeddings", "rerank": "/rerank"}),
    (infinity(api_prefix="/v1"), "/v1", {"embeddings": "/v1/embeddings", "rerank": "/v1/rerank"}),
    (infinity(api_prefix="/api", endpoints=["rerank"]), "/api", {"rerank": "/api/rerank"}),
    (chat(), "/v1", {"chat": "/v1/chat/completions", "completions": "/v1/completions"}),
    (chat(api_prefix="", endpoints=["embeddings", "detokenize"]), "",
     {"embeddings": "/embeddings", "detokenize": "/detokenize"}),
    (chat(api_prefix="/api", endpoints=["score", "chat"]), "/api", {"chat": "/api/chat/completions",
                                                                    "score": "/api/score"}),
])
def test_normalised_entry_has_the_backend_path_of_each_endpoint(entry: dict[str, Any], api_prefix: str,
                                                                paths: dict[str, str]) -> None:
    [model] = reg.llm_registry_normalize([entry], GROUPS)
    assert model["api_prefix"] == api_prefix
    assert model["paths"] == paths
    assert list(model["paths"]) == model["endpoints"], "paths in the table's order"


def test_vllm_and_command_may_declare_every_endpoint() -> None:
    everything = list(reversed(reg.ENDPOINTS))
    models = reg.llm_registry_normalize([vllm(endpoints=everything), chat(endpoints=everything)], GROUPS)
    assert [m["endpoints"] for m in models] == [list(reg.ENDPOINTS)] * 2


def test_backend_path_refuses_an_unknown_endpoint() -> None:
    with pytest.raises(ValueError, match="unknown endpoint 'images'"):
        reg.backend_path("images", "/v1")


def test_paths_is_not_a_registry_field() -> None:
    assert "field 'paths': unknown field" in errors_of([vllm(paths={"chat": "/x"})])


def test_filter_module_exposes_all_filters() -> None:
    assert set(reg.FilterModule().filters()) == {
        "llm_registry_normalize", "llm_host_models", "llm_gateway_upstreams", "llm_gateway_routes",
        "llm_api_endpoints", "llm_gateway_cached_routes", "llm_backend_key_files", "llm_backend_api_keys",
        "llm_backend_key_errors",
        "llm_services_normalize", "llm_gateway_services", "llm_service_host_ports", "llm_service_router_data",
        "llm_service_header_var", "llm_host_servers", "llm_agent_servers",
        "llm_private_addresses",
    }


def test_host_servers_give_each_model_s_address_as_the_gateways_name_it() -> None:
    models = reg.llm_registry_normalize([
        {"name": "chat", "engine": "command", "command": "x", "endpoints": ["chat"], "hosts": ["gpu1", "gpu2"],
         "port": 8001},
        {"name": "embed", "engine": "command", "command": "x", "endpoints": ["embeddings"], "hosts": ["gpu2"],
         "port": 8002}], {"all": ["gpu1", "gpu2"]})
    hostvars = {"gpu1": {"llm_private_address": "10.0.0.1"}, "gpu2": {"llm_private_address": "fd00::2"}}
    assert reg.llm_host_servers(models, hostvars, "gpu2") == [
        {"model": "chat", "upstream": "llm_chat", "peers": 2, "address": "[fd00::2]:8001",
         "key": "chat [fd00::2]:8001"},
        {"model": "embed", "upstream": "llm_embed", "peers": 1, "address": "[fd00::2]:8002",
         "key": "embed [fd00::2]:8002"}]
    routed = reg.llm_agent_servers({"upstreams": [
        {"model": "chat", "peers": [{"address": "10.0.0.1:8001"}, {"address": "[fd00::2]:8001"}]}]})
    assert routed == ["chat 10.0.0.1:8001", "chat [fd00::2]:8001"]
    with pytest.raises(reg.AnsibleFilterError, match="health agent's configuration"):
        reg.llm_agent_servers({"models": []})


# --- backend API keys -------------------------------------------------------------------------
# Keys here are made up; the messages must name the model (and file) but never hold a key.

KEY = "k" * 20 + "Ab3-._~+/=="
CREDENTIALS = "/inv/credentials"


@pytest.fixture(name="keyed")
def fixture_keyed() -> list[dict[str, Any]]:
    """Three models: two that check a key (one with a '/' in its name), one command that cannot."""
    return reg.llm_registry_normalize([
        vllm(name="Qwen/Qwen2.5:7b", aliases=["qwen-chat"]),
        infinity(),
        chat(api_key=False),
    ], GROUPS)


def test_api_key_defaults_to_true_and_false_is_kept() -> None:
    models = reg.llm_registry_normalize([vllm(), infinity(api_key=True), chat(api_key=False)], GROUPS)
    assert [m["api_key"] for m in models] == [True, True, False]


def test_key_files_only_for_models_that_check_a_key_and_have_none_given(keyed: list[dict[str, Any]]) -> None:
    assert reg.llm_backend_key_files(keyed, {}, CREDENTIALS) == [
        "/inv/credentials/backend-keys/Qwen%2FQwen2.5%3A7b", "/inv/credentials/backend-keys/bge-m3"]
    assert reg.llm_backend_key_files(keyed, {"bge-m3": KEY}, CREDENTIALS + "/") == [
        "/inv/credentials/backend-keys/Qwen%2FQwen2.5%3A7b"]


@pytest.mark.parametrize("name", ["a/../../etc/passwd", "x/y", "m:1"])
def test_key_file_names_stay_inside_the_directory(name: str) -> None:
    path = reg.backend_key_file(CREDENTIALS, name)
    assert path.startswith("/inv/credentials/backend-keys/")
    assert "/" not in path[len("/inv/credentials/backend-keys/"):]


def test_key_files_of_names_that_differ_only_in_a_slash_do_not_collide() -> None:
    assert reg.backend_key_file(CREDENTIALS, "a/b") != reg.backend_key_file(CREDENTIALS, "a-b")


def test_api_keys_take_the_given_key_else_the_generated_one_in_file_order(keyed: list[dict[str, Any]]) -> None:
    assert reg.llm_backend_api_keys(keyed, {"bge-m3": KEY}, ["g" * 48]) == {
        "Qwen/Qwen2.5:7b": "g" * 48, "bge-m3": KEY}
    assert reg.llm_backend_api_keys(keyed, {}, ["a" * 48, "b" * 48]) == {
        "Qwen/Qwen2.5:7b": "a" * 48, "bge-m3": "b" * 48}


def test_api_keys_leave_out_models_without_api_key(keyed: list[dict[str, Any]]) -> None:
    assert "chat-small" not in reg.llm_backend_api_keys(keyed, {}, ["a" * 48, "b" * 48])


def test_api_keys_refuse_a_generated_list_of_the_wrong_length_without_showing_it(
        keyed: list[dict[str, Any]]) -> None:
    with pytest.raises(AnsibleFilterError, match="expected 2 generated keys") as info:
        reg.llm_backend_api_keys(keyed, {}, ["secret-" * 4])
    assert "secret" not in str(info.value)


def test_key_filters_refuse_raw_llm_models() -> None:
    for call in (lambda: reg.llm_backend_key_files([vllm()], {}, CREDENTIALS),
                 lambda: reg.llm_backend_api_keys([vllm()], {}, []),
                 lambda: reg.llm_backend_key_errors({}, [vllm()], {}, CREDENTIALS)):
        with pytest.raises(AnsibleFilterError, match="expects the output of llm_registry_normalize"):
            call()


def key_errors(keyed: list[dict[str, Any]], given: Any, stored: dict[str, Any] | None = None) -> list[str]:
    """Errors as the role computes them: given keys merged with (valid unless told) stored ones."""
    generated = {"Qwen/Qwen2.5:7b": "q" * 48, "bge-m3": "b" * 48, **(stored or {})}
    keys = {**generated, **(given if isinstance(given, dict) else {})}
    return reg.llm_backend_key_errors(given, keyed, keys, CREDENTIALS)


def test_valid_given_and_stored_keys_have_no_errors(keyed: list[dict[str, Any]]) -> None:
    assert key_errors(keyed, {}) == []
    assert key_errors(keyed, {"bge-m3": KEY, "Qwen/Qwen2.5:7b": "A" * 16}) == []


BAD_KEYS = [
    (12345678901234567890, "llm_model_api_keys: model 'bge-m3': must be a string, got int"),
    (None, "llm_model_api_keys: model 'bge-m3': must be a string, got null"),
    ("short-key", "llm_model_api_keys: model 'bge-m3': must be at least 16 characters long, got 9"),
    ("has spaces in the key", "llm_model_api_keys: model 'bge-m3': holds 4 characters not valid in a Bearer token"),
    ('quote"inthe-middle', "llm_model_api_keys: model 'bge-m3': holds 1 character not valid in a Bearer token"),
    ("padding=inthemiddle", "llm_model_api_keys: model 'bge-m3': holds a '=' before the end not valid"),
]


@pytest.mark.parametrize(("value", "expected"), BAD_KEYS, ids=[e for _, e in BAD_KEYS])
def test_invalid_given_key_names_the_model_and_not_the_key(keyed: list[dict[str, Any]], value: Any,
                                                           expected: str) -> None:
    [error] = key_errors(keyed, {"bge-m3": value})
    assert error.startswith(expected), error
    if isinstance(value, str):
        assert value not in error


def test_key_for_an_unknown_model_suggests_the_near_miss(keyed: list[dict[str, Any]]) -> None:
    assert key_errors(keyed, {"bge-m4": KEY}) == [
        "llm_model_api_keys: model 'bge-m4': no such model in llm_models (did you mean 'bge-m3'?)"]


def test_key_for_an_unknown_model_lists_the_models_when_nothing_is_close(keyed: list[dict[str, Any]]) -> None:
    assert key_errors(keyed, {"zzz": KEY}) == [
        "llm_model_api_keys: model 'zzz': no such model in llm_models "
        "(models: Qwen/Qwen2.5:7b, bge-m3, chat-small)"]


def test_key_given_under_an_alias_points_to_the_model_name(keyed: list[dict[str, Any]]) -> None:
    assert key_errors(keyed, {"qwen-chat": KEY}) == [
        "llm_model_api_keys: model 'qwen-chat': 'qwen-chat' is an alias of model 'Qwen/Qwen2.5:7b'; "
        "give the key under the model's name"]


def test_key_for_a_model_without_api_key_is_refused(keyed: list[dict[str, Any]]) -> None:
    [error] = key_errors(keyed, {"chat-small": KEY})
    assert error.startswith("llm_model_api_keys: model 'chat-small': its llm_models entry sets api_key: false")


def test_every_key_error_is_reported_at_once(keyed: list[dict[str, Any]]) -> None:
    errors = key_errors(keyed, {"bge-m4": KEY, "Qwen/Qwen2.5:7b": "x", "chat-small": KEY})
    assert [e.split(":")[1].strip() for e in errors] == ["model 'Qwen/Qwen2.5", "model 'bge-m4'", "model 'chat-small'"]


def test_given_keys_that_are_not_a_mapping(keyed: list[dict[str, Any]]) -> None:
    assert key_errors(keyed, ["bge-m3", KEY]) == [
        "llm_model_api_keys: must be a mapping of model name: key, got a list"]


def test_an_edited_key_file_is_reported_with_its_path_and_not_its_content(keyed: list[dict[str, Any]]) -> None:
    [error] = key_errors(keyed, {}, {"bge-m3": "tooshort"})
    assert error.startswith("llm_credentials_dir: model 'bge-m3': the key in /inv/credentials/backend-keys/bge-m3 "
                            "must be at least 16 characters long, got 8; delete the file")
    assert "tooshort" not in error


# --- the response cache ------------------------------------------------------------------


def test_cache_true_caches_the_deterministic_endpoints_the_model_declares() -> None:
    [model] = reg.llm_registry_normalize([infinity(cache=True)], GROUPS)
    assert model["cache"] == {"endpoints": ["embeddings", "rerank"], "valid": None, "shared": False}


def test_cached_routes_name_location_path_and_whether_the_endpoint_streams() -> None:
    registry = reg.llm_registry_normalize([
        infinity(cache=True),
        chat(cache={"endpoints": ["completions", "chat"], "valid": "10m", "shared": True}),
        vllm(),
    ], GROUPS)
    assert reg.llm_gateway_cached_routes(registry) == [
        {"model": "bge-m3", "upstream": "llm_bge_m3", "endpoint": "embeddings", "path": "/embeddings",
         "streams": False, "valid": None, "shared": False},
        {"model": "bge-m3", "upstream": "llm_bge_m3", "endpoint": "rerank", "path": "/rerank",
         "streams": False, "valid": None, "shared": False},
        # In the model's endpoint order, whatever order the cache list has.
        {"model": "chat-small", "upstream": "llm_chat_small", "endpoint": "chat", "path": "/v1/chat/completions",
         "streams": True, "valid": "10m", "shared": True},
        {"model": "chat-small", "upstream": "llm_chat_small", "endpoint": "completions", "path": "/v1/completions",
         "streams": True, "valid": "10m", "shared": True},
    ]

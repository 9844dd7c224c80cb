"""Tests of the filters over llm_services, the services beside the models (roles/model_registry/filter_plugins/llm_registry.py)."""

from __future__ import annotations

from typing import Any

import llm_registry as svc
import pytest
from ansible.errors import AnsibleFilterError

GROUPS = {"all": ["gpu1", "gpu2", "db1"], "llm_gpu_hosts": ["gpu1", "gpu2"], "vector": ["db1"], "empty": []}
HOSTVARS = {"gpu1": {"llm_private_address": "10.0.0.1"}, "gpu2": {"ansible_facts": {"default_ipv4": {"address": "10.0.0.2"}}},
            "db1": {"llm_private_address": "fd00::5"}}


def qdrant(**over: Any) -> dict[str, Any]:
    return {"name": "qdrant", "kind": "http", "prefix": "/qdrant", "hosts": ["vector"], "port": 6333,
            "headers": {"api-key": "s3cret-value"}, **over}


def immich(**over: Any) -> dict[str, Any]:
    return {"name": "immich-ml", "kind": "immich_ml", "prefix": "/immich-ml", "hosts": ["gpu1"], "port": 3003,
            "tasks": {"clip_visual": {"hosts": ["gpu2"]}, "facial_recognition": {"hosts": ["gpu2"]},
                      "ocr": {"port": 3004}}, **over}


def normalize(*services: Any, models: Any = None) -> list[dict[str, Any]]:
    return svc.llm_services_normalize(list(services), GROUPS, models)


def test_defaults_are_filled_and_groups_expanded() -> None:
    [q, i] = normalize(qdrant(), immich())
    assert q == {"name": "qdrant", "kind": "http", "prefix": "/qdrant", "hosts": ["db1"], "port": 6333,
                 "strip_prefix": True, "headers": {"api-key": "s3cret-value"}, "client_max_body_size": "16m",
                 "health_path": "/", "api_keys": None, "connect_timeout": None, "send_timeout": None,
                 "read_timeout": None, "tasks": {}}
    assert i["client_max_body_size"] == "32m" and i["health_path"] == "/ping"
    assert i["tasks"] == {"clip_visual": {"hosts": ["gpu2"], "port": 3003},
                          "facial_recognition": {"hosts": ["gpu2"], "port": 3003},
                          "ocr": {"hosts": ["gpu1"], "port": 3004}}


def test_none_and_empty_mean_no_services() -> None:
    assert svc.llm_services_normalize(None, GROUPS) == []
    assert svc.llm_services_normalize([], GROUPS) == []


@pytest.mark.parametrize(("entry", "message"), [
    (qdrant(prefix="/v1"), "service 'qdrant': field 'prefix': '/v1' overlaps the gateway's own path '/v1'"),
    (qdrant(prefix="/v1/qdrant"), "field 'prefix': '/v1/qdrant' overlaps"),
    (qdrant(prefix="/qdrant/"), "field 'prefix': must be a path like"),
    (qdrant(prefix="qdrant"), "field 'prefix': must be a path like"),
    (qdrant(kind="grpc"), "field 'kind': must be one of http, immich_ml, got 'grpc'"),
    (qdrant(port=True), "field 'port': must be an integer from 1 to 65535, got boolean true"),
    (qdrant(hosts=["nowhere"]), "field 'hosts': 'nowhere' is neither a host nor a group"),
    (qdrant(hosts=["empty"]), "field 'hosts': group 'empty' has no hosts"),
    (qdrant(strip_prefix="yes"), "field 'strip_prefix': must be true or false, got 'yes'"),
    (qdrant(client_max_body_size=64), "field 'client_max_body_size': must be an nginx size"),
    (qdrant(read_timeout="10 minutes"), "field 'read_timeout': must be an nginx time"),
    (qdrant(headers={"Host": "x"}), "field 'headers': header 'Host' is set by the gateway itself"),
    (qdrant(headers={"bad name": "x"}), "field 'headers': has an invalid header name 'bad name'"),
    (qdrant(headers={"api-key": 12345}), "field 'headers': header 'api-key': must be a non-empty string, got int"),
    (qdrant(api_keys="some"), "field 'api_keys': must be \"all\" or a list of llm_api_keys ids"),
    (qdrant(tasks={}), "field 'tasks': is only valid with kind 'immich_ml', not 'http'"),
    (qdrant(prefixx="/q"), "field 'prefixx': unknown field (did you mean 'prefix'?)"),
    ({"kind": "http"}, "llm_services[0]: field 'name': is required"),
    ("qdrant", "llm_services[0]: must be a mapping"),
    (immich(tasks={"clip_visuals": {"hosts": ["gpu2"]}}),
     "service 'immich-ml': field 'tasks.clip_visuals': unknown task (did you mean 'clip_visual'?)"),
    (immich(tasks={"ocr": {"hostz": ["gpu2"]}}), "field 'tasks.ocr.hostz': unknown field (did you mean 'hosts'?)"),
    (immich(tasks={"ocr": {"port": "3004"}}), "field 'tasks.ocr.port': must be an integer"),
    (immich(tasks={"ocr": {}}), "field 'tasks.ocr': must be a mapping with hosts and/or port"),
    (immich(strip_prefix=False), "field 'strip_prefix': must be true for kind 'immich_ml'"),
])
def test_bad_fields_name_the_service_and_the_field(entry: Any, message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=None) as error:
        normalize(entry)
    assert message in str(error.value)


@pytest.mark.parametrize("value", ['with"quote', "with$variable", "line\nend", "back\\slash"])
def test_a_header_value_nginx_cannot_carry_is_refused_without_quoting_it(value: str) -> None:
    with pytest.raises(AnsibleFilterError) as error:
        normalize(qdrant(headers={"api-key": value}))
    assert "header 'api-key': its value holds a character nginx cannot carry" in str(error.value)
    assert value not in str(error.value)


def test_every_error_is_reported_in_one_run() -> None:
    with pytest.raises(AnsibleFilterError) as error:
        normalize(qdrant(port=0, prefix="/v1"), immich(name="qdrant", prefix="/qdrant/x"))
    text = str(error.value)
    assert text.startswith("llm_services: 3 errors:")
    assert "field 'prefix': '/v1' overlaps the gateway's own path '/v1'" in text
    assert "field 'port': must be an integer from 1 to 65535, got 0" in text
    assert "field 'name': 'qdrant' is used by another service" in text


def test_overlapping_prefixes_and_clashing_ports() -> None:
    with pytest.raises(AnsibleFilterError, match=r"field 'prefix': '/a/b' overlaps '/a' of service 'one'"):
        normalize(qdrant(name="one", prefix="/a", port=1), qdrant(name="two", prefix="/a/b", port=2))
    models = [{"name": "chat", "hosts": ["gpu1"], "port": 3003}]
    with pytest.raises(AnsibleFilterError, match=r"port 3003 on host 'gpu1' is already used by model 'chat'"):
        normalize(immich(), models=models)
    with pytest.raises(AnsibleFilterError, match=r"service 'b': field 'port': port 6333 on host 'db1' is already "
                                                 r"used by llm_services: service 'a'"):
        normalize(qdrant(name="a", prefix="/a"), qdrant(name="b", prefix="/b"))


def test_tasks_may_share_servers_with_each_other_and_the_default() -> None:
    [gateway] = svc.llm_gateway_services(normalize(immich()), HOSTVARS)
    assert gateway["upstreams"] == [
        {"name": "llm_svc_immich_ml", "servers": ["10.0.0.1:3003"], "health": "/ping"},
        {"name": "llm_svc_immich_ml_clip_visual", "servers": ["10.0.0.2:3003"], "health": "/ping"},
        {"name": "llm_svc_immich_ml_ocr", "servers": ["10.0.0.1:3004"], "health": "/ping"},
    ]
    assert gateway["tasks"] == {"clip_textual": "llm_svc_immich_ml", "clip_visual": "llm_svc_immich_ml_clip_visual",
                                "facial_recognition": "llm_svc_immich_ml_clip_visual", "ocr": "llm_svc_immich_ml_ocr"}


def test_gateway_view_has_no_secret_and_brackets_ipv6() -> None:
    [gateway] = svc.llm_gateway_services(normalize(qdrant()), HOSTVARS)
    assert gateway["header_names"] == ["api-key"]
    assert "s3cret-value" not in repr(gateway)
    assert gateway["upstreams"][0]["servers"] == ["[fd00::5]:6333"]
    assert gateway["tasks"] == {}


def test_a_host_without_an_address_is_an_error() -> None:
    with pytest.raises(AnsibleFilterError, match="service 'qdrant': host 'db1': has no address"):
        svc.llm_gateway_services(normalize(qdrant()), {"db1": {}})


def test_router_data_and_host_ports() -> None:
    services = normalize(qdrant(), immich())
    data = svc.llm_service_router_data(svc.llm_gateway_services(services, HOSTVARS))
    assert data["services"]["immich-ml"]["tasks"]["ocr"] == "llm_svc_immich_ml_ocr"
    assert {u["name"]: u["service"] for u in data["upstreams"]}["llm_svc_qdrant"] == "qdrant"
    assert svc.llm_service_host_ports(services, "gpu1") == [3003, 3004]
    assert svc.llm_service_host_ports(services, "gpu2") == [3003]
    assert svc.llm_service_host_ports(services, "db1") == [6333]


def test_header_variables_are_nginx_names() -> None:
    assert svc.llm_service_header_var("Api-Key") == "llm_svc_h_api_key"
    assert svc.llm_service_header_var("X.Token") == "llm_svc_h_x_token"


def test_filters_are_exported() -> None:
    assert {"llm_services_normalize", "llm_gateway_services", "llm_service_host_ports", "llm_service_router_data",
            "llm_service_header_var"} <= set(svc.FilterModule().filters())


def test_key_ids_of_api_keys_must_exist_when_keys_are_checked() -> None:
    services = normalize(qdrant(api_keys=["team-serch"]))
    with pytest.raises(AnsibleFilterError, match=r"service 'qdrant': field 'api_keys': 'team-serch' is no id of "
                                                 r"llm_api_keys \(did you mean 'team-search'\?\)"):
        svc.llm_gateway_services(services, HOSTVARS, ["team-search", "ops"])
    assert svc.llm_gateway_services(services, HOSTVARS)[0]["api_keys"] == ["team-serch"]  # keys off: not checked
    assert svc.llm_gateway_services(normalize(qdrant()), HOSTVARS, [])[0]["api_keys"] is None


def test_names_that_differ_only_in_dash_and_underscore_clash() -> None:
    with pytest.raises(AnsibleFilterError, match=r"service 'immich_ml': field 'name': 'immich_ml' is used by another"):
        normalize(immich(), immich(name="immich_ml", prefix="/other", port=4000, tasks={}))

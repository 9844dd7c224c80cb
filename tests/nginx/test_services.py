"""Services beside the models, through the role's gateway: Qdrant under a prefix, Immich ML
routed by the task of its "entries" part, and audio uploads routed by their "model" field.

Every check is made at the test backend that received the request (path, query string,
headers, sha256 of the body or of each part), not only at the client.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from gateway_lab import (Gateway, assert_error, basic_auth, free_port, model, nginx_missing, render_gateway,
                         start_backend, start_nginx)

HOSTS = {"gpu-a": "127.0.0.2", "gpu-b": "127.0.0.3", "svc-a": "127.0.0.6", "svc-b": "127.0.0.7",
         "svc-c": "127.0.0.8", "svc-dead": "127.0.0.9"}
ADMIN = ("ops", "ops-password-for-services")
QDRANT_KEY = "qdrant-secret-" + secrets.token_hex(8)
KEYS = {"everything": "k-every-" + secrets.token_hex(16), "chat-only": "k-chat-" + secrets.token_hex(16)}
# Immich ML's task groups: each on its own server here, to see where each request lands.
TASKS = ("clip_textual", "clip_visual", "facial_recognition", "ocr")
TASK_HOSTS = {"default": "svc-a", "clip_textual": "svc-b", "clip_visual": "svc-c", "facial_recognition": "svc-b",
              "ocr": "svc-c"}
ENTRIES = {
    "clip_textual": {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}},
    "clip_visual": {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}},
    "facial_recognition": {"facial-recognition": {"detection": {"modelName": "buffalo_l", "options": {"minScore": 0.7}},
                                                  "recognition": {"modelName": "buffalo_l"}}},
    "ocr": {"ocr": {"detection": {"modelName": "PP-OCRv5_mobile"}, "recognition": {"modelName": "PP-OCRv5_mobile"}}},
}


def auth(key_id: str = "everything") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key_id]}"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    ports = {"chat-small": free_port(HOSTS["gpu-a"]), "whisper": free_port(HOSTS["gpu-b"]),
             "qdrant": free_port(HOSTS["svc-a"]), "default": free_port(HOSTS["svc-a"]),
             "unstripped": free_port(HOSTS["svc-b"])}
    ports.update({task: free_port(HOSTS[TASK_HOSTS[task]]) for task in TASKS})
    backends = {
        "chat-small": start_backend(["chat-small"], HOSTS["gpu-a"], ports["chat-small"]),
        "whisper": start_backend(["whisper-large", "whisper-1"], HOSTS["gpu-b"], ports["whisper"]),
        "qdrant": start_backend(["qdrant"], HOSTS["svc-a"], ports["qdrant"], service="qdrant"),
        "default": start_backend(["immich"], HOSTS["svc-a"], ports["default"], service="immich-ml"),
        "unstripped": start_backend(["unstripped"], HOSTS["svc-b"], ports["unstripped"], service="qdrant"),
        **{task: start_backend(["immich"], HOSTS[TASK_HOSTS[task]], ports[task], service="immich-ml")
           for task in TASKS},
    }
    models = [model("chat-small", ["gpu-a"], ports["chat-small"]),
              model("whisper-large", ["gpu-b"], ports["whisper"], aliases=["whisper-1"],
                    endpoints=["audio_transcriptions"])]
    services = [
        {"name": "qdrant", "kind": "http", "prefix": "/qdrant", "hosts": ["svc-a"], "port": ports["qdrant"],
         "headers": {"api-key": QDRANT_KEY}, "api_keys": ["everything"], "client_max_body_size": "1m"},
        {"name": "immich-ml", "kind": "immich_ml", "prefix": "/immich-ml", "hosts": ["svc-a"],
         "port": ports["default"],
         "tasks": {task: {"hosts": [TASK_HOSTS[task]], "port": ports[task]} for task in TASKS}},
        {"name": "dead", "kind": "http", "prefix": "/dead", "hosts": ["svc-dead"], "port": free_port(HOSTS["svc-dead"])},
        {"name": "unstripped", "kind": "http", "prefix": "/tools/search", "hosts": ["svc-b"],
         "port": ports["unstripped"], "strip_prefix": False, "health_path": "/healthz", "read_timeout": "2s"},
    ]
    root = tmp_path_factory.mktemp("services-gateway")
    http_port, https_port = free_port(), free_port()
    conf = render_gateway(root, models, HOSTS, services=services, gateway_http_port=http_port,
                          gateway_https_port=https_port, gateway_api_keys_required=True,
                          llm_api_keys=[{"id": "everything", "key": KEYS["everything"], "models": "all"},
                                        {"id": "chat-only", "key": KEYS["chat-only"], "models": ["chat-small"]}],
                          gateway_address_rate_per_minute=0, gateway_address_concurrency=0,
                          gateway_admin_users=[{"name": ADMIN[0], "password": ADMIN[1]}])
    gateway = Gateway(root, http_port, https_port, backends)
    try:
        gateway.procs.append(start_nginx(conf, http_port))
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(autouse=True)
def clean(gw: Gateway) -> None:
    for backend in gw.backends.values():
        backend.clear()


def only(gw: Gateway, name: str) -> dict[str, Any]:
    """The one request that reached backend `name`; no other backend got one."""
    served = gw.served()
    assert {k: len(v) for k, v in served.items() if v} == {name: 1}, {k: len(v) for k, v in served.items()}
    return served[name][0]


def form(boundary: str, parts: list[tuple[str, bytes, str | None]]) -> bytes:
    """multipart/form-data of (name, value, filename) parts."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += b"Content-Type: application/octet-stream\r\n" if filename else b""
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def post_form(gw: Gateway, path: str, body: bytes, boundary: str, key: str = "everything") -> Any:
    return gw.request("POST", path, raw=body, headers={**auth(key),
                                                       "Content-Type": f"multipart/form-data; boundary={boundary}"})


# ---------------------------------------------------------------- Qdrant under /qdrant


@pytest.mark.parametrize(("method", "path", "body", "backend_path", "query"), [
    ("GET", "/qdrant/collections?with_aliases=true", None, "/collections", "with_aliases=true"),
    ("PUT", "/qdrant/collections/docs/points?wait=true&ordering=strong",
     {"points": [{"id": 1, "vector": [0.1, 0.2], "payload": {"t": "é"}}]}, "/collections/docs/points",
     "wait=true&ordering=strong"),
    ("POST", "/qdrant/collections/docs/points/search?timeout=5", {"vector": [0.1, 0.2], "limit": 3},
     "/collections/docs/points/search", "timeout=5"),
    ("DELETE", "/qdrant/collections/docs", None, "/collections/docs", ""),
    ("GET", "/qdrant", None, "/", ""),
    ("GET", "/qdrant/collections/a%20b?q=%2F", None, "/collections/a%20b", "q=%2F"),
])
def test_qdrant_paths_reach_the_service_stripped_with_its_key(gw: Gateway, method: str, path: str, body: Any,
                                                              backend_path: str, query: str) -> None:
    raw = None if body is None else json.dumps(body).encode()
    reply = gw.request(method, path, raw=raw, headers={**auth(), "api-key": "the-clients-own", "X-Custom": "kept"})
    assert reply.status == 200, reply.body[:300]
    seen = only(gw, "qdrant")
    assert (seen["method"], seen["path"], seen["query"]) == (method, backend_path.split("?")[0].replace(
        "%20", "%20"), query)
    assert seen["body_sha256"] == hashlib.sha256(raw or b"").hexdigest()
    assert seen["headers"]["api-key"] == [QDRANT_KEY]
    assert "authorization" not in seen["headers"]
    assert seen["headers"]["x-custom"] == ["kept"]
    assert json.loads(reply.body)["status"] == "ok"


def test_a_service_may_keep_its_prefix_and_have_its_own_timeout(gw: Gateway) -> None:
    reply = gw.request("POST", "/tools/search/q?x=%2F", raw=b'{"q": 1}', headers=auth())
    assert reply.status == 200, reply.body[:300]
    seen = only(gw, "unstripped")
    assert (seen["path"], seen["query"]) == ("/tools/search/q", "x=%2F")
    assert "api-key" not in seen["headers"] and "authorization" not in seen["headers"]
    gw.backends["unstripped"].control("POST", "/_test/behaviour", {"mode": "slow", "delay": 3})
    error = assert_error(gw.request("GET", "/tools/search/slow", headers=auth()), 504, "upstream_timeout")
    assert "service 'unstripped'" in error["message"]


def test_ready_probes_every_service_server(gw: Gateway) -> None:
    reply = gw.request("GET", "/ready", headers={"Authorization": basic_auth(*ADMIN)})
    assert reply.status == 503  # the service "dead" has no live server
    upstreams = {u.get("service") or u.get("model"): u for u in json.loads(reply.body)["upstreams"]}
    assert upstreams["dead"]["live"] == 0
    assert upstreams["qdrant"]["live"] == 1
    assert {u["upstream"] for u in json.loads(reply.body)["upstreams"] if u.get("service") == "immich-ml"} == {
        "llm_svc_immich_ml", *(f"llm_svc_immich_ml_{task}" for task in TASKS)}
    probes = [r for r in gw.served()["unstripped"] if r["path"] == "/healthz"]
    assert len(probes) == 1


def test_a_services_status_and_error_body_pass_through(gw: Gateway) -> None:
    gw.backends["qdrant"].control("POST", "/_test/behaviour", {"mode": "fail", "status": 409})
    reply = gw.request("PUT", "/qdrant/collections/docs", raw=b"{}", headers=auth())
    assert reply.status == 409
    assert json.loads(reply.body)["error"]["code"] == "injected_failure"


def test_a_service_needs_a_key_it_is_open_to(gw: Gateway) -> None:
    assert_error(gw.request("GET", "/qdrant/collections"), 401, "invalid_api_key")
    assert_error(gw.request("GET", "/qdrant/collections", headers=auth("chat-only")), 404, "not_found")
    assert not any(gw.served().values())


def test_a_body_over_the_services_limit_is_413(gw: Gateway) -> None:
    reply = gw.request("POST", "/qdrant/collections/docs/points", raw=b"x" * (1024 * 1024 + 1), headers=auth())
    error = assert_error(reply, 413, "request_too_large")
    assert "1m" in error["message"]


def test_a_service_without_a_live_server_is_503(gw: Gateway) -> None:
    reply = gw.request("GET", "/dead/anything", headers=auth())
    error = assert_error(reply, 503, "model_unavailable")
    assert "service 'dead'" in error["message"]


# ---------------------------------------------------------------- Immich ML by task


CAPTURED = (b"------formdata-undici-043847285935\r\n"
            b'Content-Disposition: form-data; name="entries"\r\n\r\n'
            b'{"clip":{"textual":{"modelName":"ViT-B-32__openai"}}}\r\n'
            b"------formdata-undici-043847285935\r\n"
            b'Content-Disposition: form-data; name="text"\r\n\r\n'
            b"cat\r\n"
            b"------formdata-undici-043847285935--\r\n")


def test_the_captured_smart_search_request_goes_to_clip_textual(gw: Gateway) -> None:
    reply = post_form(gw, "/immich-ml/predict", CAPTURED, "----formdata-undici-043847285935")
    assert reply.status == 200, reply.body[:300]
    seen = only(gw, "clip_textual")
    assert seen["path"] == "/predict"
    assert seen["body_sha256"] == hashlib.sha256(CAPTURED).hexdigest()
    assert json.loads(reply.body)["entries"] == ENTRIES["clip_textual"]


@pytest.mark.parametrize("entries_first", [True, False], ids=["entries-first", "entries-last"])
@pytest.mark.parametrize("task", TASKS)
def test_each_task_lands_on_its_own_servers(gw: Gateway, task: str, entries_first: bool) -> None:
    image = os.urandom(2 * 1024 * 1024 if task == "clip_visual" else 64 * 1024)
    parts = [("entries", json.dumps(ENTRIES[task]).encode(), None),
             ("text", b"a cat", None) if task == "clip_textual" else ("image", image, "image.jpg")]
    body = form("boundary-" + task, parts if entries_first else parts[::-1])
    reply = post_form(gw, "/immich-ml/predict?x=1", body, "boundary-" + task)
    assert reply.status == 200, reply.body[:300]
    seen = only(gw, task)
    assert (seen["path"], seen["query"]) == ("/predict", "x=1")
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "authorization" not in seen["headers"]


@pytest.mark.parametrize(("body", "code"), [
    (form("b", [("image", b"x" * 1000, "a.jpg")]), "missing_entries"),
    (form("b", [("entries", b"{clip", None), ("text", b"cat", None)]), "invalid_entries"),
    (form("b", [("entries", b"[1, 2]", None)]), "invalid_entries"),
    (form("b", [("entries", b'{"clip": {"audio": {}}, "face": {}}', None)]), "unknown_task"),
    (form("b", [("entries", b'{"clip": {"textual": {}, "visual": {}}}', None)]), "mixed_tasks"),
    (b"--b\r\nContent-Disposition: form-data; name=\"entries\"\r\n\r\n{}", "invalid_body"),
])
def test_malformed_entries_get_a_400(gw: Gateway, body: bytes, code: str) -> None:
    error = assert_error(post_form(gw, "/immich-ml/predict", body, "b"), 400, code)
    assert error["param"] == "entries"
    assert not any(gw.served().values())


def test_predict_needs_multipart_and_post(gw: Gateway) -> None:
    assert_error(gw.request("POST", "/immich-ml/predict", {"entries": {}}, headers=auth()), 400, "invalid_body")
    assert_error(gw.request("GET", "/immich-ml/predict", headers=auth()), 405, "method_not_allowed")


@pytest.mark.parametrize("path", ["/immich-ml/ping", "/immich-ml/", "/immich-ml"])
def test_other_immich_paths_go_to_the_default_group(gw: Gateway, path: str) -> None:
    reply = gw.request("GET", path, headers=auth())
    assert reply.status == 200, reply.body[:300]
    assert only(gw, "default")["path"] == ("/ping" if path.endswith("ping") else "/")


def test_the_access_log_names_the_service_and_task(gw: Gateway) -> None:
    body = form("b", [("image", os.urandom(1000), "a.jpg"), ("entries", json.dumps(ENTRIES["ocr"]).encode(), None)])
    rid = "svc-log-" + secrets.token_hex(4)
    reply = gw.request("POST", "/immich-ml/predict", raw=body,
                       headers={**auth(), "X-Request-ID": rid, "Content-Type": "multipart/form-data; boundary=b"})
    assert reply.status == 200
    qid = "svc-log-" + secrets.token_hex(4)
    assert gw.request("GET", "/qdrant/collections", headers={**auth(), "X-Request-ID": qid}).status == 200
    entries = gw.logged({rid, qid})
    assert entries[rid]["service"] == "immich-ml/ocr"
    assert entries[rid]["upstream"] == "llm_svc_immich_ml_ocr"
    assert (entries[rid]["path"], entries[rid]["router"], entries[rid]["api_key_id"]) == (
        "/immich-ml/predict", "njs", "everything")
    assert (entries[qid]["service"], entries[qid]["upstream"], entries[qid]["path"]) == (
        "qdrant", "llm_svc_qdrant", "/qdrant/collections")


# ---------------------------------------------------------------- audio by its model field


@pytest.mark.parametrize("name", ["whisper-large", "whisper-1"])
def test_a_transcription_goes_to_its_models_server_byte_for_byte(gw: Gateway, name: str) -> None:
    audio = os.urandom(3 * 1024 * 1024)
    body = form("audio-b", [("file", audio, "a.wav"), ("model", name.encode(), None),
                            ("response_format", b"json", None)])
    reply = post_form(gw, "/v1/audio/transcriptions", body, "audio-b")
    assert reply.status == 200, reply.body[:300]
    assert json.loads(reply.body)["file_sha256"] == hashlib.sha256(audio).hexdigest()
    seen = only(gw, "whisper")
    assert seen["path"] == "/v1/audio/transcriptions"
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    entry = gw.logged({seen["request_id"]})[seen["request_id"]]
    assert (entry["model"], entry["model_requested"], entry["router"], entry["path"]) == (
        "whisper-large", name, "njs", "/v1/audio/transcriptions")
    assert "authorization" not in seen["headers"]


@pytest.mark.parametrize(("path", "name", "status", "code"), [
    ("/v1/audio/transcriptions", "no-such-model", 404, "model_not_found"),
    ("/v1/audio/transcriptions", "chat-small", 400, "unsupported_endpoint"),
    ("/v1/audio/translations", "whisper-large", 400, "unsupported_endpoint"),
    ("/v1/audio/transcriptions", "", 400, "missing_model"),
])
def test_audio_errors_are_those_of_the_json_endpoints(gw: Gateway, path: str, name: str, status: int,
                                                      code: str) -> None:
    body = form("b", [("model", name.encode(), None), ("file", b"RIFF" * 100, "a.wav")])
    error = assert_error(post_form(gw, path, body, "b"), status, code)
    assert error["param"] == "model"
    assert not any(gw.served().values())


def test_an_audio_model_outside_the_keys_list_is_unknown(gw: Gateway) -> None:
    body = form("b", [("model", b"whisper-large", None), ("file", b"RIFF", "a.wav")])
    assert_error(post_form(gw, "/v1/audio/transcriptions", body, "b", key="chat-only"), 404, "model_not_found")


def test_an_upload_over_the_audio_limit_is_413(gw: Gateway) -> None:
    body = form("b", [("model", b"whisper-large", None), ("file", b"\0" * (25 * 1024 * 1024), "a.wav")])
    error = assert_error(post_form(gw, "/v1/audio/transcriptions", body, "b"), 413, "request_too_large")
    assert "25m" in error["message"]


def test_the_openai_client_transcribes_through_the_gateway(gw: Gateway, tmp_path: Any) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.http_port}/v1", api_key=KEYS["everything"],
                           max_retries=0)
    audio = tmp_path / "speech.wav"
    audio.write_bytes(os.urandom(1024 * 1024))
    with audio.open("rb") as handle:
        answer = client.audio.transcriptions.create(model="whisper-1", file=handle)
    assert answer.text.startswith("transcription of 1048576 bytes")
    seen = only(gw, "whisper")
    assert [part["sha256"] for part in seen["parts"] if part["name"] == "file"] == [
        hashlib.sha256(audio.read_bytes()).hexdigest()]


def test_no_pattern_failed_on_any_upload(gw: Gateway) -> None:
    """The capture of a form's first part ran on every upload above, up to 25 MB: PCRE never gave up."""
    body = form("b", [("image", os.urandom(20 * 1024 * 1024), "a.jpg"),
                      ("entries", json.dumps(ENTRIES["clip_visual"]).encode(), None)])
    assert post_form(gw, "/immich-ml/predict", body, "b").status == 200
    assert not re.search(r"pcre|regex", gw.error_log(), re.I)

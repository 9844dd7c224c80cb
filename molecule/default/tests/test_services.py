"""Beside the LLM API, end to end: Qdrant under /qdrant, Immich ML routed by task, audio by model.

molecule.yml declares the services (llm_services) and runs a test backend for each of their
servers (llm_lab_service_backends, playbooks/lab_fixtures.yml); every check is made at the
backend that received the request: path, query string, headers, sha256 of the body.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import openai
import pytest
import requests

from lab_pytest import access_log_lines, api_key, assert_openai_error, bearer, connects, credential, landed, wait_until

testinfra_hosts = ["llm_gateways"]

# Where molecule.yml puts each service's servers; the test says it itself, so a wrong route
# in the product cannot agree with itself.
SERVERS = {
    "qdrant": ("mol-gpu1", 6333),
    "default": ("mol-gpu1", 3003),
    "clip_textual": ("mol-gpu2", 3003),
    "clip_visual": ("mol-gpu1", 3004),
    "facial_recognition": ("mol-gpu2", 3004),
    "ocr": ("mol-gpu2", 3005),
}
ENTRIES = {
    "clip_visual": {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}},
    "facial_recognition": {"facial-recognition": {"detection": {"modelName": "buffalo_l", "options": {"minScore": 0.7}},
                                                  "recognition": {"modelName": "buffalo_l"}}},
    "ocr": {"ocr": {"detection": {"modelName": "PP-OCRv5_mobile"}, "recognition": {"modelName": "PP-OCRv5_mobile"}}},
}
# The smart-search request Immich's server sent to Immich ML, as captured (boundary, entries first).
CAPTURED_BOUNDARY = "----formdata-undici-043847285935"
CAPTURED = (b"------formdata-undici-043847285935\r\n"
            b'Content-Disposition: form-data; name="entries"\r\n\r\n'
            b'{"clip":{"textual":{"modelName":"ViT-B-32__openai"}}}\r\n'
            b"------formdata-undici-043847285935\r\n"
            b'Content-Disposition: form-data; name="text"\r\n\r\n'
            b"cat\r\n"
            b"------formdata-undici-043847285935--\r\n")
CAPTURED_OTHER_ORDER = (b"------formdata-undici-043847285935\r\n"
                        b'Content-Disposition: form-data; name="text"\r\n\r\n'
                        b"cat\r\n"
                        b"------formdata-undici-043847285935\r\n"
                        b'Content-Disposition: form-data; name="entries"\r\n\r\n'
                        b'{"clip":{"textual":{"modelName":"ViT-B-32__openai"}}}\r\n'
                        b"------formdata-undici-043847285935--\r\n")


@pytest.fixture(scope="module")
def service_urls(address_of) -> dict[str, str]:
    return {name: f"http://{address_of(host)}:{port}" for name, (host, port) in SERVERS.items()}


@pytest.fixture()
def received(service_urls):
    """Empties every stand-in's request log; returns a function: what each one received since."""
    for url in service_urls.values():
        requests.delete(f"{url}/_test/requests", timeout=5).raise_for_status()

    def get() -> dict[str, list[dict[str, Any]]]:
        records = {name: requests.get(f"{url}/_test/requests", timeout=5).json() for name, url in service_urls.items()}
        return {name: got for name, got in records.items() if got}
    return get


def form(boundary: str, parts: list[tuple[str, bytes, str | None]]) -> bytes:
    """multipart/form-data of (name, value, filename) parts."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += b"Content-Type: image/jpeg\r\n" if filename else b""
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def predict(gateway_url: str, body: bytes, boundary: str) -> requests.Response:
    return requests.post(f"{gateway_url}/immich-ml/predict", data=body, timeout=60,
                         headers={**bearer(), "Content-Type": f"multipart/form-data; boundary={boundary}"})


# ---------------------------------------------------------------- firewall


def test_the_gateway_reaches_the_service_ports_and_other_hosts_do_not(lab_host, address_of):
    for name, (server, port) in SERVERS.items():
        assert connects(lab_host("mol-gw"), address_of(server), port), f"mol-gw -> {server}:{port} ({name})"
    # The other GPU host is no gateway: the services' firewall entry keeps it out.
    assert connects(lab_host("mol-gw"), address_of("mol-gpu1"), 6333)
    assert not connects(lab_host("mol-gpu2"), address_of("mol-gpu1"), 6333)
    assert not connects(lab_host("mol-gpu1"), address_of("mol-gpu2"), 3005)


# ---------------------------------------------------------------- Qdrant


@pytest.mark.parametrize(("method", "path", "body"), [
    ("PUT", "/collections/docs?timeout=10", {"vectors": {"size": 4, "distance": "Cosine"}}),
    ("PUT", "/collections/docs/points?wait=true&ordering=weak",
     {"points": [{"id": 1, "vector": [0.1, 0.2, 0.3, 0.4], "payload": {"city": "Zürich"}}]}),
    ("POST", "/collections/docs/points/search?consistency=majority", {"vector": [0.1, 0.2, 0.3, 0.4], "limit": 3}),
    ("GET", "/collections?with_aliases=1", None),
])
def test_qdrant_paths_reach_it_stripped_with_its_own_key(gateway_url, received, method, path, body):
    raw = None if body is None else json.dumps(body).encode()
    response = requests.request(method, f"{gateway_url}/qdrant{path}", data=raw, timeout=10, headers={
        **bearer(), "api-key": "the-clients-own-key", "Content-Type": "application/json"})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["status"] == "ok"
    got = received()
    assert list(got) == ["qdrant"] and len(got["qdrant"]) == 1, got.keys()
    record = got["qdrant"][0]
    assert (record["method"], record["path"], record["query"]) == (method, *path.split("?", 1))
    assert record["body_sha256"] == hashlib.sha256(raw or b"").hexdigest(), "the body reaches Qdrant unchanged"
    assert record["headers"]["api-key"] == [credential("qdrant-api-key")]
    assert "authorization" not in record["headers"], "the client's key never reaches Qdrant"
    assert api_key() not in json.dumps(record["headers"])


def test_qdrant_is_closed_to_keys_not_listed(gateway_url, received):
    assert_openai_error(requests.get(f"{gateway_url}/qdrant/collections", timeout=10), 401, "invalid_api_key")
    assert_openai_error(requests.get(f"{gateway_url}/qdrant/collections", headers=bearer("chat-small-only"),
                                     timeout=10), 404)
    assert received() == {}


# ---------------------------------------------------------------- Immich ML by task


@pytest.mark.parametrize("body", [CAPTURED, CAPTURED_OTHER_ORDER], ids=["captured", "other-order"])
def test_the_captured_smart_search_lands_on_clip_textual(gateway_url, received, body):
    response = predict(gateway_url, body, CAPTURED_BOUNDARY)
    assert response.status_code == 200, response.text[:300]
    got = received()
    assert list(got) == ["clip_textual"], got.keys()
    assert (got["clip_textual"][0]["path"], got["clip_textual"][0]["body_sha256"]) == (
        "/predict", hashlib.sha256(body).hexdigest())


@pytest.mark.parametrize("entries_first", [True, False], ids=["entries-first", "image-first"])
@pytest.mark.parametrize("task", ["clip_visual", "facial_recognition", "ocr"])
def test_each_task_lands_on_its_own_server(gateway_url, received, task, entries_first):
    image = os.urandom(20 * 1024 * 1024 if task == "clip_visual" else 512 * 1024)
    parts = [("entries", json.dumps(ENTRIES[task]).encode(), None), ("image", image, "blob")]
    body = form(f"boundary-{task}", parts if entries_first else parts[::-1])
    response = predict(gateway_url, body, f"boundary-{task}")
    assert response.status_code == 200, response.text[:300]
    assert response.json()["entries"] == ENTRIES[task]
    got = received()
    assert list(got) == [task], got.keys()
    record = got[task][0]
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest(), "the upload is proxied as sent"
    assert [p["sha256"] for p in record["parts"] if p["name"] == "image"] == [hashlib.sha256(image).hexdigest()]


@pytest.mark.parametrize(("body", "code"), [
    (form("b", [("image", b"\xff\xd8" * 100, "blob")]), "missing_entries"),
    (form("b", [("entries", b"{not json", None)]), "invalid_entries"),
    (form("b", [("entries", b'{"clip": {"audio": {}}}', None)]), "unknown_task"),
])
def test_malformed_entries_get_a_400_and_reach_no_server(gateway_url, received, body, code):
    assert_openai_error(predict(gateway_url, body, "b"), 400, code)
    assert received() == {}


def test_other_immich_paths_go_to_the_default_server(gateway_url, received):
    response = requests.get(f"{gateway_url}/immich-ml/ping", headers=bearer(), timeout=10)
    assert (response.status_code, response.text) == (200, "pong")
    assert list(received()) == ["default"]


def test_the_access_log_names_the_task(host, gateway_url):
    body = form("b", [("entries", json.dumps(ENTRIES["ocr"]).encode(), None), ("image", b"x" * 100, "blob")])
    response = requests.post(f"{gateway_url}/immich-ml/predict", data=body, timeout=10, headers={
        **bearer(), "Content-Type": "multipart/form-data; boundary=b", "X-Request-ID": (request_id := f"services-log-{uuid.uuid4().hex}")})
    assert response.status_code == 200

    def logged() -> list[dict[str, Any]]:
        return [json.loads(line) for line in access_log_lines(host, request_id)]
    assert wait_until(lambda: len(logged()) == 1, timeout=5)
    entry = logged()[0]
    assert (entry["service"], entry["upstream"], entry["status"]) == ("immich-ml/ocr", "llm_svc_immich_ml_ocr", 200)


# ---------------------------------------------------------------- audio by its model field


@pytest.fixture(scope="module")
def client(gateway_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key(), max_retries=0, timeout=60)


@pytest.mark.parametrize("kind", ["transcriptions", "translations"])
def test_the_openai_client_uploads_audio_to_the_models_server(client, clean, tmp_path, kind):
    audio = tmp_path / "speech.wav"
    audio.write_bytes(b"RIFF" + os.urandom(10 * 1024 * 1024))
    with audio.open("rb") as handle:
        answer = getattr(client.audio, kind).create(model="whisper-1", file=handle)
    assert answer.text
    hits = landed(clean)
    assert list(hits) == [("whisper-large", "mol-gpu2")], hits.keys()
    [record] = hits[("whisper-large", "mol-gpu2")]
    assert record["path"] == f"/v1/audio/{kind}"
    files = [part for part in record["parts"] if part["name"] == "file"]
    assert [part["sha256"] for part in files] == [hashlib.sha256(audio.read_bytes()).hexdigest()]


@pytest.mark.parametrize(("model", "status", "code"), [
    ("no-such-model", 404, "model_not_found"),
    ("chat-small", 400, "unsupported_endpoint"),
])
def test_audio_errors_are_those_of_the_json_endpoints(gateway_url, clean, model, status, code):
    body = form("b", [("model", model.encode(), None), ("file", b"RIFF" * 256, "a.wav")])
    response = requests.post(f"{gateway_url}/v1/audio/transcriptions", data=body, timeout=10,
                             headers={**bearer(), "Content-Type": "multipart/form-data; boundary=b"})
    assert_openai_error(response, status, code)
    assert landed(clean) == {}

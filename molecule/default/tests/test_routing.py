"""End to end through the gateway: every request is checked at the backend that received it.

The backends are the project's test backend (tests/backend), one per model and host; each
records what it received (GET /_test/requests), so a test can prove where a request landed,
that its body arrived byte for byte, and that a rejected request reached no backend at all.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import urllib.request
from typing import Any, Callable

import pytest
import requests

from lab_pytest import (PAST_THE_CACHE, assert_openai_error, backend_path, bearer, get, json_endpoints, landed, post,
                        primary_hosts, wait_until)

testinfra_hosts = ["llm_gateways"]

BODY_LIMIT = 16 * 1024 * 1024  # gateway_client_max_body_size default (16m)
# A valid request for each endpoint around a padding string. "model" stands after the padding,
# and in some before other members, so the gateway's readers find it in the body's tail.
PAYLOADS: dict[str, Callable[[str, str], dict[str, Any]]] = {
    "chat": lambda pad, model: {"messages": [{"role": "user", "content": pad}], "model": model, "max_tokens": 2},
    "completions": lambda pad, model: {"prompt": pad, "model": model, "max_tokens": 2},
    "embeddings": lambda pad, model: {"input": pad, "model": model},
    "rerank": lambda pad, model: {"query": "q", "documents": [pad], "model": model},
    "responses": lambda pad, model: {"input": pad, "model": model, "max_output_tokens": 2},
    "score": lambda pad, model: {"text_1": "q", "text_2": [pad], "model": model},
    "tokenize": lambda pad, model: {"prompt": pad, "model": model},
    # Token ids, not text: ", 120" takes 5 bytes, so the body keeps about the size asked for.
    "detokenize": lambda pad, model: {"tokens": [120] * (len(pad) // 5), "model": model},
}


def request_body(model: str, endpoint: str, size: int = 1024) -> bytes:
    """A valid request of about `size` bytes; padding sits in the payload, before "model"."""
    def encode(pad: str) -> bytes:
        return json.dumps(PAYLOADS[endpoint](pad, model)).encode()

    return encode("x" * max(0, size - len(encode(""))))


# --- routing -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1024, 1024 * 1024, BODY_LIMIT - 4096], ids=["1KB", "1MB", "under-limit"])
def test_every_model_lands_only_on_its_own_hosts_for_every_endpoint(gateway_url, registry, inventory, clean, size):
    for model in registry:
        # A backup host serves only while the primaries are down (test_balancing_and_cache.py).
        own_hosts = set(primary_hosts(model, inventory))
        for endpoint in json_endpoints(model):
            for backend in clean:
                backend.clear()
            body = request_body(model["name"], endpoint, size)
            sent = hashlib.sha256(body).hexdigest()
            # Enough requests that least_conn/round robin touches every host of the model,
            # on each of nginx's two workers (each balances on its own), whatever its weights.
            heaviest = max([entry.get("weight", 1) for entry in model["hosts"] if isinstance(entry, dict)] + [1])
            for _ in range(4 * len(own_hosts) * heaviest):
                response = post(gateway_url, endpoint, body, PAST_THE_CACHE)
                assert response.status_code == 200, (model["name"], endpoint, response.text[:300])
                assert response.headers["X-Backend-Model"] == model["name"]
                assert response.headers["X-Backend-Host"] in own_hosts
            hits = landed(clean)
            assert {m for m, _ in hits} == {model["name"]}, f"{model['name']} {endpoint} leaked: {hits.keys()}"
            assert {h for _, h in hits} == own_hosts, "balanced over every host that serves the model"
            for records in hits.values():
                for record in records:
                    assert record["path"] == backend_path(model, endpoint)
                    assert record["body_length"] == len(body)
                    assert record["body_sha256"] == sent, "the body reaches the backend byte for byte"


def test_aliases_land_with_their_model(gateway_url, registry, clean):
    for model in registry:
        for alias in model.get("aliases", []) if json_endpoints(model) else []:
            endpoint = json_endpoints(model)[0]
            response = post(gateway_url, endpoint, request_body(alias, endpoint))
            assert response.status_code == 200, response.text[:300]
            assert response.headers["X-Backend-Model"] == model["name"]
    hits = landed(clean)
    assert {m for m, _ in hits} == {m["name"] for m in registry if m.get("aliases") and json_endpoints(m)}


def test_nested_model_keys_do_not_steer_the_route(gateway_url, clean):
    body = json.dumps({
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"model": "chat-large"}}}],
        "metadata": {"model": "embed-small"},
        "model": "chat-small",
        "messages": [{"role": "user", "content": "the \"model\": \"chat-large\" inside a string"}],
    }).encode()
    response = post(gateway_url, "chat", body)
    assert response.status_code == 200, response.text
    assert response.headers["X-Backend-Model"] == "chat-small"


def test_request_id_is_passed_to_the_backend_and_returned(gateway_url, clean):
    response = post(gateway_url, "chat", request_body("chat-large", "chat"), headers={"X-Request-ID": "req-e2e-42"})
    assert response.headers["X-Request-ID"] == "req-e2e-42"
    records = [r for records in landed(clean).values() for r in records]
    assert [r["request_id"] for r in records] == ["req-e2e-42"]


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "status", "code"),
    [
        ("chat", b'{"model": "no-such-model", "messages": []}', 404, "model_not_found"),
        ("chat", b'{"model": "chat-small", "messages": [', 400, None),
        ("chat", b'{"messages": [{"role": "user", "content": "hi"}]}', 400, None),
        ("chat", b'{"model": 42, "messages": []}', 400, None),
        ("chat", b'["model", "chat-small"]', 400, None),
        ("chat", b"", 400, None),
        ("chat", b'{"model": "embed-small", "messages": []}', 400, None),
        ("embeddings", b'{"model": "chat-small", "input": "x"}', 400, None),
    ],
    ids=["unknown-model", "invalid-json", "missing-model", "model-not-a-string", "not-an-object",
         "empty-body", "chat-to-embeddings-model", "embeddings-to-chat-model"],
)
def test_bad_requests_get_an_openai_error_and_reach_no_backend(gateway_url, clean, endpoint, body, status, code):
    assert_openai_error(post(gateway_url, endpoint, body), status, code)
    assert landed(clean) == {}


def test_body_over_the_limit_is_413_json_and_reaches_no_backend(gateway_url, clean):
    response = post(gateway_url, "chat", request_body("chat-small", "chat", BODY_LIMIT + 1024))
    assert_openai_error(response, 413)
    assert landed(clean) == {}


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405)])
def test_no_html_error_page_on_api_paths(gateway_url, method, path, status):
    response = requests.request(method, gateway_url + path, headers=bearer(), timeout=10)
    assert_openai_error(response, status)


# --- models list and health --------------------------------------------------------------


def test_models_list_equals_the_registry(gateway_url, registry):
    listing = get(gateway_url, "/v1/models").json()
    assert listing["object"] == "list"
    assert sorted(m["id"] for m in listing["data"]) == sorted(m["name"] for m in registry)
    assert all(m["object"] == "model" for m in listing["data"])
    one = get(gateway_url, "/v1/models/chat-small")
    assert one.status_code == 200 and one.json()["id"] == "chat-small"
    assert_openai_error(get(gateway_url, "/v1/models/nope"), 404, "model_not_found")


def test_gateway_health(gateway_url):
    response = requests.get(f"{gateway_url}/health", timeout=5)
    assert response.status_code == 200 and response.json()["status"] == "ok"


# --- streaming ---------------------------------------------------------------------------


def _event_arrival_times(url: str, context: ssl.SSLContext | None = None) -> list[float]:
    body = json.dumps({"model": "chat-large", "stream": True, "max_tokens": 6,
                       "messages": [{"role": "user", "content": "count"}]}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={
        "Content-Type": "application/json", "X-Test-Stream-Interval": "0.5", **bearer()})
    start = time.monotonic()
    arrivals = []
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic() - start)
    return arrivals


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_stream_events_arrive_while_the_backend_is_still_producing(gateway_url, scheme):
    url = gateway_url if scheme == "http" else gateway_url.replace("http://", "https://")
    context = ssl._create_unverified_context() if scheme == "https" else None  # lab's self-signed certificate
    arrivals = _event_arrival_times(url, context)
    assert len(arrivals) >= 7, arrivals  # 6 chunks and [DONE]
    # The backend paces events 0.5 s apart (about 3 s in all): a buffered stream would
    # deliver the first event together with the last one.
    assert arrivals[-1] - arrivals[0] > 2.0, arrivals


# --- passive health ----------------------------------------------------------------------


def _stop_model(lab_host, host: str, model: str) -> None:
    lab_host(host).run(f"systemctl stop llm-model-{model}.service")


def _start_model(lab_host, host: str, model: str, address: str, port: int) -> None:
    lab_host(host).run(f"systemctl start llm-model-{model}.service")
    assert wait_until(lambda: _answers(f"http://{address}:{port}/health")), f"{model} on {host} did not come back"


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_one_host_down_loses_no_request_and_all_down_is_503(gateway_url, backends, lab_host, address_of):
    shared = [b for b in backends if b.model["name"] == "chat-small"]
    assert len(shared) >= 2, "chat-small runs on two hosts in this scenario"
    down, *up = shared
    _stop_model(lab_host, down.host, "chat-small")
    try:
        body = request_body("chat-small", "chat")
        statuses = [post(gateway_url, "chat", body).status_code for _ in range(200)]
        assert statuses.count(200) == 200, {s: statuses.count(s) for s in set(statuses)}

        for backend in up:
            _stop_model(lab_host, backend.host, "chat-small")
        response = post(gateway_url, "chat", body)
        error = assert_openai_error(response, 503)
        assert "chat-small" in error["message"] or response.headers.get("Retry-After")
        assert int(response.headers["Retry-After"]) > 0
    finally:
        for backend in shared:
            _start_model(lab_host, backend.host, "chat-small", address_of(backend.host), backend.model["port"])
        # nginx keeps the servers marked failed for fail_timeout: the tests after this one
        # need chat-small routed again.
        assert wait_until(lambda: post(gateway_url, "chat", request_body("chat-small", "chat")).status_code == 200,
                          timeout=30), "chat-small is not routed again after its servers came back"

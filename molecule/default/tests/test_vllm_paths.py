"""vLLM's paths beyond chat and completions, through the gateway and checked at the backend.

In this scenario's registry chat-large declares responses, score, tokenize and detokenize;
the gateway routes them by the body's model like every API path, to the backend path that
lab_pytest.backend_path names (/v1/responses and /v1/score under the model's api_prefix,
/tokenize and /detokenize at the root). vLLM's control and introspection paths are never
proxied, whatever model the body names.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import pytest
import requests

from lab_pytest import assert_openai_error, backend_path, bearer, landed, post

testinfra_hosts = ["llm_gateways"]

MODEL = "chat-large"


def check_responses(answer: dict[str, Any]) -> None:
    assert answer["object"] == "response" and answer["id"] and answer["model"] == MODEL
    [message] = answer["output"]
    assert (message["type"], message["role"]) == ("message", "assistant")
    [content] = message["content"]
    assert content["type"] == "output_text" and content["text"]
    assert answer["usage"]["output_tokens"] == 2, "max_output_tokens reached the backend"


def check_score(answer: dict[str, Any]) -> None:
    assert answer["object"] == "list" and answer["model"] == MODEL
    assert [(d["index"], d["object"]) for d in answer["data"]] == [(0, "score"), (1, "score")]
    assert all(isinstance(d["score"], float) for d in answer["data"])
    assert answer["usage"]["prompt_tokens"] > 0


def check_tokenize(answer: dict[str, Any]) -> None:
    assert answer["tokens"] and all(isinstance(token, int) for token in answer["tokens"])
    assert answer["count"] == len(answer["tokens"])
    assert isinstance(answer["max_model_len"], int)


def check_detokenize(answer: dict[str, Any]) -> None:
    assert isinstance(answer["prompt"], str) and answer["prompt"]


# Per endpoint: a request (without "model") and the check of vLLM's answer shape.
REQUESTS: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], None]]] = {
    "responses": ({"input": "hello there", "max_output_tokens": 2}, check_responses),
    "score": ({"text_1": "capital of france", "text_2": ["paris is the capital", "bananas"]}, check_score),
    "tokenize": ({"prompt": "hello world"}, check_tokenize),
    "detokenize": ({"tokens": [104, 105]}, check_detokenize),
}

# vLLM's server answers these too; no client of the gateway may reach them (they reload
# weights, run RPCs on the workers, pause the engine, or tell what runs where). /score and
# /v1/tokenize are the API paths at the wrong place: vLLM answers them, the gateway must not.
NEVER_PROXIED = [
    ("POST", "/collective_rpc"),
    ("POST", "/update_weights"),
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("POST", "/pause"),
    ("POST", "/reset_prefix_cache"),
    ("GET", "/server_info"),
    ("GET", "/metrics"),
    ("GET", "/v1/metrics"),
    ("POST", "/v1/load_lora_adapter"),
    ("GET", "/version"),
    ("POST", "/score"),
    ("POST", "/v1/tokenize"),
]


@pytest.fixture(scope="module")
def chat_large(registry) -> dict[str, Any]:
    return next(model for model in registry if model["name"] == MODEL)


def body_for(model: str, endpoint: str, **fields: Any) -> bytes:
    """The endpoint's request naming `model`, with `fields` replacing its own."""
    return json.dumps({**REQUESTS[endpoint][0], **fields, "model": model}).encode()


@pytest.mark.parametrize("endpoint", REQUESTS)
def test_vllm_path_lands_on_chat_large_at_its_backend_path(gateway_url, chat_large, clean, endpoint):
    assert endpoint in chat_large["endpoints"], "molecule.yml's chat-large declares the endpoint"
    body = body_for(MODEL, endpoint)
    response = post(gateway_url, endpoint, body, headers={"X-Request-ID": f"vllm-{endpoint}"})
    assert response.status_code == 200, response.text[:300]
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["X-Backend-Model"] == MODEL
    REQUESTS[endpoint][1](response.json())
    hits = landed(clean)
    assert [model for model, _ in hits] == [MODEL], f"landed on {list(hits)}"
    [records] = hits.values()
    assert len(records) == 1, records
    record = records[0]
    assert (record["method"], record["path"]) == ("POST", backend_path(chat_large, endpoint))
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest(), "the body reaches the backend byte for byte"
    assert (record["model"], record["request_id"]) == (MODEL, f"vllm-{endpoint}")


def test_tokenize_then_detokenize_through_the_gateway_gives_the_prompt_back(gateway_url, clean):
    prompt = "héllo wörld ✓"
    tokenized = post(gateway_url, "tokenize", body_for(MODEL, "tokenize", prompt=prompt))
    assert tokenized.status_code == 200, tokenized.text[:300]
    detokenized = post(gateway_url, "detokenize", body_for(MODEL, "detokenize", tokens=tokenized.json()["tokens"]))
    assert detokenized.status_code == 200, detokenized.text[:300]
    assert detokenized.json()["prompt"] == prompt
    paths = [record["path"] for records in landed(clean).values() for record in records]
    assert paths == ["/tokenize", "/detokenize"]


@pytest.mark.parametrize(("model", "endpoint"), [
    ("chat-small", "score"), ("chat-small", "responses"), ("gpt-4o-mini", "tokenize"), ("chat-small", "detokenize"),
    ("embed-small", "responses"),
])
def test_a_model_without_the_endpoint_is_400_and_reaches_no_backend(gateway_url, registry, clean, model, endpoint):
    declared = {name: entry["endpoints"] for entry in registry for name in [entry["name"], *entry.get("aliases", [])]}
    assert endpoint not in declared[model], "molecule.yml's registry keeps the endpoint from this model"
    assert_openai_error(post(gateway_url, endpoint, body_for(model, endpoint)), 400, "unsupported_endpoint")
    assert landed(clean) == {}


@pytest.mark.parametrize(("method", "path"), NEVER_PROXIED, ids=[f"{m} {p}" for m, p in NEVER_PROXIED])
def test_vllm_control_paths_are_404_json_and_reach_no_backend(gateway_url, clean, method, path):
    response = requests.request(method, gateway_url + path, data=json.dumps({"model": MODEL}),
                                headers={"Content-Type": "application/json", **bearer()}, timeout=10)
    assert_openai_error(response, 404)
    assert landed(clean) == {}

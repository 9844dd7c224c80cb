"""A real Infinity (all-MiniLM-L6-v2 on the CPU) behind the gateway, called with the official openai client.

The client asks for /v1/embeddings; Infinity serves /embeddings (no prefix): the
gateway maps the path from the registry's api_prefix, the client never knows.
"""

from __future__ import annotations

import math

import openai
import pytest
import requests

testinfra_hosts = ["llm_gateways"]

MODEL, ALIAS = "minilm", "text-embedding-3-small"


@pytest.fixture(scope="module")
def client(gateway_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.mark.parametrize("name", [MODEL, ALIAS])
def test_embeddings_are_384_dimensional_vectors(client, name):
    result = client.embeddings.create(model=name, input=["The cat sits on the mat."])
    [item] = result.data
    assert len(item.embedding) == 384
    assert all(isinstance(x, float) for x in item.embedding)
    assert math.isclose(math.sqrt(sum(x * x for x in item.embedding)), 1.0, rel_tol=1e-3), "normalized"
    assert result.usage.prompt_tokens > 0


def test_a_paraphrase_ranks_above_an_unrelated_sentence(client):
    texts = [
        "How do I reset my password?",
        "What are the steps to change my login password?",
        "The train to Lyon leaves at seven in the morning.",
    ]
    query, paraphrase, unrelated = (d.embedding for d in client.embeddings.create(model=MODEL, input=texts).data)
    close, far = _cosine(query, paraphrase), _cosine(query, unrelated)
    assert close > far + 0.3, f"paraphrase {close:.3f} vs unrelated {far:.3f}"


def test_batch_order_is_kept(client):
    texts = ["first sentence", "a second, different one", "first sentence"]
    data = client.embeddings.create(model=MODEL, input=texts).data
    assert [d.index for d in data] == [0, 1, 2]
    assert _cosine(data[0].embedding, data[2].embedding) > 0.9999, "same text, same vector"


def test_the_model_is_listed_and_does_not_serve_chat(client, gateway_url):
    assert MODEL in {m.id for m in client.models.list()}
    reply = requests.post(f"{gateway_url}/v1/chat/completions", timeout=10,
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"

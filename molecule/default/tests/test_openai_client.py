"""The official openai Python client, pointed at the gateway, parses every kind of answer."""

from __future__ import annotations

import openai
import pytest
from lab_pytest import api_key

testinfra_hosts = ["llm_gateways"]


@pytest.fixture(scope="module")
def client(gateway_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key(), max_retries=0, timeout=30)


def test_chat(client):
    reply = client.chat.completions.create(model="chat-small", messages=[{"role": "user", "content": "hi"}])
    assert reply.model == "chat-small"
    assert reply.choices[0].message.content


def test_chat_streamed(client):
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=3))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 3 and text


def test_completions(client):
    reply = client.completions.create(model="chat-large", prompt="Once", max_tokens=2)
    assert reply.choices[0].text


def test_embeddings(client):
    reply = client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(reply.data) == 2
    assert all(len(item.embedding) > 0 for item in reply.data)


def test_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])

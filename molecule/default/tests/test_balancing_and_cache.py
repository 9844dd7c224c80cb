"""Weighted and backup servers, the response cache and its purge, and gzip, through the lab's gateway.

The models of these tests (molecule.yml): chat-weighted (mol-gpu1 weight 3, mol-gpu2),
chat-backup (mol-gpu1, mol-gpu2 as backup; its chat answers cached) and embed-cached
(cache: true). The test backends record what reached them.
"""

from __future__ import annotations

import gzip
import json
import secrets
import time

import pytest
import requests

from lab_pytest import assert_openai_error, credential, post, wait_until

testinfra_hosts = ["llm_gateways"]

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def backend(backends, model: str, host: str):
    [found] = [b for b in backends if b.model["name"] == model and b.host == host]
    return found


def chat(gateway_url: str, model: str, **extra) -> requests.Response:
    return post(gateway_url, "chat", json.dumps({"model": model, **CHAT, **extra}).encode())


def embed(gateway_url: str, model: str, text, key_id: str = "tests", headers: dict | None = None) -> requests.Response:
    auth = {"Authorization": f"Bearer {credential(f'api-keys/{key_id}')}"}
    return post(gateway_url, "embeddings", json.dumps({"model": model, "input": text}).encode(),
                {**auth, **(headers or {})})


def purge(gateway_url: str, model: str = "", auth: bool = True) -> requests.Response:
    return requests.delete(f"{gateway_url}/admin/cache" + (f"/{model}" if model else ""), timeout=30,
                           auth=("admin", credential("admin-password")) if auth else None)


# ---------------------------------------------------------------- weights and backups


def test_weights_3_to_1_split_400_requests_within_10_percent(gateway_url, clean):
    for index in range(400):
        assert chat(gateway_url, "chat-weighted", user=str(index)).status_code == 200
    heavy = len(backend(clean, "chat-weighted", "mol-gpu1").received())
    light = len(backend(clean, "chat-weighted", "mol-gpu2").received())
    assert heavy + light == 400
    assert abs(heavy / light - 3) <= 0.3, f"split {heavy}:{light}"


def answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.fixture()
def primary_stopped(lab_host, backends):
    """chat-backup's primary server stopped for the test, started again (and answering) after it."""
    host = lab_host("mol-gpu1")
    unit = "llm-model-chat-backup.service"
    host.run_expect([0], f"systemctl stop {unit}")
    yield
    host.run_expect([0], f"systemctl start {unit}")
    assert wait_until(lambda: answers(backend(backends, "chat-backup", "mol-gpu1").url), timeout=30)


def test_backup_serves_nothing_while_the_primary_is_up(gateway_url, clean):
    for index in range(20):
        assert chat(gateway_url, "chat-backup", user=f"up-{index}").status_code == 200
    assert len(backend(clean, "chat-backup", "mol-gpu1").received()) == 20
    assert backend(clean, "chat-backup", "mol-gpu2").received() == []


def test_backup_serves_everything_once_the_primary_is_down_without_a_failed_request(gateway_url, clean,
                                                                                   primary_stopped):
    statuses = [chat(gateway_url, "chat-backup", user=f"down-{index}").status_code for index in range(20)]
    assert statuses == [200] * 20
    assert len(backend(clean, "chat-backup", "mol-gpu2").received()) == 20


def test_the_primary_takes_over_again_once_it_is_back(gateway_url, backends):
    """After the test above: once nginx's fail_timeout (10 s) is over, the primary is tried
    again, by every worker (each keeps its own count of failures)."""
    primary, standby = backend(backends, "chat-backup", "mol-gpu1"), backend(backends, "chat-backup", "mol-gpu2")

    def primary_serves() -> bool:
        primary.clear()
        standby.clear()
        statuses = [chat(gateway_url, "chat-backup", user=secrets.token_hex(4)).status_code for _ in range(8)]
        return statuses == [200] * 8 and len(primary.received()) == 8
    assert wait_until(primary_serves, timeout=30, interval=1)


# ---------------------------------------------------------------- the response cache


def test_the_same_embeddings_request_twice_is_a_hit_that_never_reaches_the_backend(gateway_url, clean):
    text = "cache me " + secrets.token_hex(4)
    first, second = embed(gateway_url, "embed-cached", text), embed(gateway_url, "embed-cached", text)
    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.headers["X-Cache-Status"], second.headers["X-Cache-Status"]) == ("MISS", "HIT")
    assert second.content == first.content
    assert len(backend(clean, "embed-cached", "mol-gpu1").received()) == 1


def test_another_input_or_key_is_a_miss_and_an_uncached_model_says_nothing(gateway_url):
    text = "keyed " + secrets.token_hex(4)
    assert embed(gateway_url, "embed-cached", text).headers["X-Cache-Status"] == "MISS"
    assert embed(gateway_url, "embed-cached", text + "?").headers["X-Cache-Status"] == "MISS"
    # One tenant never reads another's answers.
    assert embed(gateway_url, "embed-cached", text, key_id="chat-small-only").status_code == 404
    assert embed(gateway_url, "embed-cached", text, key_id="single-stream").headers["X-Cache-Status"] == "MISS"
    assert "X-Cache-Status" not in embed(gateway_url, "embed-small", text).headers


def test_a_streamed_chat_is_never_cached(gateway_url, clean):
    body = {"user": secrets.token_hex(4)}
    assert [chat(gateway_url, "chat-backup", **body).headers["X-Cache-Status"] for _ in range(2)] == ["MISS", "HIT"]
    for _ in range(2):
        reply = chat(gateway_url, "chat-backup", stream=True, **body)
        assert reply.headers["Content-Type"].startswith("text/event-stream") and "X-Cache-Status" not in reply.headers
        assert reply.text.rstrip().endswith("data: [DONE]")
    assert len(backend(clean, "chat-backup", "mol-gpu1").received()) == 3, "one chat, two streams"


def test_the_purge_path_refuses_without_credentials(gateway_url):
    reply = purge(gateway_url, "embed-cached", auth=False)
    assert_openai_error(reply, 401)
    assert reply.headers["WWW-Authenticate"].startswith("Basic")


def test_after_a_purge_of_the_model_the_next_request_is_a_miss(gateway_url):
    text = "purged " + secrets.token_hex(4)
    embed(gateway_url, "embed-cached", text)
    chat(gateway_url, "chat-backup", user=text)
    assert embed(gateway_url, "embed-cached", text).headers["X-Cache-Status"] == "HIT"
    reply = purge(gateway_url, "embed-cached")
    assert reply.status_code == 200 and reply.json()["model"] == "embed-cached" and reply.json()["purged"] >= 1
    assert embed(gateway_url, "embed-cached", text).headers["X-Cache-Status"] == "MISS"
    # Another model's entries stay until everything is purged.
    assert chat(gateway_url, "chat-backup", user=text).headers["X-Cache-Status"] == "HIT"
    assert purge(gateway_url).json()["purged"] >= 2
    assert chat(gateway_url, "chat-backup", user=text).headers["X-Cache-Status"] == "MISS"


def test_the_cache_is_on_disk_for_nginx_alone(host):
    cache = host.file("/var/cache/nginx/llm")
    assert cache.is_directory and cache.user == "www-data" and cache.mode == 0o700


# ---------------------------------------------------------------- gzip


def test_a_json_answer_is_gzipped_when_asked_for_and_byte_identical_unpacked(gateway_url):
    texts = [f"sentence {i} {secrets.token_hex(4)}" for i in range(20)]
    plain = embed(gateway_url, "embed-cached", texts, headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200 and "Content-Encoding" not in plain.headers
    packed = requests.post(f"{gateway_url}/v1/embeddings", stream=True, timeout=30,
                           json={"model": "embed-cached", "input": texts},
                           headers={"Authorization": f"Bearer {credential('api-keys/tests')}",
                                    "Accept-Encoding": "gzip"})
    assert packed.headers["X-Cache-Status"] == "HIT", "the stored answer: the same bytes"
    assert packed.headers["Content-Encoding"] == "gzip"
    raw = packed.raw.read(decode_content=False)
    assert len(raw) < len(plain.content) and gzip.decompress(raw) == plain.content


def test_a_stream_is_not_compressed_and_its_first_event_is_not_held_back(gateway_url):
    started = time.monotonic()
    with requests.post(f"{gateway_url}/v1/chat/completions", stream=True, timeout=30,
                       json={"model": "chat-weighted", **CHAT, "max_tokens": 8, "stream": True},
                       headers={"Authorization": f"Bearer {credential('api-keys/tests')}",
                                "Accept-Encoding": "gzip", "X-Test-Stream-Interval": "0.5"}) as reply:
        assert reply.status_code == 200 and "Content-Encoding" not in reply.headers
        lines = reply.iter_lines()
        first = next(line for line in lines if line)
        first_at = time.monotonic() - started
        rest = [line for line in lines if line]
        ended_at = time.monotonic() - started
    assert first.startswith(b"data: {") and rest[-1] == b"data: [DONE]"
    assert ended_at - first_at >= 2.0, "the first event came when the stream began, not with its end"

"""Weighted and backup servers, the response cache with its purge, and gzip.

One gateway with API keys on, rendered by the role and run by this host's nginx. Each
model here exists for one of these features; the backends record what reached them.
"""

from __future__ import annotations

import gzip
import http.client
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import chat
from gateway_lab import (Gateway, assert_error, basic_auth, free_port, model, nginx_missing, render_gateway,
                         start_backend, start_nginx)

HOSTS = {"gpu-a": "127.0.0.7", "gpu-b": "127.0.0.8"}
ADMIN = ("ops", secrets.token_urlsafe(16))
KEYS = {"tenant-a": "sk-" + secrets.token_urlsafe(32), "tenant-b": "sk-" + secrets.token_urlsafe(32)}

# name -> (registry hosts, endpoints, extra registry fields, backend names by host)
MODELS: dict[str, tuple[list[Any], list[str], dict[str, Any]]] = {
    "weighted": ([{"host": "gpu-a", "weight": 3}, "gpu-b"], ["chat"], {}),
    "with-backup": (["gpu-a", {"host": "gpu-b", "backup": True}], ["chat"], {}),
    "embed-cached": (["gpu-a"], ["embeddings"], {"cache": True, "aliases": ["embed-alias"]}),
    "embed-shared": (["gpu-a"], ["embeddings"], {"cache": {"endpoints": ["embeddings"], "shared": True}}),
    "chat-cached": (["gpu-b"], ["chat", "completions"], {"cache": {"endpoints": ["chat"], "valid": "10m"}}),
}


def host_of(entry: Any) -> str:
    return entry if isinstance(entry, str) else entry["host"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    registry, backends = [], {}
    for name, (hosts, endpoints, extra) in MODELS.items():
        addresses = [HOSTS[host_of(entry)] for entry in hosts]
        port = free_port(*addresses)
        aliases = extra.get("aliases", [])
        prefix = "" if "embeddings" in endpoints else "/v1"
        entry = model(name, [host_of(h) for h in hosts], port, endpoints=endpoints, aliases=aliases,
                      api_prefix=prefix)
        entry.update({"hosts": hosts, **{k: v for k, v in extra.items() if k != "aliases"}})
        registry.append(entry)
        for host in hosts:
            backends[f"{name}@{host_of(host)}"] = start_backend([name, *aliases], HOSTS[host_of(host)], port,
                                                                api_prefix=prefix)
    root = tmp_path_factory.mktemp("cache-gateway")
    http_port = free_port()
    conf = render_gateway(root, registry, HOSTS, gateway_http_port=http_port, gateway_https_port=0,
                          gateway_api_keys_required=True,
                          llm_api_keys=[{"id": key_id, "key": key, "models": "all"} for key_id, key in KEYS.items()],
                          gateway_admin_users=[{"name": ADMIN[0], "password": ADMIN[1]}],
                          gateway_address_rate_per_minute=0, gateway_address_concurrency=0,
                          gateway_key_rate_per_minute=0, gateway_key_concurrency=0)
    gateway = Gateway(root, http_port, 0, backends)
    try:
        gateway.procs.append(start_nginx(conf, http_port))
        yield gateway
    finally:
        gateway.stop()


def send(gw: Gateway, body: Any, path: str = "/v1/chat/completions", key: str = "tenant-a",
         headers: dict[str, str] | None = None) -> Any:
    return gw.request("POST", path, body, headers={"Authorization": f"Bearer {KEYS[key]}", **(headers or {})})


def embed(gw: Gateway, model_name: str, text: Any, **options: Any) -> Any:
    return send(gw, {"model": model_name, "input": text}, "/v1/embeddings", **options)


def received(gw: Gateway, backend: str) -> int:
    return len(gw.backends[backend].requests())


def purge(gw: Gateway, model_name: str = "", auth: bool = True, method: str = "DELETE") -> Any:
    path = "/admin/cache" + (f"/{model_name}" if model_name else "")
    headers = {"Authorization": basic_auth(*ADMIN)} if auth else {}
    return gw.request(method, path, headers=headers)


# ---------------------------------------------------------------- weights and backups


def test_weights_split_requests_three_to_one(gw: Gateway) -> None:
    for backend in ("weighted@gpu-a", "weighted@gpu-b"):
        gw.backends[backend].clear()
    for index in range(400):
        assert send(gw, chat("weighted", user=str(index))).status == 200
    heavy, light = received(gw, "weighted@gpu-a"), received(gw, "weighted@gpu-b")
    assert heavy + light == 400
    assert abs(heavy / light - 3) <= 0.3, f"split {heavy}:{light}"


def test_the_weight_is_in_the_upstream_of_that_model_only(gw: Gateway) -> None:
    conf = (gw.root / "llm" / "gateway.conf").read_text()
    weighted = conf[conf.index("upstream llm_weighted {"):].split("}", 1)[0]
    assert f"server {gw.backends['weighted@gpu-a'].address} weight=3 " in weighted
    assert f"server {gw.backends['weighted@gpu-b'].address} max_fails" in weighted
    backup = conf[conf.index("upstream llm_with_backup {"):].split("}", 1)[0]
    assert backup.count(" backup;") == 1 and "weight=" not in backup


def test_backup_gets_nothing_while_the_primary_is_up_then_everything_without_a_failure(gw: Gateway) -> None:
    primary, backup = gw.backends["with-backup@gpu-a"], gw.backends["with-backup@gpu-b"]
    primary.clear()
    backup.clear()
    for index in range(20):
        assert send(gw, chat("with-backup", user=str(index))).status == 200
    assert (len(primary.requests()), len(backup.requests())) == (20, 0)
    primary.proc.kill()
    primary.proc.wait()
    statuses = [send(gw, chat("with-backup", user=f"after-{index}")).status for index in range(20)]
    assert statuses == [200] * 20, "no request fails across the switch"
    assert len(backup.requests()) == 20


# ---------------------------------------------------------------- the response cache


def test_the_same_embeddings_request_twice_is_a_hit_that_never_reaches_the_backend(gw: Gateway) -> None:
    backend = gw.backends["embed-cached@gpu-a"]
    backend.clear()
    text = "cache me " + secrets.token_hex(4)
    first, second = embed(gw, "embed-cached", text), embed(gw, "embed-cached", text)
    assert (first.status, second.status) == (200, 200)
    assert first.headers["X-Cache-Status"] == "MISS" and second.headers["X-Cache-Status"] == "HIT"
    assert second.body == first.body
    assert second.headers["X-Request-ID"] and second.headers["X-Request-ID"] != first.headers["X-Request-ID"]
    assert len(backend.requests()) == 1


def test_another_input_model_name_or_key_is_a_miss(gw: Gateway) -> None:
    text = "keyed " + secrets.token_hex(4)
    assert embed(gw, "embed-cached", text).headers["X-Cache-Status"] == "MISS"
    assert embed(gw, "embed-cached", text + "!").headers["X-Cache-Status"] == "MISS"
    # Another tenant never reads this one's answers.
    assert embed(gw, "embed-cached", text, key="tenant-b").headers["X-Cache-Status"] == "MISS"
    assert embed(gw, "embed-cached", text, key="tenant-b").headers["X-Cache-Status"] == "HIT"
    # The alias is another body (its "model" differs), so another entry, of the same model.
    assert embed(gw, "embed-alias", text).headers["X-Cache-Status"] == "MISS"
    # Another model with the same input.
    assert embed(gw, "embed-shared", text).headers["X-Cache-Status"] == "MISS"


def test_a_model_that_shares_its_answers_serves_every_key_from_one_entry(gw: Gateway) -> None:
    text = "shared " + secrets.token_hex(4)
    assert embed(gw, "embed-shared", text, key="tenant-a").headers["X-Cache-Status"] == "MISS"
    assert embed(gw, "embed-shared", text, key="tenant-b").headers["X-Cache-Status"] == "HIT"


def test_cache_control_no_cache_asks_for_a_fresh_answer(gw: Gateway) -> None:
    backend = gw.backends["embed-cached@gpu-a"]
    text = "fresh " + secrets.token_hex(4)
    embed(gw, "embed-cached", text)
    backend.clear()
    fresh = embed(gw, "embed-cached", text, headers={"Cache-Control": "no-cache"})
    assert fresh.status == 200 and fresh.headers["X-Cache-Status"] == "BYPASS"
    assert len(backend.requests()) == 1


def test_errors_are_never_cached(gw: Gateway) -> None:
    backend = gw.backends["embed-cached@gpu-a"]
    backend.clear()
    bad = {"model": "embed-cached", "input": "x", "encoding_format": "int8"}
    replies = [send(gw, bad, "/v1/embeddings") for _ in range(2)]
    assert [r.status for r in replies] == [400, 400]
    assert len(backend.requests()) == 2


def test_a_cached_chat_is_a_hit_but_a_streamed_one_never_is(gw: Gateway) -> None:
    backend = gw.backends["chat-cached@gpu-b"]
    backend.clear()
    body = chat("chat-cached", user=secrets.token_hex(4))
    assert [send(gw, body).headers["X-Cache-Status"] for _ in range(2)] == ["MISS", "HIT"]
    streamed = {**body, "stream": True}
    for _ in range(2):
        reply = send(gw, streamed)
        assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
        assert "X-Cache-Status" not in reply.headers and b"data: [DONE]" in reply.body
    assert len(backend.requests()) == 3, "one chat, two streams"
    # An endpoint of the model that is not in its cache list.
    completion = {"model": "chat-cached", "prompt": "hi"}
    assert "X-Cache-Status" not in send(gw, completion, "/v1/completions").headers


def test_purge_needs_the_admin_password(gw: Gateway) -> None:
    reply = purge(gw, "embed-cached", auth=False)
    assert_error(reply, 401)
    assert reply.headers["WWW-Authenticate"].startswith("Basic")
    bearer = gw.request("DELETE", "/admin/cache", headers={"Authorization": f"Bearer {KEYS['tenant-a']}"})
    assert bearer.status == 401, "an API key is not an admin credential"


def test_purge_of_one_model_leaves_the_others(gw: Gateway) -> None:
    text = "purge " + secrets.token_hex(4)
    for name in ("embed-cached", "embed-shared"):
        embed(gw, name, text)
        assert embed(gw, name, text).headers["X-Cache-Status"] == "HIT"
    reply = purge(gw, "embed-alias")
    assert reply.status == 200, reply.body
    answer = reply.json()
    assert answer["model"] == "embed-cached" and answer["purged"] >= 1
    assert embed(gw, "embed-cached", text).headers["X-Cache-Status"] == "MISS"
    assert embed(gw, "embed-shared", text).headers["X-Cache-Status"] == "HIT"


def test_purge_of_everything(gw: Gateway) -> None:
    text = "all " + secrets.token_hex(4)
    embed(gw, "embed-shared", text)
    send(gw, chat("chat-cached", user=text))
    reply = purge(gw)
    assert reply.status == 200 and reply.json()["model"] is None and reply.json()["purged"] >= 2
    assert embed(gw, "embed-shared", text).headers["X-Cache-Status"] == "MISS"
    assert send(gw, chat("chat-cached", user=text)).headers["X-Cache-Status"] == "MISS"


def test_purge_of_an_unknown_model_or_with_another_method(gw: Gateway) -> None:
    assert_error(purge(gw, "no-such-model"), 404, "model_not_found")
    reply = purge(gw, "embed-cached", method="POST")
    assert_error(reply, 405, "method_not_allowed")
    assert reply.headers["Allow"] == "DELETE"


# ---------------------------------------------------------------- gzip


def test_a_json_answer_is_gzipped_when_asked_for_and_the_same_bytes_unpacked(gw: Gateway) -> None:
    texts = [f"sentence {i} {secrets.token_hex(4)}" for i in range(20)]
    plain = embed(gw, "embed-cached", texts)
    assert plain.status == 200 and "Content-Encoding" not in plain.headers and len(plain.body) > 1024
    packed = embed(gw, "embed-cached", texts, headers={"Accept-Encoding": "gzip"})
    assert packed.headers["X-Cache-Status"] == "HIT", "the stored answer, so the bytes must be equal"
    assert packed.headers["Content-Encoding"] == "gzip" and packed.headers["Vary"] == "Accept-Encoding"
    assert len(packed.body) < len(plain.body)
    assert gzip.decompress(packed.body) == plain.body


def test_a_stream_is_not_compressed_and_its_first_event_is_not_held_back(gw: Gateway) -> None:
    conn = gw.connect(timeout=30)
    body = json.dumps(chat("weighted", stream=True, max_tokens=8)).encode()
    started = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body=body, headers={
        "Content-Type": "application/json", "Accept-Encoding": "gzip", "Authorization": f"Bearer {KEYS['tenant-a']}",
        # Events 0.5 s apart: a compressor holding them back would show as one late block.
        "X-Test-Stream-Interval": "0.5"})
    response: http.client.HTTPResponse = conn.getresponse()
    assert response.status == 200 and response.headers.get("Content-Encoding") is None
    first = response.readline()
    first_at = time.monotonic() - started
    rest = response.read()
    ended_at = time.monotonic() - started
    conn.close()
    assert first.startswith(b"data: {") and rest.rstrip().endswith(b"data: [DONE]")
    assert ended_at - first_at >= 2.0, "the first event came when the stream began, not with its end"

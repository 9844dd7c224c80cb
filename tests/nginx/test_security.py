"""API keys, per-key model access, rate and concurrency limits, admin paths and the backends' own keys.

One gateway with keys on, rendered by the role and run by this host's nginx, over TLS.
Each test names the key it uses; what a key may do is set in KEYS.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import chat
from gateway_lab import (Gateway, assert_error, basic_auth, free_port, model, nginx_missing, render_gateway,
                         start_backend, start_nginx)

HOSTS = {"gpu-a": "127.0.0.6"}
ADMIN = ("ops", secrets.token_urlsafe(16))
BACKEND_KEYS = {"chat-a": secrets.token_urlsafe(24), "chat-b": secrets.token_urlsafe(24)}


def new_key() -> str:
    return "sk-" + secrets.token_urlsafe(32)


KEYS = {
    "everything": {"key": new_key(), "models": "all"},
    "only-a": {"key": new_key(), "models": ["gpt-a"]},  # an alias of chat-a
    "expired": {"key": new_key(), "models": "all", "expires": "2020-01-01"},
    "slow": {"key": new_key(), "models": "all", "rate_per_minute": 2, "burst": 0},
    "single": {"key": new_key(), "models": "all", "concurrency": 1},
}


def bearer(key_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key_id]['key']}"}


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    ports = {"chat-a": free_port(HOSTS["gpu-a"]), "chat-b": free_port(HOSTS["gpu-a"])}
    backends = {name: start_backend([name, *aliases], HOSTS["gpu-a"], ports[name], api_key=BACKEND_KEYS[name])
                for name, aliases in (("chat-a", ["gpt-a"]), ("chat-b", []))}
    root = tmp_path_factory.mktemp("secure-gateway")
    models = [model("chat-a", ["gpu-a"], ports["chat-a"], aliases=["gpt-a"],
                    endpoints=["chat", "completions", "embeddings"]),
              model("chat-b", ["gpu-a"], ports["chat-b"], endpoints=["chat", "completions", "embeddings"])]
    http_port, https_port = free_port(), free_port()
    conf = render_gateway(
        root, models, HOSTS, gateway_http_port=http_port, gateway_https_port=https_port,
        gateway_http_api="refuse", gateway_api_keys_required=True,
        llm_api_keys=[{"id": key_id, **entry} for key_id, entry in KEYS.items()],
        llm_backend_api_keys=BACKEND_KEYS,
        gateway_admin_users=[{"name": ADMIN[0], "password": ADMIN[1]}],
        gateway_address_rate_per_minute=0, gateway_address_concurrency=0)
    gw = Gateway(root, http_port, https_port, backends)
    try:
        gw.procs.append(start_nginx(conf, https_port))
        yield gw
    finally:
        gw.stop()


def send(gw: Gateway, key_id: str | None, body: Any, path: str = "/v1/chat/completions",
         headers: dict[str, str] | None = None) -> Any:
    auth = bearer(key_id) if key_id else {}
    return gw.request("POST", path, body, headers={**auth, **(headers or {})}, tls=True)


# ---------------------------------------------------------------- who may call


@pytest.mark.parametrize("authorization, reason", [
    (None, "missing"),
    ("Bearer sk-" + "x" * 40, "unknown"),
    ("Basic dXNlcjpwYXNz", "malformed"),
    ("Bearer", "malformed"),
    ("Bearer two words", "malformed"),
])
def test_requests_without_a_valid_key_get_401(secure: Gateway, authorization: str | None, reason: str) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    reply = secure.request("POST", "/v1/chat/completions", chat("chat-a"), headers=headers, tls=True)
    error = assert_error(reply, 401, "invalid_api_key")
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    if authorization and " " in authorization:
        assert authorization.split(" ", 1)[1] not in reply.body.decode(), "the key is echoed"
    assert secure.served()["chat-a"] == [] or all(r["path"] == "/health" for r in secure.served()["chat-a"])
    assert reason in {"missing", "unknown", "malformed"} and error["message"]


def test_an_expired_key_gets_401_and_is_not_echoed(secure: Gateway) -> None:
    reply = send(secure, "expired", chat("chat-a"))
    assert_error(reply, 401, "expired_api_key")
    assert KEYS["expired"]["key"] not in reply.body.decode()


def test_models_list_is_what_the_key_may_use(secure: Gateway) -> None:
    def listed(key_id: str) -> list[str]:
        reply = secure.request("GET", "/v1/models", headers=bearer(key_id), tls=True)
        assert reply.status == 200, reply.body
        return sorted(entry["id"] for entry in reply.json()["data"])

    assert listed("everything") == ["chat-a", "chat-b"]
    assert listed("only-a") == ["chat-a"]
    assert_error(secure.request("GET", "/v1/models", tls=True), 401, "invalid_api_key")
    assert_error(secure.request("GET", "/v1/models/chat-b", headers=bearer("only-a"), tls=True),
                 404, "model_not_found")


BODIES = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
          "/v1/completions": {"prompt": "hi"}, "/v1/embeddings": {"input": "hi"}}


@pytest.mark.parametrize("path", sorted(BODIES))
def test_a_model_outside_the_keys_list_is_answered_as_unknown(secure: Gateway, path: str) -> None:
    """The same status, code and message shape as a model that does not exist: a key cannot probe."""
    outside = assert_error(send(secure, "only-a", {"model": "chat-b", **BODIES[path]}, path),
                           404, "model_not_found")
    unknown = assert_error(send(secure, "only-a", {"model": "no-such", **BODIES[path]}, path),
                           404, "model_not_found")
    assert outside["message"].replace("chat-b", "NAME") == unknown["message"].replace("no-such", "NAME")
    reply = send(secure, "only-a", {"model": "chat-a", **BODIES[path]}, path)
    assert reply.status == 200, reply.body


@pytest.mark.parametrize("raw", [
    b'{"model": "chat-a", "messages": [], "model": "chat-b"}',             # the last one counts
    b'{"model": "chat-b", "x": {"model": "chat-a"}, "messages": []}',       # nested ones do not
    b'{"messages": [{"model": "chat-a"}], "model": "chat-b"}',
    b'{"mod\\u0065l": "chat-b", "messages": []}',                           # escapes: njs decides
    b'{"model": "chat-\\u0062", "messages": []}',
])
def test_tricky_bodies_cannot_reach_a_model_the_key_may_not_use(secure: Gateway, raw: bytes) -> None:
    secure.backends["chat-b"].clear()
    reply = secure.request("POST", "/v1/chat/completions", raw=raw, headers=bearer("only-a"), tls=True)
    assert_error(reply, 404, "model_not_found")
    assert [r for r in secure.backends["chat-b"].requests() if r["path"] != "/health"] == []


# ---------------------------------------------------------------- what the backend sees


def test_the_backend_gets_its_own_key_never_the_clients(secure: Gateway) -> None:
    secure.backends["chat-a"].clear()
    reply = send(secure, "everything", chat("chat-a"))
    assert reply.status == 200, reply.body
    received = [r for r in secure.backends["chat-a"].requests() if r["path"] != "/health"]
    assert len(received) == 1
    headers = {name.lower(): value for name, value in received[0]["headers"].items()}
    authorization = headers["authorization"]
    authorization = authorization[0] if isinstance(authorization, list) else authorization
    assert authorization == f"Bearer {BACKEND_KEYS['chat-a']}"
    assert KEYS["everything"]["key"] not in json.dumps(received)


def test_the_access_log_names_the_key_id_and_no_key(secure: Gateway) -> None:
    reply = send(secure, "only-a", chat("gpt-a"), headers={"X-Request-ID": "key-log-1"})
    assert reply.status == 200, reply.body
    entry = secure.logged({"key-log-1"})["key-log-1"]
    assert entry["api_key_id"] == "only-a"
    assert entry["model"] == "chat-a"
    time.sleep(1.2)  # the log buffer is flushed every second
    text = (secure.root / "logs" / "llm-access.log").read_text() + secure.error_log()
    for entry in KEYS.values():
        assert entry["key"] not in text
    for path in (secure.root / "llm").iterdir():
        content = path.read_bytes()
        assert not any(entry["key"].encode() in content for entry in KEYS.values()), path


# ---------------------------------------------------------------- limits


def test_past_its_rate_a_key_gets_429_with_retry_after(secure: Gateway) -> None:
    first = send(secure, "slow", chat("chat-a"))
    assert first.status == 200, first.body
    second = send(secure, "slow", chat("chat-a"))
    assert_error(second, 429, "rate_limit_exceeded")
    assert second.headers["Retry-After"] == "30"  # 2 a minute: one every 30 s
    # Another key is not held back by it.
    assert send(secure, "everything", chat("chat-a")).status == 200


def test_the_concurrency_cap_holds_with_parallel_streams(secure: Gateway) -> None:
    statuses: list[int] = []

    def stream() -> None:
        statuses.append(send(secure, "single", chat("chat-a", stream=True, max_tokens=8)).status)

    first = threading.Thread(target=stream)
    first.start()
    time.sleep(0.5)  # the first stream is running (a chunk every 0.2 s)
    reply = send(secure, "single", chat("chat-a", stream=True))
    first.join()
    assert_error(reply, 429, "concurrency_limit_exceeded")
    assert reply.headers["Retry-After"] == "1"
    assert statuses == [200]
    assert send(secure, "single", chat("chat-a")).status == 200  # the slot is free again


def test_past_the_address_rate_every_key_gets_429(tmp_path: Path) -> None:
    backend = start_backend(["chat-a"], HOSTS["gpu-a"], port := free_port(HOSTS["gpu-a"]))
    conf = render_gateway(tmp_path, [model("chat-a", ["gpu-a"], port)], HOSTS,
                          gateway_http_port=(http_port := free_port()), gateway_https_port=0,
                          gateway_api_keys_required=True, llm_api_keys=[{"id": "k", **KEYS["everything"]}],
                          gateway_address_rate_per_minute=1, gateway_address_burst=1)
    proc = start_nginx(conf, http_port)
    gw = Gateway(tmp_path, http_port, 0, {"chat-a": backend}, [proc])
    try:
        headers = bearer("everything")
        statuses = [gw.request("POST", "/v1/chat/completions", chat("chat-a"), headers=headers).status
                    for _ in range(2)]
        third = gw.request("POST", "/v1/chat/completions", chat("chat-a"), headers=headers)
    finally:
        gw.stop()
    assert statuses == [200, 200]  # the rate and a burst of one
    assert_error(third, 429, "rate_limit_exceeded")
    assert third.headers["Retry-After"] == "60"


# ---------------------------------------------------------------- admin, plain HTTP, TLS headers


def test_admin_paths_need_the_htpasswd_user(secure: Gateway) -> None:
    reply = secure.request("GET", "/ready", tls=True)
    assert_error(reply, 401, "admin_credentials_required")
    assert reply.headers["WWW-Authenticate"].startswith("Basic")
    assert_error(secure.request("GET", "/ready", headers={"Authorization": basic_auth(ADMIN[0], "wrong")},
                                tls=True), 401)
    # An API key is not an admin credential.
    assert_error(secure.request("GET", "/ready", headers=bearer("everything"), tls=True), 401)
    assert secure.request("GET", "/ready", headers={"Authorization": basic_auth(*ADMIN)}, tls=True).status == 200


def test_plain_http_refuses_the_api_with_a_json_error(secure: Gateway) -> None:
    reply = secure.request("POST", "/v1/chat/completions", chat("chat-a"), headers=bearer("everything"))
    assert_error(reply, 403, "https_required")
    assert "https" in reply.json()["error"]["message"].lower()
    assert secure.request("GET", "/health").status == 200


def test_answers_over_tls_carry_hsts(secure: Gateway) -> None:
    reply = send(secure, "everything", chat("chat-a"))
    assert reply.headers["Strict-Transport-Security"].startswith("max-age=")
    assert "nginx/" not in (reply.headers.get("Server") or "")

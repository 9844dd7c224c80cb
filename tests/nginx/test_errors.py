"""nginx's own errors as OpenAI-shaped JSON, through a real nginx: no HTML, no 5xx for a client's mistake."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import pytest
from conftest import HOSTS, chat
from gateway_lab import (Gateway, assert_error, free_port, model, post_json, render_gateway, start_backend, start_nginx,
                         stop)
from http_reply import exchange

@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"", 400, "invalid_body"),
    (b"not json", 400, "invalid_body"),
    (b'{"model": "chat-small",', 400, "invalid_body"),
    (b"[]", 400, "invalid_body"),
    (b'{"messages": []}', 400, "missing_model"),
    (b'{"model": "nope"}', 404, "model_not_found"),
])
def test_bad_requests_are_json_errors(gateway: Gateway, raw: bytes, status: int, code: str) -> None:
    assert_error(gateway.request("POST", "/v1/chat/completions", raw=raw), status, code)


def test_model_on_wrong_endpoint(gateway: Gateway) -> None:
    error = assert_error(gateway.request("POST", "/v1/embeddings", {"model": "chat-small", "input": "x"}), 400,
                         "unsupported_endpoint")
    assert "/v1/chat/completions" in error["message"]
    assert_error(gateway.request("POST", "/v1/chat/completions", chat("embed-small")), 400, "unsupported_endpoint")


def test_body_over_limit_is_413_json(gateway: Gateway) -> None:
    raw = b'{"model":"chat-small","x":"' + b"a" * (16 * 1024 * 1024) + b'"}'
    error = assert_error(gateway.request("POST", "/v1/chat/completions", raw=raw), 413, "request_too_large")
    assert "16m" in error["message"]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/chat/completions", 405),
    ("PUT", "/v1/embeddings", 405),
    ("POST", "/v1/models", 405),
    ("GET", "/v1/nothing", 404),
    ("GET", "/", 404),
    ("POST", "/v1/chat/completions/x", 404),
])
def test_no_html_error_pages(gateway: Gateway, method: str, path: str, status: int) -> None:
    reply = gateway.request(method, path, body=chat("chat-small") if method != "GET" else None)
    assert_error(reply, status)
    assert b"<html" not in reply.body
    if status == 405 and path != "/v1/models":
        assert reply.headers["Allow"] == "POST"
    assert all(not rs for rs in gateway.served().values())


def test_all_servers_down_is_503_json_with_retry_after(gateway: Gateway) -> None:
    reply = gateway.request("POST", "/v1/chat/completions", chat("down-model"))
    error = assert_error(reply, 503, "model_unavailable")
    assert "down-model" in error["message"]
    assert reply.headers["Retry-After"] == "5"


def test_upstream_timeout_is_504_json(gateway: Gateway) -> None:
    gateway.backends["large"].control("POST", "/_test/behaviour", {"mode": "hang"})
    try:
        assert_error(gateway.request("POST", "/v1/chat/completions", chat("chat-large")), 504, "upstream_timeout")
    finally:
        gateway.backends["large"].control("POST", "/_test/behaviour", {"mode": "ok"})
    # Once: a request that reached a backend is not repeated on another one.
    assert len(gateway.backends["large"].requests()) == 1


def test_connect_timeout_on_every_server_is_503(tmp_path: Path) -> None:
    """A server that never accepts (a host gone silent) is unavailable, not slow: 503, not 504.

    The stand-in listens with a backlog of 0 and one connection already queued, so the
    kernel drops the gateway's SYNs and its connects time out, all on 127.0.0.1.
    """
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    queued = socket.create_connection(silent.getsockname(), timeout=2)
    try:
        with pytest.raises(OSError):
            socket.create_connection(silent.getsockname(), timeout=0.5).close()
        conf = render_gateway(tmp_path, [model("gone-model", ["gpu-a"], silent.getsockname()[1], ["chat"])],
                              {"gpu-a": "127.0.0.1"}, gateway_http_port=(port := free_port()), gateway_https_port=0,
                              gateway_proxy_connect_timeout="1s")
        proc = start_nginx(conf, port)
        try:
            reply = post_json(port, json.dumps(chat("gone-model")).encode(), timeout=20)
        finally:
            stop(proc)
    finally:
        queued.close()
        silent.close()
    error = assert_error(reply, 503, "model_unavailable")
    assert "gone-model" in error["message"]
    assert reply.headers["Retry-After"] == "5"


def test_backend_error_bodies_pass_through(gateway: Gateway) -> None:
    gateway.backends["large"].control("POST", "/_test/behaviour", {"mode": "fail", "status": 503})
    reply = gateway.request("POST", "/v1/chat/completions", chat("chat-large"))
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "injected_failure"


def test_one_server_down_retries_to_the_other(gateway: Gateway, tmp_path: Path) -> None:
    """Connection refused on one server of a model: every request still succeeds."""
    port_of_both = free_port("127.0.0.2", "127.0.0.3")
    spare = start_backend(["chat-large"], "127.0.0.3", port_of_both)
    conf = render_gateway(tmp_path, [model("chat-large", ["gpu-a", "gpu-b"], port_of_both, ["chat"])], HOSTS,
                          gateway_http_port=(port := free_port()), gateway_https_port=0,
                          gateway_upstream_balance="round_robin", gateway_upstream_fail_timeout="1s")
    proc = start_nginx(conf, port)
    try:
        failures = 0
        for _ in range(200):
            failures += post_json(port, json.dumps(chat("chat-large")).encode()).status != 200
        assert failures == 0
        assert len(spare.requests()) == 200
    finally:
        stop(proc)
        stop(spare.proc)


# ---------------------------------------------------------------- streaming




def test_ready_from_another_address_is_403_json(tmp_path: Path) -> None:
    """The admin paths are only for gateway_admin_allow; everyone else gets a JSON 403, not nginx's page."""
    conf = render_gateway(tmp_path, [model("chat-small", ["gpu-a"], free_port())], {"gpu-a": "127.0.0.1"},
                          gateway_http_port=(port := free_port()), gateway_https_port=0,
                          gateway_admin_allow=["192.0.2.1"],
                          gateway_admin_users=[{"name": "ops", "password": "ops-password-for-tests"}])
    proc = start_nginx(conf, port)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        reply = exchange(conn, "GET", "/ready", None, {})
    finally:
        stop(proc)
    assert_error(reply, 403, "permission_denied")

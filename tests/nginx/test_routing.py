"""Routing, streaming, models, readiness, request ids and the access log, through a real nginx.

The gateway is the one tests/nginx/conftest.py renders from the role; every check looks at
what the client got and, where routing matters, at what the backend received.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN, HOSTS, chat
from gateway_lab import (Gateway, assert_error, basic_auth, free_port, model, nginx_missing, post_json, refuse_njs_routes,
                         render_gateway, start_backend, start_nginx, stop)

# ---------------------------------------------------------------- routing

@pytest.mark.parametrize(("model", "backend_model"), [
    ("chat-small", "chat-small"), ("gpt-4o-mini", "chat-small"), ("chat-large", "chat-large"),
])
def test_routes_by_model_and_alias(gateway: Gateway, model: str, backend_model: str) -> None:
    reply = gateway.request("POST", "/v1/chat/completions", chat(model))
    assert reply.status == 200, reply.body
    assert reply.headers["X-Backend-Model"] == backend_model
    assert reply.json()["backend"]["path"] == "/v1/chat/completions"


def test_embeddings_path_mapped_to_backend_prefix(gateway: Gateway) -> None:
    reply = gateway.request("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"})
    assert reply.status == 200, reply.body
    got = gateway.backends["embed"].requests()
    assert [(r["path"], r["model"]) for r in got] == [("/embeddings", "text-embedding-3-small")]
    reply = gateway.request("POST", "/v1/rerank", {"model": "embed-small", "query": "q", "documents": ["a", "b"]})
    assert reply.status == 200, reply.body
    assert gateway.backends["embed"].requests()[-1]["path"] == "/rerank"


def test_completions_path(gateway: Gateway) -> None:
    reply = gateway.request("POST", "/v1/completions", {"model": "chat-large", "prompt": "hi"})
    assert reply.status == 200, reply.body
    assert gateway.backends["large"].requests()[-1]["path"] == "/v1/completions"


def test_both_servers_of_a_model_are_used(gateway: Gateway) -> None:
    for _ in range(20):
        assert gateway.request("POST", "/v1/chat/completions", chat("chat-small")).status == 200
    got = gateway.served()
    assert len(got["small-a"]) > 0 and len(got["small-b"]) > 0
    assert len(got["small-a"]) + len(got["small-b"]) == 20


def test_one_megabyte_body_arrives_byte_for_byte(gateway: Gateway) -> None:
    raw = json.dumps({"messages": [{"role": "user", "content": "é lorem ipsum " * 80_000}],
                      "tools": [{"model": "chat-large"}], "model": "chat-small"}).encode()
    assert len(raw) > 1_000_000
    reply = gateway.request("POST", "/v1/chat/completions", raw=raw)
    assert reply.status == 200, reply.body[:300]

def test_names_with_slashes_colons_and_dots_route_without_njs(tmp_path: Path) -> None:
    """Every character the registry allows in a name works in nginx's maps and location names."""
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    names = ["Qwen/Qwen2.5-7B-Instruct", "qwen:7b.v1"]
    backend = start_backend(names, api_prefix="")
    conf = render_gateway(tmp_path, [model(names[0], ["gpu-a"], backend.port, ["chat"], names[1:], api_prefix="")],
                          {"gpu-a": "127.0.0.1"}, gateway_http_port=(port := free_port()), gateway_https_port=0)
    refuse_njs_routes(tmp_path)
    proc = start_nginx(conf, port)
    try:
        for name in names:
            for pad in ("", "p" * 100_000):
                reply = post_json(port, json.dumps(chat(name, pad=pad)).encode(), "/v1/chat/completions?trace=1")
                assert reply.status == 200, reply.body[:200]
        # The empty API prefix (Infinity's): /v1/chat/completions -> /chat/completions.
        assert {(r["path"], r["model"]) for r in backend.requests()} == {("/chat/completions", name) for name in names}
    finally:
        stop(proc)
        stop(backend.proc)



@pytest.mark.parametrize("tls", [False, True])
def test_stream_events_arrive_as_sent(gateway: Gateway, tls: bool) -> None:
    conn = gateway.connect(tls)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(chat("chat-small", stream=True, max_tokens=6)),
                 headers={"Content-Type": "application/json", "X-Test-Stream-Interval": "0.3"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    start, arrivals, buffer = time.monotonic(), [], b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            arrivals.append((time.monotonic() - start, event))
    conn.close()
    assert arrivals[-1][1] == b"data: [DONE]"
    content_times = [t for t, e in arrivals if b'"content"' in e]
    assert len(content_times) >= 4
    # Paced 0.3 s apart at the backend: buffering would deliver them all together at the end.
    # (The backend sends its first two content events together, like vLLM's role and first token.)
    gaps = [b - a for a, b in zip(content_times[1:], content_times[2:])]
    assert min(gaps) > 0.15, gaps
    assert content_times[0] < content_times[-1] - 0.6


# ---------------------------------------------------------------- models, health, readiness


def test_models_list_is_the_canonical_registry(gateway: Gateway) -> None:
    reply = gateway.request("GET", "/v1/models")
    assert reply.status == 200
    body = reply.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["chat-small", "chat-large", "embed-small", "down-model"]
    for entry in body["data"]:
        assert entry["object"] == "model" and isinstance(entry["created"], int) and entry["owned_by"]


def test_model_lookup_by_alias_and_unknown(gateway: Gateway) -> None:
    assert gateway.request("GET", "/v1/models/gpt-4o-mini").json()["id"] == "chat-small"
    assert gateway.request("GET", "/v1/models/embed-small").json()["id"] == "embed-small"
    assert_error(gateway.request("GET", "/v1/models/nope"), 404, "model_not_found")


def test_health_and_readiness(gateway: Gateway) -> None:
    assert gateway.request("GET", "/health").status == 200
    assert_error(gateway.request("GET", "/ready"), 401, "admin_credentials_required")
    reply = gateway.request("GET", "/ready", headers={"Authorization": basic_auth(*ADMIN)})
    assert reply.status == 503  # down-model has no live server
    body = reply.json()
    live = {u["model"]: u["live"] for u in body["upstreams"]}
    assert live == {"chat-large": 1, "chat-small": 2, "down-model": 0, "embed-small": 1}
    down = next(u for u in body["upstreams"] if u["model"] == "down-model")
    assert {s["address"].split(":")[0] for s in down["servers"]} == {HOSTS["gpu-c"], HOSTS["gpu-d"]}


# ---------------------------------------------------------------- request ids and the access log


def test_request_id_kept_or_made_and_logged(gateway: Gateway) -> None:
    reply = gateway.request("POST", "/v1/chat/completions", chat("chat-large"), headers={"X-Request-ID": "abc-123"})
    assert reply.headers.get_all("X-Request-ID") == ["abc-123"], "returned once, not doubled by the backend's echo"
    assert gateway.backends["large"].requests()[-1]["request_id"] == "abc-123"
    reply = gateway.request("POST", "/v1/chat/completions", chat("chat-large"),
                            headers={"X-Request-ID": "bad id\" with junk"})
    made = reply.headers["X-Request-ID"]
    # gateway_request_id: sequence, with the tag render_gateway passes.
    assert re.fullmatch(r"0123abcd-[0-9]+\.[0-9]{3}-[0-9]+-[0-9]+", made), made
    assert gateway.backends["large"].requests()[-1]["request_id"] == made
    others = {gateway.request("GET", "/v1/nothing").headers["X-Request-ID"] for _ in range(5)}
    assert len(others | {made}) == 6, "every request gets its own id"


def test_random_request_ids_are_nginx_request_id(tmp_path: Path) -> None:
    """gateway_request_id: random hands the choice to nginx's $request_id (32 hex digits)."""
    conf = render_gateway(tmp_path, [model("chat-small", ["gpu-a"], free_port())], {"gpu-a": "127.0.0.1"},
                          gateway_http_port=(port := free_port()), gateway_https_port=0, gateway_request_id="random")
    proc = start_nginx(conf, port)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v1/nothing")
        made = conn.getresponse().headers["X-Request-ID"]
        conn.close()
    finally:
        stop(proc)
    assert re.fullmatch(r"[0-9a-f]{32}", made), made


def test_access_log_is_json_per_request(gateway: Gateway) -> None:
    gateway.request("POST", "/v1/chat/completions", chat("gpt-4o-mini", stream=True),
                    headers={"X-Request-ID": "log-stream-1"})
    gateway.request("POST", "/v1/chat/completions", chat("nope"), headers={"X-Request-ID": "log-404-1"})
    entries = gateway.logged({"log-stream-1", "log-404-1"})
    streamed = entries["log-stream-1"]
    assert streamed["model"] == "chat-small" and streamed["model_requested"] == "gpt-4o-mini"
    assert streamed["stream"] is True and streamed["status"] == 200
    assert streamed["upstream"] == "llm_chat_small"
    assert streamed["upstream_addr"] in {b.address for b in gateway.backends.values()}
    assert streamed["api_key_id"] == "" and streamed["bytes_in"] > 0 and streamed["bytes_out"] > 0
    assert entries["log-404-1"]["status"] == 404 and entries["log-404-1"]["stream"] is False


def test_access_log_stays_json_whatever_the_client_sends(gateway: Gateway) -> None:
    """Routed requests log without escaping (nothing in them can need it); the rest escape.

    Names with a quote, a backslash or a control character never reach a model's location,
    and a name that differs in case leaves it for njs through the escaping log.
    """
    sent = {"log-routed-1": "chat-small", "log-quote-1": 'nope"}, "x": "', "log-backslash-1": "no\\pe",
            "log-control-1": "no\u0001pe", "log-case-1": "CHAT-SMALL"}
    for request_id, model in sent.items():
        gateway.request("POST", "/v1/chat/completions", chat(model), headers={"X-Request-ID": request_id})
    gateway.request("POST", '/v1/chat/completions?"}{"x', chat("chat-small"), headers={"X-Request-ID": "log-query-1"})
    # Every line must parse: one unescaped quote would break the line it is in.
    entries = gateway.logged({*sent, "log-query-1"})
    assert entries["log-routed-1"]["status"] == 200 and entries["log-routed-1"]["upstream"] == "llm_chat_small"
    assert entries["log-query-1"]["status"] == 200 and entries["log-query-1"]["path"] == "/v1/chat/completions"
    for request_id in ("log-quote-1", "log-backslash-1", "log-control-1", "log-case-1"):
        assert entries[request_id]["status"] == 404, request_id
        assert entries[request_id]["model_requested"] == sent[request_id], request_id

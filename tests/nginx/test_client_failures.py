"""No client can take a model out: failures a request provokes after it reached a server.

A request whose body makes the backend drop the connection (the test backend does it for
`"user": "_test_drop_connection"`, as a crashing engine would) fails by itself. With
nginx's passive check (`max_fails=1`) two of them mark both servers failed and every
client gets 503 for fail_timeout; with the health agent's server lines (`max_fails=0`)
nothing is marked and another client's requests keep succeeding.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from gateway_lab import free_port, model, nginx_missing, post_json, render_gateway, start_backend, start_nginx, stop

HOSTS = {"gpu-a": "127.0.0.31", "gpu-b": "127.0.0.32"}
DROPS, REQUESTS = 40, 200


def chat(user: str | None = None) -> bytes:
    body = {"model": "chat-small", "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps({**body, **({"user": user} if user else {})}).encode()


def statuses_under_drops(tmp_path: Path, health_checks: bool) -> tuple[list[int], list[int]]:
    """(statuses of the dropped requests, of another client's requests sent meanwhile)."""
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    port = free_port(*HOSTS.values())
    backends = [start_backend(["chat-small"], address, port) for address in HOSTS.values()]
    models = [model("chat-small", list(HOSTS), port, ["chat"])]
    # With health checks, render_gateway writes the agent's server lines as the role does (max_fails=0).
    conf = render_gateway(tmp_path, models, HOSTS, gateway_http_port=(http_port := free_port()),
                          gateway_https_port=0, gateway_health_checks=health_checks)
    proc = start_nginx(conf, http_port)
    dropped: list[int] = []
    others: list[int] = []
    try:
        def drop() -> None:
            for _ in range(DROPS):
                dropped.append(post_json(http_port, chat("_test_drop_connection")).status)

        attacker = threading.Thread(target=drop)
        attacker.start()
        for _ in range(REQUESTS):
            others.append(post_json(http_port, chat()).status)
        attacker.join(timeout=60)
    finally:
        stop(proc)
        for backend in backends:
            stop(backend.proc)
    return dropped, others


def test_dropped_requests_mark_no_server_with_the_agent_s_server_lines(tmp_path: Path) -> None:
    dropped, others = statuses_under_drops(tmp_path, health_checks=True)
    assert set(dropped) <= {502, 503}, "the dropped requests fail by themselves"
    assert others == [200] * REQUESTS


def test_passive_checks_let_a_client_take_the_model_out(tmp_path: Path) -> None:
    """The contrast that makes the test above mean something: nginx's max_fails=1."""
    dropped, others = statuses_under_drops(tmp_path, health_checks=False)
    assert set(dropped) <= {502, 503}
    assert others.count(503) > 0, "passive marking turned another client's requests away"

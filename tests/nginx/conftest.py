"""The gateway every test in tests/nginx shares: the role rendered from a small registry.

Hosts are loopback addresses, so both servers of chat-small listen on its one registry
port, as real GPU hosts do. A second gateway renders the same registry with nginx's
patterns cut off, so that every body is routed by njs: tests that send a body to both
prove that the two halves follow one rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_lab import (Gateway, free_port, model, nginx_missing, refuse_njs_routes, render_gateway, start_backend,
                         start_nginx)

# The admin user of the shared gateways (GET /ready).
ADMIN = ("ops", "ops-password-for-tests")
HOSTS = {"gpu-a": "127.0.0.2", "gpu-b": "127.0.0.3", "gpu-c": "127.0.0.4", "gpu-d": "127.0.0.5"}
VLLM_ONLY = ["chat", "completions", "responses", "score", "tokenize", "detokenize"]


def registry(ports: dict[str, int]) -> list[dict[str, object]]:
    """llm_models of the shared gateway."""
    return [
        model("chat-small", ["gpu-a", "gpu-b"], ports["chat-small"], aliases=["gpt-4o-mini"]),
        model("chat-large", ["gpu-a"], ports["chat-large"], endpoints=VLLM_ONLY, aliases=["Chat-Large-v1"]),
        model("embed-small", ["gpu-b"], ports["embed-small"], endpoints=["embeddings", "rerank"],
              aliases=["text-embedding-3-small"], api_prefix=""),
        model("down-model", ["gpu-c", "gpu-d"], ports["down-model"], endpoints=["chat"]),
    ]


def njs_only(root: Path) -> None:
    """Send every body to njs: the patterns still run, but their answer is not used."""
    find_model = root / "llm" / "find-model.conf"
    text = find_model.read_text()
    assert text.count("$llm_permitted_target last;") == 2
    find_model.write_text(text.replace("$llm_permitted_target last;", "/_llm/router last;"))


def start_gateway(root: Path, variant: str = "normal", **overrides: object) -> Gateway:
    """The shared registry behind a gateway: "normal", "njs-only" or "nginx-only" (njs refuses to route)."""
    ports = {"chat-small": free_port("127.0.0.2", "127.0.0.3"), "chat-large": free_port("127.0.0.2"),
             "embed-small": free_port("127.0.0.3"), "down-model": free_port("127.0.0.4", "127.0.0.5")}
    backends = {
        "small-a": start_backend(["chat-small", "gpt-4o-mini"], "127.0.0.2", ports["chat-small"]),
        "small-b": start_backend(["chat-small", "gpt-4o-mini"], "127.0.0.3", ports["chat-small"]),
        "large": start_backend(["chat-large", "Chat-Large-v1"], "127.0.0.2", ports["chat-large"]),
        "embed": start_backend(["embed-small", "text-embedding-3-small"], "127.0.0.3", ports["embed-small"],
                               api_prefix=""),
    }
    http_port, https_port = free_port(), free_port()
    overrides = {"gateway_admin_users": [{"name": ADMIN[0], "password": ADMIN[1]}], **overrides}
    conf = render_gateway(root, registry(ports), HOSTS, gateway_http_port=http_port,
                          gateway_https_port=https_port, gateway_proxy_read_timeout="3s", **overrides)
    if variant == "njs-only":
        njs_only(root)
    elif variant == "nginx-only":
        refuse_njs_routes(root)
    gw = Gateway(root, http_port, https_port, backends)
    try:
        gw.procs.append(start_nginx(conf, http_port))
    except Exception:
        gw.stop()
        raise
    return gw


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The shared gateway."""
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    gw = start_gateway(tmp_path_factory.mktemp("gateway"))
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def njs_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The same registry, every body routed by njs."""
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    gw = start_gateway(tmp_path_factory.mktemp("njs-gateway"), "njs-only")
    yield gw
    gw.stop()


@pytest.fixture(autouse=True)
def clean_backends(request: pytest.FixtureRequest) -> None:
    """Each test starts with empty request logs and no injected faults."""
    for name in ("gateway", "njs_gateway"):
        if name in request.fixturenames:
            for backend in request.getfixturevalue(name).backends.values():
                backend.clear()


def assert_no_pcre_error(gw: Gateway) -> None:
    """PCRE failing (stack, match limit) makes nginx log the body in an alert: it must never happen."""
    assert not re.search(r"pcre|regex", gw.error_log(), re.I)


def chat(model_name: object, **extra: object) -> dict[str, object]:
    """A chat completion request body."""
    return {"model": model_name, "messages": [{"role": "user", "content": "hi"}], **extra}

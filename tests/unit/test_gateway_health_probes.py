"""The health agent's probes against real servers on loopback (127.0.0.20-29).

The test backend (tests/backend/llm_test_backend.py) as a model server, with its injected
faults; a socket that accepts and never answers; a port nobody listens on. The count of
nginx's connections is checked against the kernel's own /proc/net/tcp.
"""

from __future__ import annotations

import getpass
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import health_agent
import pytest
from gateway_lab import Backend, free_port, start_backend, stop

agent_module = health_agent.load()
HOST = "127.0.0.20"
KEY = "sk-backend-test-key-0123456789"


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    started = start_backend(["chat-small", "gpt-4o-mini"], HOST)
    yield started
    stop(started.proc)


@pytest.fixture(scope="module")
def keyed_backend() -> Iterator[Backend]:
    started = start_backend(["embed"], HOST, api_prefix="", api_key=KEY)
    yield started
    stop(started.proc)


@pytest.fixture(autouse=True)
def healthy(request: pytest.FixtureRequest) -> None:
    """Each test starts with no injected fault."""
    if "backend" in request.fixturenames:
        request.getfixturevalue("backend").clear()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections (the kernel completes the handshake) and never answers."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"{HOST}:{listener.getsockname()[1]}"
    done.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def upstream(address: str, served: tuple[str, ...] = ("chat-small", "gpt-4o-mini"), **fields: Any) -> Any:
    return agent_module.Upstream("llm_chat_small", served[0], (agent_module.Peer(address),), served, **fields)


def probe(target: Any, timeout: float = 1.0) -> str | None:
    return agent_module.probe_peer(target, target.peers[0], timeout)


def test_a_healthy_server_passes(backend: Backend) -> None:
    assert probe(upstream(backend.address)) is None
    paths = [r["path"] for r in backend.requests()]
    assert paths == ["/health", "/v1/models"]


def test_an_answer_with_a_length_and_connection_close_is_read_whole() -> None:
    """As uvicorn (Infinity, vLLM) answers: http.client closes the socket once the body is read,
    and on Python 3.13 (Debian 13) setting a timeout on it then failed with EBADF."""
    body = b'{"unix": 1.0}'
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(4)

    def answer() -> None:
        conn = listener.accept()[0]
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        assert agent_module._request(HOST, listener.getsockname()[1], "GET", "/health", 2.0, {}) == (200, body)
    finally:
        thread.join(timeout=5)
        listener.close()


def test_a_failing_health_answer_is_the_reason(backend: Backend) -> None:
    backend.control("POST", "/_test/behaviour", {"mode": "fail", "status": 503})
    assert probe(upstream(backend.address)) == "GET /health: HTTP 503"


def test_a_model_the_server_does_not_list(backend: Backend) -> None:
    assert probe(upstream(backend.address, ("chat-small", "chat-large"))) == \
        "GET /v1/models: model 'chat-large' not listed"
    assert probe(upstream(backend.address, ("x", "y"))) == "GET /v1/models: models 'x', 'y' not listed"


def test_a_hung_server_fails_after_the_timeout(backend: Backend) -> None:
    backend.control("POST", "/_test/behaviour", {"mode": "hang"})
    started = time.monotonic()
    assert probe(upstream(backend.address), timeout=0.5) == "GET /health: timed out after 0.5 s"
    assert 0.45 < time.monotonic() - started < 1.5


def test_a_silent_socket_fails_after_the_timeout(silent_server: str) -> None:
    started = time.monotonic()
    assert probe(upstream(silent_server), timeout=0.5) == "GET /health: timed out after 0.5 s"
    assert time.monotonic() - started < 1.5


def test_a_slow_models_answer_counts_against_the_timeout(backend: Backend) -> None:
    backend.control("POST", "/_test/behaviour", {"mode": "slow", "delay": 0.4})
    # Each request has its own timeout: 0.4 s each passes under 0.6 s, fails under 0.3 s.
    assert probe(upstream(backend.address), timeout=0.6) is None
    assert probe(upstream(backend.address), timeout=0.3) == "GET /health: timed out after 0.3 s"


def test_a_refused_connection() -> None:
    assert probe(upstream(f"{HOST}:{free_port(HOST)}")) == "connect: refused"


def test_the_backend_key_is_sent_for_the_model_list(keyed_backend: Backend, tmp_path: Path) -> None:
    key_file = tmp_path / "embed.key"
    key_file.write_text(KEY + "\n")
    assert probe(upstream(keyed_backend.address, ("embed",), api_prefix="", api_key_file=str(key_file))) is None
    key_file.write_text("sk-wrong-key-0000000000000000\n")
    reason = probe(upstream(keyed_backend.address, ("embed",), api_prefix="", api_key_file=str(key_file)))
    assert reason == "GET /models: HTTP 401"
    assert "sk-" not in reason
    missing = probe(upstream(keyed_backend.address, ("embed",), api_prefix="", api_key_file=str(tmp_path / "none")))
    assert missing == f"key file {tmp_path / 'none'}: No such file or directory"


def test_an_optional_tiny_inference(backend: Backend) -> None:
    chat = {"path": "/v1/chat/completions",
            "body": {"model": "chat-small", "max_tokens": 1, "messages": [{"role": "user", "content": "ping"}]}}
    assert probe(upstream(backend.address, inference=chat)) is None
    assert backend.requests()[-1]["path"] == "/v1/chat/completions"
    wrong = {**chat, "body": {**chat["body"], "model": "not-served"}}
    assert probe(upstream(backend.address, inference=wrong)) == "POST /v1/chat/completions: HTTP 404"


def test_agent_takes_a_hung_server_out_within_interval_times_fall(backend: Backend, silent_server: str,
                                                                  tmp_path: Path) -> None:
    """Real probes, stand-in nginx commands: the silent server is down after `fall` rounds."""
    raw = health_agent.config(tmp_path, [{
        "name": "llm_chat_small", "model": "chat-small", "served_names": ["chat-small", "gpt-4o-mini"],
        "peers": [{"address": backend.address}, {"address": silent_server}]}], timeout=0.3, rise=1, fall=2,
        min_reload_interval=0)
    commands: list[list[str]] = []
    agent = agent_module.Agent(agent_module.parse_config(raw),
                               runner=lambda command: (commands.append(list(command)) or True, ""))
    try:
        # The first round decides both at once (new servers); later rounds follow rise/fall.
        started = time.monotonic()
        agent.tick(time.time(), time.monotonic())
        # The two are probed at once: one round takes the timeout, not twice it.
        assert time.monotonic() - started < 0.6
        servers = {s["address"]: s for s in agent.state(time.time())["upstreams"][0]["servers"]}
        assert servers[silent_server]["state"] == "down"
        assert servers[silent_server]["last_failure"] == "GET /health: timed out after 0.3 s"
        assert servers[backend.address]["state"] == "up"
        backend.control("POST", "/_test/behaviour", {"mode": "hang"})
        agent.tick(time.time(), time.monotonic())
        assert agent.health[("llm_chat_small", backend.address)].state == "up"
        agent.tick(time.time(), time.monotonic())
        assert agent.health[("llm_chat_small", backend.address)].state == "down"
        backend.clear()
        agent.tick(time.time(), time.monotonic())
        assert agent.health[("llm_chat_small", backend.address)].state == "up"
    finally:
        agent.close()
    assert len(commands) == 6  # three changes, each one test and one reload


def test_connections_are_counted_from_the_kernel_table(backend: Backend) -> None:
    """Open connections to the backend show in /proc/net/tcp as this user's, closed ones do not."""
    before = agent_module.connection_counts([backend.address], getpass.getuser())[backend.address]
    conns = [socket.create_connection((backend.host, backend.port)) for _ in range(3)]
    try:
        counts = agent_module.connection_counts([backend.address], getpass.getuser())
        assert counts[backend.address] == before + 3
        other = "nobody" if getpass.getuser() != "nobody" else "root"
        assert agent_module.connection_counts([backend.address], other)[backend.address] == 0
    finally:
        for conn in conns:
            conn.close()
    deadline = time.monotonic() + 2
    while agent_module.connection_counts([backend.address], getpass.getuser())[backend.address] > before:
        assert time.monotonic() < deadline, "closed connections still counted"
        time.sleep(0.05)


def test_the_cli_wakes_the_running_agent_and_sigterm_stops_it(backend: Backend, tmp_path: Path) -> None:
    """A drain is applied at once, not at the next round (60 s away): the CLI's SIGHUP woke the agent."""
    config, refused = tmp_path / "config.json", f"{HOST}:{free_port(HOST)}"
    config.write_text(json.dumps(health_agent.config(tmp_path, [
        {"name": "llm_chat_small", "model": "chat-small", "served_names": ["chat-small", "gpt-4o-mini"],
         "peers": [{"address": backend.address}, {"address": refused}]}],
        interval=60, timeout=0.5, nginx_test=["true"], nginx_reload=["true"], nginx_user=None)))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(health_agent.AGENT), args[0], "--config", str(config), *args[1:]],
                              capture_output=True, text=True, timeout=30)

    agent = subprocess.Popen([sys.executable, str(health_agent.AGENT), "run", "--config", str(config)],
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "state.json").exists():
            assert time.monotonic() < deadline, "no state file from the agent"
            time.sleep(0.05)
        drained = cli("drain", "--server", backend.address, "--force", "--wait", "3")
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout == f"drained {backend.address} for every model\n"
        assert f"server {backend.address} max_fails=1 fail_timeout=10s down;  # drained\n" in \
            (tmp_path / "upstreams" / "llm_chat_small.servers.conf").read_text()
    finally:
        agent.terminate()
        _, log = agent.communicate(timeout=10)
    assert agent.returncode == 0
    assert log.splitlines() == [
        "INFO checking 2 servers of 1 upstreams every 60.0 s",
        f"INFO llm_chat_small {backend.address} (chat-small): unknown -> up",
        f"INFO llm_chat_small {refused} (chat-small): unknown -> down: connect: refused",
        "INFO nginx reloaded for llm_chat_small",
        "INFO nginx reloaded for llm_chat_small",
    ]


"""The health agent against this host's nginx and three test backends on 127.0.0.21-27.

One upstream (two primaries and a backup, on one port as real GPU hosts have it) whose
`server` lines are the agent's include; the agent probes, writes and reloads nginx by
itself, and the CLI drains. Checks are made at the backends that received the requests.
Last, the role's own gateway.conf with the includes in place of its server lines is checked.
"""

from __future__ import annotations

import getpass
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gateway_health
import health_agent
import llm_registry
import pytest
from gateway_lab import (NGINX, Backend, free_port, model, nginx_missing, nginx_test, render_gateway, start_backend,
                         start_nginx, stop, write_nginx_conf)

GATEWAY = "127.0.0.23"
HOSTS = {"a": "127.0.0.21", "b": "127.0.0.22", "backup": "127.0.0.24"}
INTERVAL, TIMEOUT, FALL, RISE = 0.3, 0.5, 2, 2
AGENT = health_agent.load()
# nginx started by root without a `user` directive runs its workers as nobody.
WORKER_USER = "nobody" if os.geteuid() == 0 else getpass.getuser()


@dataclass
class Lab:
    root: Path
    config: Path
    port: int
    backends: dict[str, Backend]
    nginx: subprocess.Popen[bytes]
    agent: subprocess.Popen[bytes]

    def include(self) -> str:
        return (self.root / "upstreams" / "llm_chat_small.servers.conf").read_text()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(health_agent.AGENT), args[0], "--config", str(self.config),
                               *args[1:]], capture_output=True, text=True, timeout=60)

    def workers(self) -> set[int]:
        """nginx's workers that take new connections (not those shutting down after a reload)."""
        children = Path(f"/proc/{self.nginx.pid}/task/{self.nginx.pid}/children").read_text().split()
        accepting = set()
        for pid in children:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if title.startswith(b"nginx: worker process") and b"shutting down" not in title:
                accepting.add(int(pid))
        return accepting

    def reloaded(self, before: set[int]) -> None:
        """Until only workers started after `before` take requests: `nginx -s reload` returns before that."""
        wait_until(lambda: bool(now := self.workers()) and not now & before, 5, "nginx's new workers")

    def agent_log(self) -> str:
        return (self.root / "agent.log").read_text()

    def chat(self, stream: bool = False, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(GATEWAY, self.port, timeout=30)
        body = {"model": "chat-small", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
                "max_tokens": 8}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json",
                                                                         **(headers or {})})
        return conn.getresponse()

    def served_by(self, count: int) -> dict[str, int]:
        """Send `count` requests; backend name -> how many it received."""
        for backend in self.backends.values():
            backend.control("DELETE", "/_test/requests")
        for _ in range(count):
            reply = self.chat()
            assert reply.status == 200, reply.read()
            reply.read()
        return {name: len([r for r in b.requests() if r["path"] == "/v1/chat/completions"])
                for name, b in self.backends.items()}


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds it took until `check()` held; fails naming `what` after `timeout`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def down(lab: Lab) -> set[str]:
    """The backends the include marks down."""
    names = {backend.address: name for name, backend in lab.backends.items()}
    return {names[address] for address in AGENT.down_in(lab.include())}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("health-agent")
    model_port, port = free_port(*HOSTS.values()), free_port(GATEWAY)
    backends = {name: start_backend(["chat-small"], host, model_port) for name, host in HOSTS.items()}
    conf = write_nginx_conf(root, f"""
    access_log off;
    upstream llm_chat_small {{
        least_conn;
        include {root}/upstreams/llm_chat_small.servers.conf;
        keepalive 8;
        keepalive_timeout 4s;
    }}
    server {{
        listen {GATEWAY}:{port};
        location / {{
            proxy_pass http://llm_chat_small;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
""")
    config = root / "config.json"
    config.write_text(json.dumps(health_agent.config(root, [{
        "name": "llm_chat_small", "model": "chat-small",
        "peers": [{"address": backends["a"].address, "weight": 1}, {"address": backends["b"].address},
                  {"address": backends["backup"].address, "backup": True}]}],
        interval=INTERVAL, timeout=TIMEOUT, rise=RISE, fall=FALL, min_reload_interval=1,
        nginx_user=WORKER_USER, nginx_test=[NGINX, "-t", "-q", "-p", str(root), "-c", str(conf)],
        nginx_reload=[NGINX, "-p", str(root), "-c", str(conf), "-s", "reload"])))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # As the role will: the includes first (gateway.conf includes them), then nginx, then the agent.
        rendered = subprocess.run([sys.executable, str(health_agent.AGENT), "render", "--config", str(config)],
                                  capture_output=True, text=True, check=True)
        assert json.loads(rendered.stdout) == {"changed": ["llm_chat_small"]}
        nginx = start_nginx(conf, port, host=GATEWAY)
        procs.append(nginx)
        with open(root / "agent.log", "wb") as log:
            agent = subprocess.Popen([sys.executable, str(health_agent.AGENT), "run", "--config", str(config)],
                                     stderr=log)
        procs.append(agent)
        lab = Lab(root, config, port, backends, nginx, agent)
        wait_until(lambda: (root / "state.json").exists(), 10, "the agent's first state file")
        yield lab
    finally:
        for proc in reversed(procs):
            stop(proc)
        for backend in backends.values():
            stop(backend.proc)


@pytest.fixture(autouse=True)
def all_healthy(lab: Lab) -> Iterator[None]:
    """Each test starts with every backend healthy, undrained and in nginx's rotation."""
    before, was_down = lab.workers(), down(lab)
    for backend in lab.backends.values():
        backend.clear()
    for name in ("a", "b"):
        lab.cli("undrain", "--server", lab.backends[name].address)
    wait_until(lambda: not down(lab), 10, "every server back up")
    if was_down:
        lab.reloaded(before)
    yield


def both_primaries(served: dict[str, int]) -> bool:
    return served["a"] > 0 and served["b"] > 0 and served["backup"] == 0


def test_a_hung_server_is_out_within_interval_times_fall_and_back_after_rise(lab: Lab) -> None:
    assert both_primaries(lab.served_by(10))
    reloads = lab.agent_log().count("nginx reloaded")
    before = lab.workers()
    lab.backends["b"].control("POST", "/_test/behaviour", {"mode": "hang"})
    took = wait_until(lambda: down(lab) == {"b"}, 10, "b written down")
    # fall rounds of interval, each probe bounded by the timeout, plus one round's slack.
    assert took < FALL * (INTERVAL + TIMEOUT) + INTERVAL + TIMEOUT
    lab.reloaded(before)
    assert lab.served_by(10) == {"a": 10, "b": 0, "backup": 0}
    state = json.loads((lab.root / "state.json").read_text())
    b = next(s for s in state["upstreams"][0]["servers"] if s["address"] == lab.backends["b"].address)
    assert (b["state"], b["nginx"], b["last_failure"]) == ("down", "down", f"GET /health: timed out after {TIMEOUT} s")
    assert state["upstreams"][0]["live"] == 2
    before = lab.workers()
    lab.backends["b"].clear()
    wait_until(lambda: not down(lab), RISE * (INTERVAL + TIMEOUT) + 2, "b back up")
    lab.reloaded(before)
    assert both_primaries(lab.served_by(10))
    # One reload out, one back in.
    assert lab.agent_log().count("nginx reloaded") == reloads + 2


def test_the_backup_takes_over_and_with_nothing_left_nginx_answers_at_once(lab: Lab) -> None:
    before = lab.workers()
    for name in ("a", "b"):
        lab.backends[name].control("POST", "/_test/behaviour", {"mode": "hang"})
    wait_until(lambda: down(lab) == {"a", "b"}, 10, "a and b written down")
    lab.reloaded(before)
    assert lab.served_by(4) == {"a": 0, "b": 0, "backup": 4}
    before = lab.workers()
    lab.backends["backup"].control("POST", "/_test/behaviour", {"mode": "hang"})
    wait_until(lambda: down(lab) == {"a", "b", "backup"}, 10, "every server written down")
    lab.reloaded(before)
    started = time.monotonic()
    reply = lab.chat()
    # "no live upstreams": the gateway's error page turns this 502 into 503 model_unavailable.
    assert reply.status == 502
    assert time.monotonic() - started < 0.5
    assert "no live upstreams" in (lab.root / "logs" / "error.log").read_text()


def test_drain_lets_a_stream_finish_and_wait_idle_sees_it_end(lab: Lab) -> None:
    streams: dict[str, bytes] = {}

    def stream(slot: str) -> None:
        reply = lab.chat(stream=True, headers={"X-Test-Stream-Interval": "0.4"})
        streams[slot] = reply.read()

    for backend in lab.backends.values():
        backend.control("DELETE", "/_test/requests")
    threads = [threading.Thread(target=stream, args=(slot,)) for slot in ("first", "second")]
    for thread in threads:
        thread.start()
    b = lab.backends["b"]
    wait_until(lambda: [r["path"] for r in b.requests()].count("/v1/chat/completions") == 1, 5, "one stream on b")
    before = lab.workers()
    drained = lab.cli("drain", "--model", "chat-small", "--server", b.address, "--wait", "5")
    assert drained.returncode == 0, drained.stderr
    assert "down;  # drained" in lab.include()
    status = json.loads(lab.cli("status", "--server", b.address).stdout)
    assert status["connections"] >= 1, status
    assert status["upstreams"][0]["servers"][0]["drained"] is True
    # New requests go elsewhere while the stream on b goes on.
    lab.reloaded(before)
    assert lab.served_by(4)["b"] == 0
    gave_up = lab.cli("wait-idle", "--server", b.address, "--timeout", "0.5")
    assert gave_up.returncode == 1
    assert f"from nginx to {b.address} still open after 0.5 s" in gave_up.stderr
    idle = lab.cli("wait-idle", "--server", b.address, "--timeout", "20")
    assert idle.returncode == 0, idle.stderr
    for thread in threads:
        thread.join(20)
    # Both streams were sent whole: the reload did not cut the one on the drained server.
    for body in streams.values():
        assert body.count(b"data: ") == 8 + 3 and body.endswith(b"data: [DONE]\n\n"), body[-200:]
    undrained = lab.cli("undrain", "--model", "chat-small", "--server", b.address, "--wait", "5")
    assert undrained.returncode == 0, undrained.stderr
    assert "down" not in lab.include()


def test_cli_refuses_draining_the_last_server_of_a_model(lab: Lab) -> None:
    assert lab.cli("drain", "--server", lab.backends["a"].address).returncode == 0
    assert lab.cli("drain", "--server", lab.backends["b"].address).returncode == 0
    refused = lab.cli("drain", "--server", lab.backends["backup"].address)
    assert refused.returncode == 2
    assert "would leave chat-small (llm_chat_small) with no server in rotation" in refused.stderr



def test_the_role_s_upstreams_include_the_agent_s_server_lines_and_pass_nginx_t(tmp_path: Path) -> None:
    """gateway.conf with health checks on, the agent's config from the role's filter, `render`, nginx -t."""
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    hosts = {"gpu-a": "127.0.0.25", "gpu-b": "127.0.0.26", "gpu-c": "127.0.0.27"}
    models = [model("chat", [{"host": "gpu-a", "weight": 3}, "gpu-b", {"host": "gpu-c", "backup": True}], 8001),
              model("embed", ["gpu-c"], 8002, endpoints=["embeddings"], api_prefix="")]
    conf = render_gateway(tmp_path, models, hosts, gateway_http_port=free_port(), gateway_https_port=0,
                          gateway_health_checks=True)
    normalized = llm_registry.llm_registry_normalize(models, {"all": sorted(hosts), "llm_gpu_hosts": sorted(hosts)})
    upstreams = llm_registry.llm_gateway_upstreams(
        normalized, {host: {"llm_private_address": address} for host, address in hosts.items()})
    raw = gateway_health.llm_gateway_health_config(upstreams, normalized, ["chat"], {
        "key_dir": "/etc/llm-gateway-health/keys", "include_dir": str(tmp_path / "llm" / "upstreams"),
        "state_file": str(tmp_path / "state.json"), "drain_file": str(tmp_path / "drain.json"),
        "interval": 5, "timeout": 2, "rise": 2, "fall": 3, "min_reload_interval": 10, "max_fails": 0,
        "fail_timeout": "10s", "nginx_user": "www-data"})
    assert [u["api_key_file"] for u in raw["upstreams"]] == ["/etc/llm-gateway-health/keys/chat.key", None]
    assert [u["api_prefix"] for u in raw["upstreams"]] == ["/v1", ""]
    config = AGENT.parse_config(raw)
    text = (tmp_path / "llm" / "gateway.conf").read_text()
    for upstream in upstreams:
        assert f"    include llm/upstreams/{upstream['name']}.servers.conf;\n" in text
    assert "    server " not in text.split("map ")[0], "no server line is left in the upstream blocks"
    # render_gateway wrote the includes as the role does (its own filter call): nothing changes.
    assert AGENT.render_once(config) == []
    lines = (tmp_path / "llm" / "upstreams" / "llm_chat.servers.conf").read_text().splitlines()[1:]
    assert lines == ["server 127.0.0.25:8001 weight=3 max_fails=0 fail_timeout=10s;",
                     "server 127.0.0.26:8001 max_fails=0 fail_timeout=10s;",
                     "server 127.0.0.27:8001 max_fails=0 fail_timeout=10s backup;"]
    check = nginx_test(conf)
    assert check.returncode == 0, check.stderr
    # Down and drained servers, a backup among them, and a model with none left.
    AGENT.write_drains(config.drain_file, [AGENT.Drain("127.0.0.25:8001"), AGENT.Drain("127.0.0.27")])
    assert AGENT.render_once(config) == ["llm_chat", "llm_embed"]
    assert "backup down;  # drained" in (tmp_path / "llm" / "upstreams" / "llm_chat.servers.conf").read_text()
    check = nginx_test(conf)
    assert check.returncode == 0, check.stderr

"""GET /ready from the health agent's state file: the role's gateway, test backends and the real agent.

Two models on loopback hosts 127.0.0.41-43 (chat-small on two, embed-small on one, without
/v1 as Infinity serves it), the gateway rendered with gateway_health_checks and the agent
(roles/gateway/files/llm-gateway-health) running with a short interval against the same
backends. Killing and restarting backends moves readiness; stopping the agent makes it 503.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import health_agent
import llm_registry
import pytest
from gateway_lab import (NGINX, Backend, Gateway, basic_auth, free_port, model, nginx_missing, render_gateway,
                         start_backend, start_nginx, stop)
from http_reply import Reply

ADMIN = ("ops", "ops-password-for-tests")
HOSTS = {"gpu-a": "127.0.0.41", "gpu-b": "127.0.0.42", "gpu-c": "127.0.0.43"}
INTERVAL, TIMEOUT, RISE, FALL = 0.5, 0.5, 2, 2
# Rendered by the role from interval and timeout (vars/main.yml): 3 rounds + 2 s.
STALE_AFTER = 5
SERVER_FIELDS = {"address", "weight", "backup", "state", "since", "drained", "live", "nginx", "last_failure",
                 "last_failure_at", "checked_at"}


@dataclass
class Lab:
    gateway: Gateway
    agent_config: Path
    state_file: Path
    agent: subprocess.Popen[bytes] | None = None

    def ready(self) -> Reply:
        return self.gateway.request("GET", "/ready", headers={"Authorization": basic_auth(*ADMIN)})

    def start_agent(self) -> None:
        with open(self.gateway.root / "agent.log", "ab") as log:
            self.agent = subprocess.Popen([sys.executable, str(health_agent.AGENT), "run", "--config",
                                           str(self.agent_config)], stderr=log)

    def stop_agent(self) -> None:
        if self.agent is not None:
            stop(self.agent)
            self.agent = None

    def restart(self, name: str) -> None:
        """A backend killed before back on its address, as a restarted model server."""
        old = self.gateway.backends[name]
        self.gateway.backends[name] = start_backend(old.models, old.host, old.port, api_prefix=self.prefix(name))

    @staticmethod
    def prefix(name: str) -> str:
        return "" if name == "embed" else "/v1"


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> tuple[float, Any]:
    """Seconds until `check()` returned something true, and that; fails naming `what` after `timeout`."""
    started = time.monotonic()
    while not (result := check()):
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started, result


def body_if(status: int, lab: Lab) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        reply = lab.ready()
        return reply.json() if reply.status == status else None
    return check


def registry(port_chat: int, port_embed: int) -> list[dict[str, Any]]:
    return [model("chat-small", ["gpu-a", "gpu-b"], port_chat),
            model("embed-small", ["gpu-c"], port_embed, endpoints=["embeddings"], api_prefix="")]


def start_lab(root: Path, health_checks: bool) -> Lab:
    """The gateway and its backends; with health_checks, the agent's configuration too (not started)."""
    port_chat, port_embed = free_port("127.0.0.41", "127.0.0.42"), free_port("127.0.0.43")
    backends = {"a": start_backend(["chat-small"], HOSTS["gpu-a"], port_chat),
                "b": start_backend(["chat-small"], HOSTS["gpu-b"], port_chat),
                "embed": start_backend(["embed-small"], HOSTS["gpu-c"], port_embed, api_prefix="")}
    http_port = free_port()
    state_file = root / "agent" / "state.json"
    models = registry(port_chat, port_embed)
    conf = render_gateway(root, models, HOSTS, gateway_http_port=http_port, gateway_https_port=0,
                          gateway_admin_users=[{"name": ADMIN[0], "password": ADMIN[1]}],
                          gateway_health_checks=health_checks, gateway_health_interval=INTERVAL,
                          gateway_health_timeout=TIMEOUT, __gateway_health_state_file=str(state_file))
    gateway = Gateway(root, http_port, 0, backends)
    groups = {"all": sorted(HOSTS), "llm_gpu_hosts": sorted(HOSTS)}
    upstreams = llm_registry.llm_gateway_upstreams(llm_registry.llm_registry_normalize(models, groups),
                                                   {host: {"llm_private_address": a} for host, a in HOSTS.items()})
    agent_config = root / "agent" / "config.json"
    agent_config.parent.mkdir()
    # render_gateway wrote the agent's server lines already (as the role does); the agent's own
    # configuration names the same include directory, so its reloads change them.
    agent_config.write_text(json.dumps(health_agent.config(root / "agent", [
        {"name": u["name"], "model": u["model"], "peers": u["peers"],
         "api_prefix": "" if u["model"] == "embed-small" else "/v1"} for u in upstreams],
        include_dir=str(root / "llm" / "upstreams"),
        interval=INTERVAL, timeout=TIMEOUT, rise=RISE, fall=FALL, min_reload_interval=0, nginx_user=None,
        nginx_test=[NGINX, "-t", "-q", "-p", str(root), "-c", str(conf)],
        nginx_reload=[NGINX, "-p", str(root), "-c", str(conf), "-s", "reload"])))
    try:
        gateway.procs.append(start_nginx(conf, http_port))
    except Exception:
        gateway.stop()
        raise
    return Lab(gateway, agent_config, state_file)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    lab = start_lab(tmp_path_factory.mktemp("readiness"), health_checks=True)
    try:
        yield lab
    finally:
        lab.stop_agent()
        lab.gateway.stop()


@pytest.fixture
def agent(lab: Lab) -> Iterator[Lab]:
    """The agent running, every backend up and /ready at 200 before the test."""
    if lab.agent is None or lab.agent.poll() is not None:
        lab.start_agent()
    for name, backend in lab.gateway.backends.items():
        if backend.proc.poll() is not None:
            lab.restart(name)
    wait_until(body_if(200, lab), 15, "readiness 200 with every backend up")
    yield lab


def test_all_up_is_200_with_every_server_s_state(agent: Lab) -> None:
    reply = agent.ready()
    assert reply.status == 200, reply.body
    body = reply.json()
    assert (body["status"], body["unavailable"]) == ("ready", [])
    assert body["agent"]["state_file"] == str(agent.state_file)
    assert "error" not in body["agent"] and 0 <= body["agent"]["age"] <= STALE_AFTER
    live = {u["model"]: u["live"] for u in body["upstreams"]}
    assert live == {"chat-small": 2, "embed-small": 1}
    chat = next(u for u in body["upstreams"] if u["model"] == "chat-small")
    assert chat["upstream"] == "llm_chat_small"
    assert [s["address"] for s in chat["servers"]] == [agent.gateway.backends[n].address for n in ("a", "b")]
    for server in chat["servers"]:
        assert set(server) == SERVER_FIELDS
        assert (server["state"], server["nginx"], server["drained"], server["weight"], server["backup"]) == \
            ("up", "up", False, 1, False)
        assert server["since"] and server["checked_at"]


def test_a_model_with_no_live_server_is_503_named_with_its_failures_then_200_again(agent: Lab) -> None:
    for name in ("a", "b"):
        stop(agent.gateway.backends[name].proc)
    # fall failed rounds, each at most interval + timeout, plus a second of slack.
    took, body = wait_until(body_if(503, agent), FALL * (INTERVAL + TIMEOUT) + 1, "503 for chat-small")
    assert body["status"] == "degraded"
    assert body["unavailable"] == ["chat-small"]
    assert "chat-small" in body["message"] and "embed-small" not in body["message"]
    chat = next(u for u in body["upstreams"] if u["model"] == "chat-small")
    assert chat["live"] == 0
    for server in chat["servers"]:
        assert server["state"] == "down"
        assert server["last_failure"] == "connect: refused", server
        assert server["last_failure_at"] and server["since"]
    assert next(u for u in body["upstreams"] if u["model"] == "embed-small")["live"] == 1
    print(f"503 naming chat-small {took:.1f} s after its servers were killed")
    for name in ("a", "b"):
        agent.restart(name)
    took, body = wait_until(body_if(200, agent), RISE * (INTERVAL + TIMEOUT) + 1, "200 again")
    assert body["unavailable"] == []
    print(f"200 again {took:.1f} s after they were back")


def test_a_stopped_agent_is_503_saying_so_and_a_missing_state_file_too(agent: Lab) -> None:
    agent.stop_agent()
    # The last state file still says every model is live: only its age tells.
    took, body = wait_until(body_if(503, agent), STALE_AFTER + 2, "503 once the state file is stale")
    # Its time is to the second and it was written up to a round before the stop.
    assert STALE_AFTER - 2 <= took
    assert body["unavailable"] == []
    assert body["message"].startswith("The health agent is not running: its state file ")
    assert f"(stale after {STALE_AFTER} s)" in body["agent"]["error"]
    agent.state_file.unlink()
    reply = agent.ready()
    assert reply.status == 503
    body = reply.json()
    assert "cannot be read" in body["message"] and str(agent.state_file) in body["message"]
    # No state: no model has a known live server.
    assert body["unavailable"] == ["chat-small", "embed-small"]
    assert all(u["error"] == "Not checked by the health agent." for u in body["upstreams"])
    agent.state_file.write_text("{not json")
    assert "cannot be read" in agent.ready().json()["message"]


def test_without_the_agent_ready_probes_every_server(tmp_path: Path) -> None:
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    lab = start_lab(tmp_path, health_checks=False)
    try:
        assert '"health": null' in (tmp_path / "llm" / "routes.js").read_text()
        reply = lab.ready()
        assert reply.status == 200, reply.body
        body = reply.json()
        assert "agent" not in body
        assert {u["model"]: u["live"] for u in body["upstreams"]} == {"chat-small": 2, "embed-small": 1}
        stop(lab.gateway.backends["embed"].proc)
        reply = lab.ready()
        assert reply.status == 503
        assert reply.json()["unavailable"] == ["embed-small"]
        embed = next(u for u in reply.json()["upstreams"] if u["model"] == "embed-small")
        assert embed["servers"][0]["healthy"] is False and embed["servers"][0]["error"]
    finally:
        lab.gateway.stop()


def test_the_role_s_defaults_point_ready_at_the_agent(tmp_path: Path) -> None:
    render_gateway(tmp_path, registry(8001, 8002), HOSTS, gateway_http_port=8080, gateway_https_port=0,
                   gateway_health_checks=True)
    routes = (tmp_path / "llm" / "routes.js").read_text()
    registry_json = json.loads(routes[routes.index("export default ") + len("export default "):].rstrip(";\n"))
    # interval 5 + timeout 2, three rounds, plus 2 s.
    assert registry_json["health"] == {"stateFile": "/run/llm-gateway-health/state.json", "staleAfter": 23}

"""The health agent's Prometheus text file (served by the gateway at /metrics/health).

The agent is driven as in test_gateway_health_agent.py: stand-in probes and nginx
commands, time passed in. The text is read back by a small parser here and, where
promtool is installed, checked by Prometheus' own linter.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import health_agent
import pytest

agent_module = health_agent.load()

CHAT = {"name": "llm_chat_small", "model": "chat-small",
        "peers": [{"address": "10.0.0.1:8001"}, {"address": "10.0.0.2:8001"}]}
EMBED = {"name": "llm_embed", "model": "embed", "api_prefix": "", "peers": [{"address": "10.0.0.1:8002"}]}
SAMPLE = re.compile(r'^(?P<name>[a-z_]+)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], str]:
    """(name, sorted labels) -> value of every sample; fails on a line that is not one."""
    found = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        labels = tuple(sorted(LABEL.findall(match["labels"] or "")))
        found[(match["name"], labels)] = match["value"]
    return found


def server(metric: str, model: str, upstream: str, address: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return metric, (("model", model), ("server", address), ("upstream", upstream))


class Nginx:
    """nginx's test and reload: the test fails while `broken` is set."""

    def __init__(self) -> None:
        self.broken = False

    def __call__(self, command: Sequence[str]) -> tuple[bool, str]:
        return (not (self.broken and "-t" in command)), "nginx: [emerg] stand-in failure"


def make_agent(tmp_path: Path, failing: dict[str, str]) -> tuple[Any, Nginx]:
    nginx = Nginx()
    config = agent_module.parse_config(health_agent.config(tmp_path, [CHAT, EMBED], rise=1, fall=1,
                                                           min_reload_interval=0))
    agent = agent_module.Agent(config, probe=lambda _u, peer, _t: failing.get(peer.address), runner=nginx)
    return agent, nginx


def test_metrics_file_shows_each_server_and_the_live_count(tmp_path: Path) -> None:
    failing: dict[str, str] = {}
    agent, _ = make_agent(tmp_path, failing)
    agent.tick(1000.0, 1.0)
    path = tmp_path / "metrics.prom"
    assert agent_module.metrics_path(agent.config) == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    found = samples(path.read_text())
    assert found[server("llm_gateway_upstream_server_up", "chat-small", "llm_chat_small", "10.0.0.2:8001")] == "1"
    assert found[("llm_gateway_model_live_servers", (("model", "chat-small"), ("upstream", "llm_chat_small")))] == "2"
    assert found[("llm_gateway_health_updated_timestamp_seconds", ())] == "1000.0"
    assert found[("llm_gateway_health_reload_failing", ())] == "0"

    failing["10.0.0.2:8001"] = "connect: refused"
    failing["10.0.0.1:8002"] = "connect: refused"
    agent.tick(1005.0, 6.0)
    found = samples(path.read_text())
    assert found[server("llm_gateway_upstream_server_up", "chat-small", "llm_chat_small", "10.0.0.2:8001")] == "0"
    assert found[server("llm_gateway_upstream_server_live", "chat-small", "llm_chat_small", "10.0.0.2:8001")] == "0"
    assert found[server("llm_gateway_upstream_server_nginx_up", "chat-small", "llm_chat_small", "10.0.0.2:8001")] == "0"
    assert found[server("llm_gateway_upstream_server_up", "chat-small", "llm_chat_small", "10.0.0.1:8001")] == "1"
    assert found[("llm_gateway_model_live_servers", (("model", "chat-small"), ("upstream", "llm_chat_small")))] == "1"
    # Every server of embed is down: the "no live server" alert reads this 0.
    assert found[("llm_gateway_model_live_servers", (("model", "embed"), ("upstream", "llm_embed")))] == "0"
    assert float(found[("llm_gateway_health_last_reload_timestamp_seconds", ())]) > 0


def test_drained_server_is_not_live_though_up(tmp_path: Path) -> None:
    agent, _ = make_agent(tmp_path, {})
    agent.tick(1000.0, 1.0)
    agent_module.write_drains(agent.config.drain_file, [agent_module.Drain("10.0.0.1:8001", "chat-small")])
    agent.tick(1001.0, 2.0)
    found = samples((tmp_path / "metrics.prom").read_text())
    assert found[server("llm_gateway_upstream_server_up", "chat-small", "llm_chat_small", "10.0.0.1:8001")] == "1"
    assert found[server("llm_gateway_upstream_server_drained", "chat-small", "llm_chat_small", "10.0.0.1:8001")] == "1"
    assert found[server("llm_gateway_upstream_server_live", "chat-small", "llm_chat_small", "10.0.0.1:8001")] == "0"


def test_failed_reload_shows_and_no_reload_yet_is_nan(tmp_path: Path) -> None:
    agent, nginx = make_agent(tmp_path, {"10.0.0.1:8002": "connect: refused"})
    nginx.broken = True
    agent.tick(1000.0, 1.0)
    found = samples((tmp_path / "metrics.prom").read_text())
    assert found[("llm_gateway_health_reload_failing", ())] == "1"
    assert found[("llm_gateway_health_pending", ())] == "1"
    assert found[("llm_gateway_health_last_reload_timestamp_seconds", ())] == "NaN"


def test_label_values_are_escaped() -> None:
    state = {"updated": None, "last_reload": None, "last_error": None, "pending": False,
             "upstreams": [{"name": "u", "model": 'a"b\\c\nd', "live": 0, "servers": [
                 {"address": "h:1", "state": "down", "drained": False, "live": False, "nginx": "down"}]}]}
    text = agent_module.prometheus_text(state)
    assert 'model="a\\"b\\\\c\\nd"' in text
    assert len(text.splitlines()) == len([line for line in text.splitlines() if line])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is not installed")
def test_promtool_accepts_the_text(tmp_path: Path) -> None:
    agent, _ = make_agent(tmp_path, {"10.0.0.2:8001": "connect: refused"})
    agent.tick(1000.0, 1.0)
    checked = subprocess.run(["promtool", "check", "metrics"], input=(tmp_path / "metrics.prom").read_text(),
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr

"""Unit tests of the gateway's health agent: health states, drains, the includes, reloads, /proc/net/tcp.

Nothing here opens a socket: probes and nginx's commands are stand-ins and time is passed
in, so flapping over minutes runs in milliseconds. Probes against real servers are in
test_gateway_health_probes.py.
"""

from __future__ import annotations

import getpass
import json
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import health_agent
import pytest

agent_module = health_agent.load()
Agent = agent_module.Agent
ConfigError = agent_module.ConfigError
Drain = agent_module.Drain
PeerHealth = agent_module.PeerHealth
observe = agent_module.observe

CHAT = {"name": "llm_chat_small", "model": "chat-small", "served_names": ["chat-small", "gpt-4o-mini"],
        "peers": [{"address": "10.0.0.1:8001", "weight": 3}, {"address": "10.0.0.2:8001"},
                  {"address": "10.0.0.3:8001", "backup": True}]}
EMBED = {"name": "llm_embed", "model": "embed", "api_prefix": "", "peers": [{"address": "10.0.0.1:8002"}]}


def make_config(tmp_path: Path, upstreams: Sequence[dict[str, Any]] = (CHAT, EMBED), **overrides: Any) -> Any:
    return agent_module.parse_config(health_agent.config(tmp_path, list(upstreams), **overrides))


class FakeProbes:
    """Probe results set per server address; every call is counted."""

    def __init__(self) -> None:
        self.failing: dict[str, str] = {}
        self.calls = 0

    def __call__(self, _upstream: Any, peer: Any, _timeout: float) -> str | None:
        self.calls += 1
        return self.failing.get(peer.address)


class FakeNginx:
    """nginx's test and reload commands: records them; the test fails while `broken` is set."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.broken = False

    def __call__(self, command: Sequence[str]) -> tuple[bool, str]:
        kind = "test" if "-t" in command else "reload"
        self.commands.append(kind)
        if kind == "test" and self.broken:
            return False, "nginx: [emerg] invalid parameter in llm_chat_small.servers.conf:2"
        return True, ""

    @property
    def reloads(self) -> int:
        return self.commands.count("reload")


def make_agent(tmp_path: Path, **overrides: Any) -> tuple[Any, FakeProbes, FakeNginx]:
    probes, nginx = FakeProbes(), FakeNginx()
    overrides = {"rise": 2, "fall": 3, "min_reload_interval": 30, **overrides}
    agent = Agent(make_config(tmp_path, **overrides), probe=probes, runner=nginx)
    return agent, probes, nginx


def include(tmp_path: Path, name: str = "llm_chat_small") -> str:
    return (tmp_path / "upstreams" / f"{name}.servers.conf").read_text()


# ---------------------------------------------------------------- health states


def run_results(results: Sequence[str | None], rise: int = 2, fall: int = 3) -> list[Any]:
    """The state after each result, at times 1, 2, 3, ..."""
    health, seen = PeerHealth(), []
    for now, failure in enumerate(results, start=1):
        health = observe(health, failure, float(now), rise, fall)
        seen.append(health)
    return seen


def test_first_result_decides_an_unknown_server() -> None:
    assert PeerHealth().healthy
    up = run_results([None])[0]
    assert (up.state, up.since, up.last_failure) == ("up", 1.0, None)
    down = run_results(["connect: refused"])[0]
    assert (down.state, down.since, down.last_failure, down.last_failure_at) == ("down", 1.0, "connect: refused", 1.0)
    assert not down.healthy


def test_up_server_goes_down_after_fall_consecutive_failures() -> None:
    states = run_results([None, "GET /health: HTTP 503", "GET /health: HTTP 503", None,
                          "a", "b", "GET /health: timed out after 2.0 s"], fall=3)
    assert [s.state for s in states] == ["up"] * 6 + ["down"]
    last = states[-1]
    assert last.since == 7.0
    assert last.last_failure == "GET /health: timed out after 2.0 s"
    # A pass in between restarted the count; the up state kept its first since.
    assert states[5].since == 1.0 and states[5].failures == 2


def test_down_server_comes_back_after_rise_consecutive_passes() -> None:
    states = run_results(["connect: refused", None, "connect: refused", None, None], rise=2)
    assert [s.state for s in states] == ["down", "down", "down", "down", "up"]
    assert states[-1].since == 5.0
    # The last failure stays visible after recovery, for the admin view.
    assert (states[-1].last_failure, states[-1].last_failure_at) == ("connect: refused", 3.0)


def test_rise_and_fall_of_one_follow_every_result() -> None:
    states = run_results([None, "x", None, "y"], rise=1, fall=1)
    assert [s.state for s in states] == ["up", "down", "up", "down"]


# ---------------------------------------------------------------- drains


def test_drain_covers_a_server_a_host_and_every_model() -> None:
    assert Drain("10.0.0.1:8001", "chat-small").covers("chat-small", "10.0.0.1:8001")
    assert not Drain("10.0.0.1:8001", "chat-small").covers("embed", "10.0.0.1:8001")
    assert not Drain("10.0.0.1:8001", "chat-small").covers("chat-small", "10.0.0.1:8002")
    assert Drain("10.0.0.1").covers("embed", "10.0.0.1:8002")
    assert not Drain("10.0.0.1").covers("embed", "10.0.0.10:8002")
    assert Drain("[::1]").covers("embed", "[::1]:8002")


def test_add_drain_names_the_model_by_its_canonical_name(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    for name in ("chat-small", "gpt-4o-mini", "llm_chat_small"):
        drains = agent_module.add_drain(config, (), "10.0.0.1:8001", name, 5.0)
        assert drains == (Drain("10.0.0.1:8001", "chat-small", 5.0),)
    # Draining the same again replaces the entry, it does not add one.
    again = agent_module.add_drain(config, drains, "10.0.0.1:8001", "chat-small", 9.0)
    assert again == (Drain("10.0.0.1:8001", "chat-small", 9.0),)


@pytest.mark.parametrize(("server", "model", "message"), [
    ("10.0.0.1:8001", "chat-smal", "no model 'chat-smal' on this gateway (did you mean 'chat-small'?)"),
    ("10.0.0.9:8001", "chat-small", "10.0.0.9:8001 is not a server of chat-small on this gateway (did you mean"),
    ("10.0.0.2:8002", None, "10.0.0.2:8002 is not a server of any model on this gateway"),
    ("10.0.0.2", "embed", "10.0.0.2 is not a server of embed on this gateway"),
])
def test_drain_of_nothing_is_refused(tmp_path: Path, server: str, model: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace("?)", r"\?\)")):
        agent_module.add_drain(make_config(tmp_path), (), server, model, 0.0)


def test_drain_that_leaves_a_model_no_server_needs_force(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with pytest.raises(ConfigError, match=r"draining 10.0.0.1 would leave embed \(llm_embed\) with no server"):
        agent_module.add_drain(config, (), "10.0.0.1", None, 0.0)
    assert agent_module.add_drain(config, (), "10.0.0.1", None, 0.0, force=True) == (Drain("10.0.0.1", None, 0.0),)
    drains = agent_module.add_drain(config, (), "10.0.0.1:8001", None, 0.0)
    drains = agent_module.add_drain(config, drains, "10.0.0.2:8001", None, 0.0)
    with pytest.raises(ConfigError, match="chat-small"):
        agent_module.add_drain(config, drains, "10.0.0.3:8001", "chat-small", 0.0)


def test_undrain_removes_what_it_names_and_refuses_a_wider_drain(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    drains = (Drain("10.0.0.1:8001", "chat-small"), Drain("10.0.0.1:8002", None), Drain("10.0.0.2:8001", None))
    assert agent_module.remove_drain(config, drains, "10.0.0.1:8001", "gpt-4o-mini") == drains[1:]
    # A host without a model undrains every drain of that host.
    assert agent_module.remove_drain(config, drains, "10.0.0.1", None) == drains[2:]
    # A drain for every model is not lifted by an undrain for one of them.
    with pytest.raises(ConfigError, match=r"10.0.0.2:8001 of chat-small stays drained by the drain of "
                                          r"10.0.0.2:8001 \(every model\)"):
        agent_module.remove_drain(config, drains, "10.0.0.2:8001", "chat-small")


# ---------------------------------------------------------------- the include


def test_server_lines_carry_weight_backup_and_down(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_fails=2, fail_timeout="5s")
    upstream = config.upstream_of("chat-small")
    text = agent_module.render_servers(upstream, {"10.0.0.3:8001": ["drained", "unhealthy"]}, config)
    assert text.splitlines()[1:] == [
        "server 10.0.0.1:8001 weight=3 max_fails=2 fail_timeout=5s;",
        "server 10.0.0.2:8001 max_fails=2 fail_timeout=5s;",
        "server 10.0.0.3:8001 max_fails=2 fail_timeout=5s backup down;  # drained, unhealthy",
    ]
    assert text.startswith("# Written by llm-gateway-health for chat-small")
    assert agent_module.down_in(text) == {"10.0.0.3:8001"}


def test_atomic_write_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "file.conf"
    agent_module.atomic_write(path, "one\n", 0o640)
    agent_module.atomic_write(path, "two\n", 0o644)
    assert path.read_text() == "two\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["file.conf"]


def test_first_tick_writes_every_include_and_reloads_once(tmp_path: Path) -> None:
    agent, probes, nginx = make_agent(tmp_path)
    probes.failing["10.0.0.2:8001"] = "connect: refused"
    assert agent.tick(1000.0, 0.0)
    assert nginx.commands == ["test", "reload"]
    assert "server 10.0.0.2:8001 max_fails=1 fail_timeout=10s down;  # unhealthy" in include(tmp_path)
    assert include(tmp_path, "llm_embed").splitlines()[1:] == ["server 10.0.0.1:8002 max_fails=1 fail_timeout=10s;"]


def test_unchanged_state_writes_and_reloads_nothing(tmp_path: Path) -> None:
    agent, _, nginx = make_agent(tmp_path)
    agent.tick(1000.0, 0.0)
    path = tmp_path / "upstreams" / "llm_chat_small.servers.conf"
    before = path.stat()
    for step in range(1, 20):
        assert not agent.tick(1000.0 + step * 5, step * 5.0)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert nginx.commands == ["test", "reload"]


def test_a_restarted_agent_keeps_the_files_it_finds(tmp_path: Path) -> None:
    agent, _, _ = make_agent(tmp_path)
    agent.tick(1000.0, 0.0)
    again, _, nginx = make_agent(tmp_path)
    assert not again.tick(1005.0, 0.0)
    assert nginx.commands == []


def test_hung_server_is_out_after_fall_and_back_after_rise(tmp_path: Path) -> None:
    agent, probes, nginx = make_agent(tmp_path, min_reload_interval=0)
    agent.tick(1000.0, 0.0)
    probes.failing["10.0.0.1:8001"] = "GET /health: timed out after 2.0 s"
    downs = [agent.tick(1000.0 + 5 * n, 5.0 * n) for n in (1, 2, 3)]
    assert downs == [False, False, True]
    assert "server 10.0.0.1:8001 weight=3 max_fails=1 fail_timeout=10s down;  # unhealthy" in include(tmp_path)
    del probes.failing["10.0.0.1:8001"]
    ups = [agent.tick(1000.0 + 5 * n, 5.0 * n) for n in (4, 5)]
    assert ups == [False, True]
    assert "down" not in include(tmp_path)
    assert nginx.reloads == 3


def test_flapping_reloads_at_most_once_per_min_interval(tmp_path: Path) -> None:
    agent, probes, nginx = make_agent(tmp_path, rise=1, fall=1, min_reload_interval=30)
    # Ten minutes of a server that fails every other check, a tick every 5 s.
    for n in range(120):
        if n % 2:
            probes.failing["10.0.0.2:8001"] = "GET /health: HTTP 503"
        else:
            probes.failing.pop("10.0.0.2:8001", None)
        agent.tick(1000.0 + 5 * n, 5.0 * n)
    assert 1 < nginx.reloads <= 600 // 30 + 1


def test_changes_within_the_min_interval_go_out_together(tmp_path: Path) -> None:
    agent, probes, nginx = make_agent(tmp_path, rise=1, fall=1, min_reload_interval=30)
    agent.tick(1000.0, 0.0)
    probes.failing["10.0.0.1:8001"] = "connect: refused"
    assert not agent.tick(1005.0, 5.0)
    probes.failing["10.0.0.1:8002"] = "connect: refused"
    assert not agent.tick(1010.0, 10.0)
    # Both are pending, neither is in nginx yet, and the admin view says so.
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["pending"] is True
    assert state["upstreams"][0]["servers"][0]["nginx"] == "up"
    assert state["upstreams"][0]["servers"][0]["live"] is False
    assert agent.tick(1030.0, 30.0)
    assert nginx.commands == ["test", "reload"] * 2
    assert agent_module.down_in(include(tmp_path)) == {"10.0.0.1:8001"}
    assert agent_module.down_in(include(tmp_path, "llm_embed")) == {"10.0.0.1:8002"}


def test_failed_config_test_keeps_the_old_files_and_retries_later(tmp_path: Path) -> None:
    agent, probes, nginx = make_agent(tmp_path, rise=1, fall=1, min_reload_interval=30)
    agent.tick(1000.0, 0.0)
    good = include(tmp_path)
    nginx.broken = True
    probes.failing["10.0.0.2:8001"] = "connect: refused"
    assert not agent.tick(1030.0, 30.0)
    assert include(tmp_path) == good
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["last_error"].startswith("nginx config test failed, old server lines kept: nginx: [emerg]")
    # Not retried before the next slot, then applied once nginx accepts it.
    assert not agent.tick(1035.0, 35.0)
    nginx.broken = False
    assert agent.tick(1060.0, 60.0)
    assert nginx.commands == ["test", "reload", "test", "test", "reload"]
    assert json.loads((tmp_path / "state.json").read_text())["last_error"] is None


def test_failed_first_config_test_leaves_no_include(tmp_path: Path) -> None:
    agent, _, nginx = make_agent(tmp_path)
    nginx.broken = True
    agent.tick(1000.0, 0.0)
    assert not (tmp_path / "upstreams" / "llm_chat_small.servers.conf").exists()


def test_a_drain_is_applied_at_once_and_wins_over_health(tmp_path: Path) -> None:
    agent, _, nginx = make_agent(tmp_path, min_reload_interval=300)
    agent.tick(1000.0, 0.0)
    agent_module.write_drains(tmp_path / "drain.json", [Drain("10.0.0.1", None, 1001.0)])
    assert agent.tick(1005.0, 5.0)
    assert agent_module.down_in(include(tmp_path)) == {"10.0.0.1:8001"}
    assert "server 10.0.0.1:8002 max_fails=1 fail_timeout=10s down;  # drained" in include(tmp_path, "llm_embed")
    agent_module.write_drains(tmp_path / "drain.json", [])
    assert agent.tick(1010.0, 10.0)
    assert "down" not in include(tmp_path)
    assert nginx.reloads == 3


def test_every_server_down_is_written_down(tmp_path: Path) -> None:
    """nginx then answers "no live upstreams" at once, which the gateway turns into 503 model_unavailable."""
    agent, probes, _ = make_agent(tmp_path)
    for address in ("10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"):
        probes.failing[address] = "connect: refused"
    agent.tick(1000.0, 0.0)
    assert agent_module.down_in(include(tmp_path)) == {"10.0.0.1:8001", "10.0.0.2:8001", "10.0.0.3:8001"}
    upstream = json.loads((tmp_path / "state.json").read_text())["upstreams"][0]
    assert (upstream["model"], upstream["live"]) == ("chat-small", 0)


def test_a_broken_drain_file_keeps_the_drains_read_before(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent, _, _ = make_agent(tmp_path)
    agent_module.write_drains(tmp_path / "drain.json", [Drain("10.0.0.2:8001")])
    agent.tick(1000.0, 0.0)
    (tmp_path / "drain.json").write_text('{"drains": [{"model": "x"}]}')
    agent.tick(1005.0, 5.0)
    assert agent_module.down_in(include(tmp_path)) == {"10.0.0.2:8001"}
    assert "bad entry" in caplog.text and "keeping the drains read before" in caplog.text


def test_a_probe_that_raises_counts_as_a_failure(tmp_path: Path) -> None:
    def broken(_upstream: Any, peer: Any, _timeout: float) -> str | None:
        if peer.address == "10.0.0.2:8001":
            raise ValueError("bad answer")
        return None

    agent = Agent(make_config(tmp_path), probe=broken, runner=FakeNginx())
    agent.tick(1000.0, 0.0)
    health = agent.health[("llm_chat_small", "10.0.0.2:8001")]
    assert (health.state, health.last_failure) == ("down", "probe error: ValueError: bad answer")


def test_a_new_configuration_keeps_the_state_of_servers_that_stay(tmp_path: Path) -> None:
    agent, probes, _ = make_agent(tmp_path)
    probes.failing["10.0.0.2:8001"] = "connect: refused"
    agent.tick(1000.0, 0.0)
    grown = {**CHAT, "peers": [*CHAT["peers"], {"address": "10.0.0.4:8001"}]}
    agent.set_config(make_config(tmp_path, [grown]))
    assert agent.health[("llm_chat_small", "10.0.0.2:8001")].state == "down"
    assert agent.health[("llm_chat_small", "10.0.0.4:8001")].state == "unknown"
    assert set(agent.health) == {("llm_chat_small", f"10.0.0.{n}:8001") for n in (1, 2, 3, 4)}


# ---------------------------------------------------------------- the state file


def test_state_file_shows_each_server(tmp_path: Path) -> None:
    agent, probes, _ = make_agent(tmp_path)
    probes.failing["10.0.0.2:8001"] = "GET /v1/models: model 'gpt-4o-mini' not listed"
    agent_module.write_drains(tmp_path / "drain.json", [Drain("10.0.0.3:8001", "chat-small")])
    agent.tick(1_800_000_000.0, 0.0)
    state = json.loads((tmp_path / "state.json").read_text())
    assert (state["version"], state["pid"], state["pending"]) == (1, os.getpid(), False)
    chat = state["upstreams"][0]
    assert (chat["name"], chat["model"], chat["live"]) == ("llm_chat_small", "chat-small", 1)
    first, second, third = chat["servers"]
    assert first == {"address": "10.0.0.1:8001", "weight": 3, "backup": False, "state": "up",
                     "since": "2027-01-15T08:00:00+00:00", "drained": False, "live": True, "nginx": "up",
                     "last_failure": None, "last_failure_at": None, "checked_at": "2027-01-15T08:00:00+00:00"}
    assert (second["state"], second["live"], second["nginx"]) == ("down", False, "down")
    assert second["last_failure"] == "GET /v1/models: model 'gpt-4o-mini' not listed"
    assert (third["state"], third["drained"], third["live"], third["nginx"]) == ("up", True, False, "down")
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o644


def test_a_restart_resumes_states_from_the_state_file(tmp_path: Path) -> None:
    agent, probes, _ = make_agent(tmp_path)
    probes.failing["10.0.0.2:8001"] = "connect: refused"
    agent.tick(1000.0, 0.0)
    again, probes, _ = make_agent(tmp_path)
    restored = again.health[("llm_chat_small", "10.0.0.2:8001")]
    assert (restored.state, restored.since, restored.last_failure) == ("down", 1000.0, "connect: refused")
    # One pass does not bring it back: rise applies as if the agent had not stopped.
    again.tick(1005.0, 0.0)
    assert again.health[("llm_chat_small", "10.0.0.2:8001")].state == "down"


# ---------------------------------------------------------------- configuration


def test_config_errors_are_reported_together_naming_the_upstream(tmp_path: Path) -> None:
    bad = health_agent.config(tmp_path, [
        {"name": "llm_a", "model": "a", "peers": [{"address": "10.0.0.1"}, {"address": "10.0.0.2:1", "weight": 0}],
         "servednames": ["a"]},
        {"name": "llm_b", "model": "b", "peers": [{"address": "10.0.0.3:1"}, {"address": "10.0.0.3:1"}],
         "inference": {"path": "v1/chat"}},
        {"name": "llm_a", "model": "c", "peers": []},
    ], rise=0, intervall=3)
    with pytest.raises(ConfigError) as caught:
        agent_module.parse_config(bad)
    message = str(caught.value)
    for part in ("config: 'rise' must be an integer >= 1, not 0",
                 "upstream llm_a peer 1: '10.0.0.1' is not HOST:PORT",
                 "upstream llm_a peer 2: 'weight' must be an integer >= 1, not 0",
                 "upstream llm_b: server 10.0.0.3:1 is listed twice",
                 "upstream llm_b: 'inference' must be null or",
                 "upstream llm_a: 'peers' must be a non-empty list",
                 "upstream llm_a: listed twice",
                 "upstream llm_a: unknown key 'servednames' (did you mean 'served_names'?)",
                 "config: unknown key 'intervall' (did you mean 'interval'?)"):
        assert part in message


def test_config_defaults(tmp_path: Path) -> None:
    config = make_config(tmp_path, [EMBED])
    upstream = config.upstreams[0]
    assert (upstream.served_names, upstream.api_prefix, upstream.api_key_file) == (("embed",), "", None)
    assert (config.interval, config.timeout, config.rise, config.fall) == (5.0, 2.0, 2, 3)
    assert config.nginx_test == ("nginx", "-t", "-q")


@pytest.mark.parametrize(("address", "parts"), [
    ("10.0.0.1:8001", ("10.0.0.1", 8001)), ("[fd00::1]:80", ("fd00::1", 80)), ("gpu-a.lan:8001", ("gpu-a.lan", 8001)),
])
def test_split_address(address: str, parts: tuple[str, int]) -> None:
    assert agent_module.split_address(address) == parts


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", "fd00::1:80", "a b:1"])
def test_split_address_refuses(address: str) -> None:
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        agent_module.split_address(address)


# ---------------------------------------------------------------- /proc/net/tcp

# Three nginx connections to 10.0.0.1:8001 (two ESTABLISHED, one TIME_WAIT), one of root's, a listener.
PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0 100 0 0 10 0
   1: 0500000A:C350 0100000A:1F41 01 00000000:00000000 00:00000000 00000000    33        0 1002 1 0 20 4 30 10 -1
   2: 0500000A:C351 0100000A:1F41 01 00000000:00000000 00:00000000 00000000    33        0 1003 1 0 20 4 30 10 -1
   3: 0500000A:C352 0100000A:1F41 06 00000000:00000000 03:00000F2C 00000000     0        0 0 3 0
   4: 0500000A:C353 0100000A:1F41 01 00000000:00000000 00:00000000 00000000     0        0 1004 1 0 20 4 30 10 -1
   5: 0500000A:C354 0200000A:1F41 01 00000000:00000000 00:00000000 00000000    33        0 1005 1 0 20 4 30 10 -1
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000500000A:C360 0000000000000000FFFF00000100000A:1F41 01 00000000:00000000 00:00000000 00000000    33        0 2001 1 0 20 4 30 10 -1
   1: 000080FE00000000FF00AB0201000000:C361 000080FE00000000FF00AB0202000000:1F41 01 00000000:00000000 00:00000000 00000000    33        0 2002 1 0 20 4 30 10 -1
"""  # noqa: E501 - the kernel's line


@pytest.mark.skipif(sys.byteorder != "little", reason="the sample was taken on a little-endian host")
def test_proc_net_tcp_is_parsed() -> None:
    sockets = agent_module.parse_proc_net_tcp(PROC_NET_TCP)
    assert len(sockets) == 6
    assert sockets[1] == agent_module.TcpSocket(("10.0.0.5", 50000), ("10.0.0.1", 8001), 1, 33)
    assert sockets[0].state == 0x0A and sockets[0].local == ("0.0.0.0", 80)
    six = agent_module.parse_proc_net_tcp(PROC_NET_TCP6)
    # An IPv4-mapped address is the IPv4 one; a link-local one is read word by word.
    assert six[0].remote == ("10.0.0.1", 8001)
    assert six[1].remote == ("fe80::2ab:ff:0:2", 8001)
    everything = sockets + six
    assert agent_module.established_to(everything, [("10.0.0.1", 8001)], 33) == 3
    assert agent_module.established_to(everything, [("10.0.0.1", 8001)], None) == 4
    assert agent_module.established_to(everything, [("10.0.0.2", 8001), ("fe80::2ab:ff:0:2", 8001)], 33) == 2


def test_connection_counts_read_proc_files(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(PROC_NET_TCP)
    counts = agent_module.connection_counts(["10.0.0.1:8001", "10.0.0.9:8001"], None, proc=tmp_path)
    assert counts == {"10.0.0.1:8001": 3, "10.0.0.9:8001": 0}
    with pytest.raises(ConfigError, match="nginx_user 'no-such-user-here' is not a user on this host"):
        agent_module.connection_counts(["10.0.0.1:8001"], "no-such-user-here", proc=tmp_path)


# ---------------------------------------------------------------- the CLI


def write_config(tmp_path: Path, **overrides: Any) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(health_agent.config(tmp_path, [CHAT, EMBED], nginx_user=getpass.getuser(),
                                                   **overrides)))
    return path


def cli(config: Path, *args: str) -> int:
    code = agent_module.main([args[0], "--config", str(config), *args[1:]])
    assert isinstance(code, int)
    return code


def test_cli_drain_undrain_and_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert cli(config, "drain", "--model", "gpt-4o-mini", "--server", "10.0.0.1:8001") == 0
    assert "drained 10.0.0.1:8001 for gpt-4o-mini; no running agent was told" in capsys.readouterr().out
    drains = json.loads((tmp_path / "drain.json").read_text())["drains"]
    assert [(d["server"], d["model"]) for d in drains] == [("10.0.0.1:8001", "chat-small")]
    assert cli(config, "status", "--server", "10.0.0.1") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["connections"] == 0
    servers = {(u["model"], s["address"]): s for u in shown["upstreams"] for s in u["servers"]}
    assert set(servers) == {("chat-small", "10.0.0.1:8001"), ("embed", "10.0.0.1:8002")}
    assert servers[("chat-small", "10.0.0.1:8001")]["drained"] is True
    assert servers[("embed", "10.0.0.1:8002")]["drained"] is False
    assert cli(config, "undrain", "--server", "10.0.0.1") == 0
    assert json.loads((tmp_path / "drain.json").read_text())["drains"] == []


def test_cli_errors_name_the_model_and_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert cli(config, "drain", "--model", "embed", "--server", "10.0.0.1:8002") == 2
    assert capsys.readouterr().err == ("llm-gateway-health: draining 10.0.0.1:8002 would leave embed (llm_embed) "
                                       "with no server in rotation; add --force to drain it anyway\n")
    assert cli(config, "drain", "--server", "10.0.0.7:8001") == 2
    assert "10.0.0.7:8001 is not a server of any model" in capsys.readouterr().err
    assert not (tmp_path / "drain.json").exists()


def test_cli_wait_gives_up_without_an_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert cli(config, "drain", "--server", "10.0.0.2:8001", "--wait", "0.3") == 1
    assert "nginx did not apply the drain of 10.0.0.2:8001 within 0.3 s" in capsys.readouterr().err


def test_cli_render_writes_includes_with_drains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert cli(config, "drain", "--server", "10.0.0.2:8001") == 0
    assert cli(config, "render") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"changed": ["llm_chat_small", "llm_embed"]}
    assert agent_module.down_in(include(tmp_path)) == {"10.0.0.2:8001"}
    assert cli(config, "render") == 0
    assert json.loads(capsys.readouterr().out) == {"changed": []}


def test_cli_wait_idle_with_no_connection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert cli(config, "wait-idle", "--server", "10.0.0.2:8001", "--timeout", "1") == 0
    assert "10.0.0.2:8001: no connection from nginx left" in capsys.readouterr().out



def test_cli_wait_idle_on_a_server_no_longer_configured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After the reload that dropped a server, old workers may still finish requests on it."""
    config = write_config(tmp_path)
    assert cli(config, "wait-idle", "--server", "10.0.0.9:8009", "--timeout", "1") == 0
    assert "10.0.0.9:8009: no connection from nginx left" in capsys.readouterr().out
    assert cli(config, "wait-idle", "--server", "10.0.0.9", "--timeout", "1") == 2
    assert "no server 10.0.0.9 on this gateway" in capsys.readouterr().err

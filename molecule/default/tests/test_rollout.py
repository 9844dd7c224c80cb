"""Rolling changes and failures under load (issue 15), one phase after the other.

A load generator sends chat, streamed chat and embeddings through the gateway the whole
time, while:
  1. chat-rolled is added to mol-gpu2 and mol-gpu3 by playbooks/rollout.yml;
  2. its arguments change on both hosts (a rollout naming it in rollout_models);
  3. a change that breaks it (its server answers under another prefix) halts the rollout
     at its first host, which stays out of rotation while the other keeps serving;
  4. it is removed;
  5. a chat-small backend is killed (systemd brings it back after RestartSec);
  6. one is frozen with SIGSTOP, then thawed;
  7. the whole mol-gpu3 container is stopped, then started again.
Each phase's numbers, the detection and return times and the rollouts' own overhead per
host are printed, past pytest's capture.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import requests
from lab_pytest import api_key, credential, play_output, run_playbook, wait_until
from load_generator import LoadGenerator, Workload

testinfra_hosts = ["ansible://mol-gw"]

ROLLED = "chat-rolled"
# molecule.yml's settings of the health agent.
INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2
STATE = "/run/llm-gateway-health/state.json"
ROLLOUTS = ("1 add a model to two hosts", "2 change its arguments", "3 a change that fails its check",
            "4 remove it")
FAILURES = ("5 kill a backend", "6 freeze a backend", "7 stop a GPU host")
# What the rollout prints for each host (roles/rollout/tasks/undrain.yml), wrapped by the callback.
OVERHEAD_LINE = r"rollout of mol-[\w-]+ \(.*?overhead beyond the deploy\s+[0-9.]+ s"


def rolled_model(args: list[str] | None = None) -> dict:
    """The model the phases add, change and remove: chat on two of the three GPU hosts."""
    return {"name": ROLLED, "engine": "command", "command": "{{ llm_test_backend }}", "endpoints": ["chat"],
            "hosts": ["mol-gpu2", "mol-gpu3"], "port": 8107, **({"args": args} if args else {})}


def server_state(gateway, model: str, address: str) -> dict:
    """The health agent's view of `model` on the host at `address` (its state file on the gateway)."""
    state = json.loads(gateway.check_output(f"cat {STATE}"))
    for upstream in state["upstreams"]:
        for server in upstream["servers"] if upstream["model"] == model else []:
            if server["address"].rsplit(":", 1)[0] == address:
                return server
    raise AssertionError(f"{model} on {address} is not in the agent's state")


def seconds_until(check, timeout: float) -> float | None:
    """Seconds until `check` holds, or None when it did not within `timeout`."""
    start = time.monotonic()
    return time.monotonic() - start if wait_until(check, timeout=timeout, interval=0.05) else None


def serves(address: str, port: int) -> bool:
    """Whether the backend answers /health, asked directly."""
    try:
        return requests.get(f"http://{address}:{port}/health", timeout=0.5).status_code == 200
    except requests.RequestException:
        return False


def failure_and_return(gateway, address: str, port: int, fail, recover) -> dict:
    """Seconds from `fail()` until nginx has the server down, and from its recovery until it is up."""
    def in_nginx(state: str):
        return lambda: server_state(gateway, "chat-small", address)["nginx"] == state

    fail()
    down = seconds_until(in_nginx("down"), 20)
    recover()
    assert wait_until(lambda: serves(address, port), timeout=90, interval=0.1), f"{address}:{port} never came back"
    back = seconds_until(in_nginx("up"), 30)
    return {"down": down, "back": back}


@pytest.fixture(scope="module")
def phases(gateway_url, registry, address_of, lab_host, tmp_path_factory, request):
    """The seven phases under load: the generator's results, the playbooks' results, the times."""
    workdir = tmp_path_factory.mktemp("rollout")
    played: dict[str, subprocess.CompletedProcess] = {}
    times: dict[str, dict] = {}
    load = LoadGenerator(gateway_url, api_key(), [
        Workload(kind="chat", model="chat-small", concurrency=2),
        Workload(kind="stream", model="chat-small", concurrency=2),
        Workload(kind="embeddings", model="embed-small", concurrency=1),
    ])
    with load:
        with load.phase(ROLLOUTS[0]):
            played[ROLLOUTS[0]] = run_playbook("playbooks/rollout.yml", workdir, {
                "llm_models": [*registry, rolled_model()], "rollout_models": [ROLLED]})
        load.add(Workload(kind="chat", model=ROLLED, concurrency=1, may_vanish=True))
        load.add(Workload(kind="stream", model=ROLLED, concurrency=1, may_vanish=True))
        with load.phase(ROLLOUTS[1]):
            played[ROLLOUTS[1]] = run_playbook("playbooks/rollout.yml", workdir, {
                "llm_models": [*registry, rolled_model(["--stream-interval", "0.1"])], "rollout_models": [ROLLED]})
        with load.phase(ROLLOUTS[2]):
            played[ROLLOUTS[2]] = run_playbook("playbooks/rollout.yml", workdir, {
                "llm_models": [*registry, rolled_model(["--api-prefix", "/elsewhere"])], "rollout_models": [ROLLED]})
        with load.phase(ROLLOUTS[3]):
            played[ROLLOUTS[3]] = run_playbook("playbooks/rollout.yml", workdir, {
                "llm_models": registry, "rollout_models": [ROLLED]})
        load.remove(ROLLED)
        # Streams that began at the end of phase 4 count there: let them end before phase 5 kills.
        time.sleep(3)

        gateway = lab_host("mol-gw")
        gpu1, gpu2, gpu3 = (address_of(host) for host in ("mol-gpu1", "mol-gpu2", "mol-gpu3"))
        with load.phase(FAILURES[0]):
            times[FAILURES[0]] = failure_and_return(
                gateway, gpu1, 8101, lambda: lab_host("mol-gpu1").check_output(
                    "systemctl kill --signal=SIGKILL llm-model-chat-small"), lambda: None)
        with load.phase(FAILURES[1]):
            frozen = lab_host("mol-gpu2")
            pid = frozen.check_output("systemctl show --property MainPID --value llm-model-chat-small")
            times[FAILURES[1]] = failure_and_return(gateway, gpu2, 8101,
                                                    lambda: frozen.check_output(f"kill -STOP {pid}"),
                                                    lambda: frozen.check_output(f"kill -CONT {pid}"))
        with load.phase(FAILURES[2]):
            times[FAILURES[2]] = failure_and_return(
                gateway, gpu3, 8101, lambda: subprocess.run(["docker", "stop", "-t", "5", "mol-gpu3"], check=True),
                lambda: subprocess.run(["docker", "start", "mol-gpu3"], check=True))
    # Past pytest's capture (at the file descriptor too), so a passing run shows them.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    lines = []
    say = lines.append
    say("\n" + load.report())
    for phase, measured in times.items():
        down, back = (f"{measured[k]:.2f} s" if measured[k] is not None else "never" for k in ("down", "back"))
        say(f"{phase}: out of rotation after {down}, back {back} after it served again")
    for phase, result in played.items():
        for line in re.findall(OVERHEAD_LINE, result.stdout, re.S):
            say(f"{phase}: {' '.join(line.split())}")
    with capture.global_and_fixture_disabled():
        print("\n".join(lines), flush=True)
    return load.results(), played, times


def test_rollouts_end_as_they_should(phases):
    _, played, _ = phases
    for phase in (ROLLOUTS[0], ROLLOUTS[1], ROLLOUTS[3]):
        assert played[phase].returncode == 0, f"{phase}:\n{play_output(played[phase])}"
    assert played[ROLLOUTS[2]].returncode != 0


def test_the_failed_rollout_names_the_host_and_the_check(phases):
    _, played, _ = phases
    # A failed task goes to stderr in some environments (molecule's among them).
    output = played[ROLLOUTS[2]].stdout + played[ROLLOUTS[2]].stderr
    # The callback wraps long messages at the terminal's width.
    assert re.search(r"fatal: \[mol-gpu2\].*?POST\s+/v1/chat/completions\s+answered\s+404", output, re.S), \
        output[-3000:]
    # It stopped there: mol-gpu3 was never rolled, nor were the gateways reconfigured.
    assert "rollout of mol-gpu3" not in output


def test_no_request_failed_and_no_stream_was_cut_during_the_rollouts(phases):
    results, _, _ = phases
    for phase in ROLLOUTS:
        total = results[phase].total()
        assert total.sent > 0, phase
        assert (total.failed, total.streams_cut) == (0, 0), f"{phase}: {results[phase].failures}"
    # The new model was served between its addition and its removal, and no request to it failed.
    assert results[ROLLOUTS[1]].by_model[ROLLED].ok > 0
    assert results[ROLLOUTS[2]].by_model[ROLLED].ok > 0


def test_no_plain_request_failed_during_the_failures(phases):
    results, _, _ = phases
    for phase in FAILURES:
        plain = results[phase].total(("chat", "embeddings"))
        assert plain.sent > 0 and plain.failed == 0, f"{phase}: {results[phase].failures}"


def test_failures_are_detected_within_interval_times_fall_and_servers_back_within_rise(phases):
    _, _, times = phases
    for phase, measured in times.items():
        assert measured["down"] is not None and measured["down"] <= INTERVAL * FALL + 1.0, (phase, measured)
        assert measured["back"] is not None and measured["back"] <= INTERVAL * RISE + 1.0, (phase, measured)


def test_readiness_names_a_model_without_a_live_server_then_recovers(phases, gateway_url, lab_host):
    """After the phases (their load is over): every server of chat-large stopped, then started."""
    def ready() -> requests.Response:
        return requests.get(f"{gateway_url}/ready", auth=("admin", credential("admin-password")), timeout=10)

    gpu1 = lab_host("mol-gpu1")
    gpu1.check_output("systemctl stop llm-model-chat-large")
    try:
        assert wait_until(lambda: ready().status_code == 503, timeout=10)
        body = ready().json()
    finally:
        gpu1.check_output("systemctl start llm-model-chat-large")
    assert body["unavailable"] == ["chat-large"] and "chat-large" in body["message"], body
    server = next(u for u in body["upstreams"] if u.get("model") == "chat-large")["servers"][0]
    assert server["state"] == "down" and server["last_failure"].startswith("connect"), server
    assert wait_until(lambda: ready().status_code == 200, timeout=15)

"""Rolling changes and failures under load (issue 15), one phase after the other.

A load generator sends chat, streamed chat and embeddings through the gateway the
whole time, while: (1) chat-rolled is added to mol-gpu2 and mol-gpu3 by
playbooks/rollout.yml, (2) its arguments change on both hosts, (3) it is removed,
(4) a chat-small backend is killed, (5) one is frozen with SIGSTOP, (6) the whole
mol-gpu3 container is stopped. Each failure is undone after its detection, and the
server is back within rise. The phases' numbers are printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import time

import pytest
from lab_pytest import api_key, lab_host, play_output, run_playbook, wait_until
from load_generator import LoadGenerator, Workload

ROLLED = "chat-rolled"
# From molecule.yml's gateway settings: the agent's interval, timeout, rise and fall.
INTERVAL, TIMEOUT, RISE, FALL = 1.0, 0.5, 2, 2
DETECTION = INTERVAL * FALL + 1.0
STATE = "/run/llm-gateway-health/state.json"


def rolled_model(args: list[str] | None = None) -> dict:
    """The model the phases add, change and remove: chat on two of the three GPU hosts."""
    return {"name": ROLLED, "engine": "command", "command": "{{ llm_test_backend }}", "endpoints": ["chat"],
            "hosts": ["mol-gpu2", "mol-gpu3"], "port": 8107, **({"args": args} if args else {})}


def server_state(gateway, model: str, host_address: str) -> dict:
    """The agent's view of one server of `model` (state file on the gateway)."""
    state = json.loads(gateway.check_output(f"cat {STATE}"))
    for upstream in state["upstreams"]:
        if upstream["model"] == model:
            for server in upstream["servers"]:
                if server["address"].startswith(host_address + ":"):
                    return server
    raise AssertionError(f"{model} on {host_address} not in the agent's state")


def timed(check, timeout: float) -> float | None:
    """Seconds until `check` holds, or None after `timeout`."""
    start = time.monotonic()
    if wait_until(check, timeout=timeout, interval=0.1):
        return time.monotonic() - start
    return None


@pytest.fixture(scope="module")
def phases(gateway_url, registry, address_of, tmp_path_factory):
    """Runs the six phases under load; returns the generator's results and what each phase measured."""
    gateway = lab_host("mol-gw")
    workdir = tmp_path_factory.mktemp("rollout")
    measured: dict[str, dict] = {}
    load = LoadGenerator(gateway_url, api_key(), [
        Workload(kind="chat", model="chat-small", concurrency=2),
        Workload(kind="stream", model="chat-small", concurrency=2),
        Workload(kind="embeddings", model="embed-small", concurrency=1),
    ])
    load.start()
    try:
        with load.phase("1 add a model to two hosts"):
            result = run_playbook("playbooks/rollout.yml", workdir, {"llm_models": [*registry, rolled_model()]})
            measured["1"] = {"result": result}
        load.add(Workload(kind="chat", model=ROLLED, concurrency=1, may_vanish=True))
        load.add(Workload(kind="stream", model=ROLLED, concurrency=1, may_vanish=True))
        time.sleep(2)
        with load.phase("2 change its arguments on both hosts"):
            result = run_playbook("playbooks/rollout.yml", workdir, {
                "llm_models": [*registry, rolled_model(["--stream-interval", "0.1"])],
                "rollout_models": [ROLLED]})
            measured["2"] = {"result": result}
        with load.phase("3 remove it"):
            result = run_playbook("playbooks/rollout.yml", workdir, {"llm_models": registry})
            measured["3"] = {"result": result}
        load.remove(ROLLED)

        gpu1, gpu2 = address_of("mol-gpu1"), address_of("mol-gpu2")
        with load.phase("4 kill a backend"):
            lab_host("mol-gpu1").check_output("systemctl kill --signal=SIGKILL llm-model-chat-small")
            down = timed(lambda: server_state(gateway, "chat-small", gpu1)["nginx"] == "down", 20)
            # systemd restarts it after RestartSec (5 s); back after rise passes.
            back = timed(lambda: server_state(gateway, "chat-small", gpu1)["nginx"] == "up", 30)
            measured["4"] = {"down": down, "back": back}
        with load.phase("5 freeze a backend"):
            pid = lab_host("mol-gpu2").check_output("systemctl show --property MainPID --value llm-model-chat-small")
            lab_host("mol-gpu2").check_output(f"kill -STOP {pid}")
            down = timed(lambda: server_state(gateway, "chat-small", gpu2)["nginx"] == "down", 20)
            lab_host("mol-gpu2").check_output(f"kill -CONT {pid}")
            back = timed(lambda: server_state(gateway, "chat-small", gpu2)["nginx"] == "up", 20)
            measured["5"] = {"down": down, "back": back}
        with load.phase("6 stop a GPU host"):
            gpu3 = address_of("mol-gpu3")
            stopped = lab_host("mol-gpu3")
            import subprocess  # the container itself, from the machine running the tests

            subprocess.run(["docker", "stop", "--time", "5", "mol-gpu3"], check=True, capture_output=True)
            down = timed(lambda: server_state(gateway, "chat-small", gpu3)["nginx"] == "down", 30)
            subprocess.run(["docker", "start", "mol-gpu3"], check=True, capture_output=True)
            back = timed(lambda: server_state(gateway, "chat-small", gpu3)["nginx"] == "up", 60)
            measured["6"] = {"down": down, "back": back, "host": stopped}
    finally:
        load.stop()
    print("\n" + load.report())
    for name in ("4", "5", "6"):
        print(f"phase {name}: detected in {measured[name]['down']} s, back in {measured[name]['back']} s")
    return load, measured

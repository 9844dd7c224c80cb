"""Fixtures and helpers shared by every scenario's testinfra tests (a pytest plugin).

.config/molecule/config.yml loads it with `-p lab_pytest` and puts molecule/shared
on PYTHONPATH; tests import `wait_until` and `assigned_models` from here.
Requests are sent from the machine running molecule straight to the lab
containers' addresses on the scenario's private docker network, never elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import testinfra


def _dump_journal(host: testinfra.host.Host, unit: str) -> str:
    return host.run(f"journalctl -u {unit} -n 40 --no-pager").stdout


@pytest.fixture(scope="session")
def inventory() -> dict[str, Any]:
    """The scenario's inventory as ansible-inventory resolves it (groups and vars)."""
    out = subprocess.run(
        ["ansible-inventory", "-i", os.environ["MOLECULE_INVENTORY_FILE"], "--list"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


@pytest.fixture(scope="session")
def lab_host() -> Callable[[str], testinfra.host.Host]:
    """A testinfra handle on any lab host by inventory name."""
    def get(name: str) -> testinfra.host.Host:
        return testinfra.get_host(f"ansible://{name}", ansible_inventory=os.environ["MOLECULE_INVENTORY_FILE"])
    return get


@pytest.fixture(scope="session")
def address_of() -> Callable[[str], str]:
    """The private address of a lab host: its address on the scenario's docker network.

    Asked of the docker engine that runs the lab, not of the host: `hostname -I` on a
    host with its own Docker Engine lists docker0's address too.
    """
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = subprocess.run(
                ["docker", "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", name],
                check=True, capture_output=True, text=True,
            ).stdout.split()[0]
        return cache[name]
    return get


@pytest.fixture(scope="session")
def gateway_url(inventory, address_of) -> str:
    gateway = inventory["llm_gateways"]["hosts"][0]
    return f"http://{address_of(gateway)}"


@pytest.fixture(scope="session")
def registry(inventory) -> list[dict[str, Any]]:
    """The scenario's llm_models as written (templates in `command` not yet rendered)."""
    gateway = inventory["llm_gateways"]["hosts"][0]
    return inventory["_meta"]["hostvars"][gateway]["llm_models"]


def hosts_of(model: dict[str, Any], inventory: dict[str, Any]) -> list[str]:
    """The hosts a registry model runs on, groups expanded as the registry does."""
    hosts: list[str] = []
    for entry in model["hosts"]:
        hosts += inventory.get(entry, {}).get("hosts", []) or [entry]
    return sorted(set(hosts))


def assigned_models(host: testinfra.host.Host, inventory: dict[str, Any],
                    runtime: str | None = None) -> list[dict[str, Any]]:
    """The registry's models that run on this testinfra host (only those of one runtime if given)."""
    name = host.backend.get_hostname()
    registry = inventory["_meta"]["hostvars"][name]["llm_models"]
    return [model for model in registry if name in hosts_of(model, inventory)
            and runtime in (None, model.get("runtime", "systemd"))]


def run_playbook(playbook: str, workdir: Path, extra_vars: dict[str, Any] | None = None,
                 *options: str) -> subprocess.CompletedProcess:
    """A playbook of the project (path from the repository root) against the scenario's inventory.

    Extra vars go through a JSON file, so registry entries keep their types; molecule's
    environment (ANSIBLE_CONFIG and friends) is inherited, as in its converge.
    """
    command = ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"],
               str(Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / playbook), *options]
    if extra_vars is not None:
        path = workdir / "extra_vars.json"
        path.write_text(json.dumps(extra_vars))
        command += ["--extra-vars", f"@{path}"]
    environment = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False, env=environment)


def play_output(result: subprocess.CompletedProcess) -> str:
    """The end of a playbook's output, for assertion messages."""
    return result.stdout[-4000:] + result.stderr[-2000:]


def wait_until(check: Callable[[], bool], timeout: float = 30.0, interval: float = 0.5) -> bool:
    """Poll `check` until it holds or `timeout` passes; return its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the journal of the model and nginx services of the host under test."""
    outcome = yield
    report = outcome.get_result()
    host = item.funcargs.get("host") if hasattr(item, "funcargs") else None
    if report.when == "call" and report.failed and host is not None:
        units = host.run("systemctl list-units --no-legend --plain 'llm-model-*' nginx.service").stdout.split()
        for unit in [u for u in units if u.endswith(".service")]:
            report.sections.append((f"journal {unit}", _dump_journal(host, unit)))

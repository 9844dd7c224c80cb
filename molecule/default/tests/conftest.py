"""Fixtures shared by the scenario's testinfra tests.

Requests are sent from the machine running molecule straight to the lab
containers' addresses on the scenario's private docker network, never elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
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
def address_of(lab_host) -> Callable[[str], str]:
    """The private address of a lab host (the one the gateway routes to)."""
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = lab_host(name).check_output("hostname -I").split()[0]
        return cache[name]
    return get


@pytest.fixture(scope="session")
def gateway_url(inventory, address_of) -> str:
    gateway = inventory["llm_gateways"]["hosts"][0]
    return f"http://{address_of(gateway)}"


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

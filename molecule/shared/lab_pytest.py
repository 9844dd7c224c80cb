"""Fixtures and helpers shared by every scenario's testinfra tests (a pytest plugin).

.config/molecule/config.yml loads it with `-p lab_pytest` and puts molecule/shared
on PYTHONPATH; tests import `wait_until`, `assigned_models` and the gateway helpers
(`post`, `landed`, `assert_openai_error`, `backend_path`) from here.
Requests are sent from the machine running molecule straight to the lab
containers' addresses on the scenario's private docker network, never elsewhere.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
import testinfra

# Where clients call each endpoint on the gateway. The tests say it themselves rather than ask
# the registry plugin, so a wrong path in the product cannot agree with itself.
GATEWAY_PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "rerank": "/v1/rerank",
    "responses": "/v1/responses",
    "score": "/v1/score",
    "tokenize": "/tokenize",
    "detokenize": "/detokenize",
}
# The endpoints whose body is a multipart form (audio); the JSON tests leave them out.
MULTIPART_PATHS = {
    "audio_transcriptions": "/v1/audio/transcriptions",
    "audio_translations": "/v1/audio/translations",
}


def json_endpoints(model: dict[str, Any]) -> list[str]:
    """A registry model's endpoints that take a JSON body, in the registry's order."""
    return [endpoint for endpoint in model.get("endpoints", ["chat", "completions"]) if endpoint in GATEWAY_PATHS]


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
    """The hosts a registry model runs on, groups expanded as the registry does (an entry is a
    name, or a mapping with the name under `host` and a weight or backup flag)."""
    hosts: list[str] = []
    for entry in model["hosts"]:
        name = entry if isinstance(entry, str) else entry["host"]
        hosts += inventory.get(name, {}).get("hosts", []) or [name]
    return sorted(set(hosts))


def primary_hosts(model: dict[str, Any], inventory: dict[str, Any]) -> list[str]:
    """The hosts that serve a model while all is well: its hosts but the backups."""
    backups = hosts_of({"hosts": [entry for entry in model["hosts"]
                                  if isinstance(entry, dict) and entry.get("backup")]}, inventory)
    return [host for host in hosts_of(model, inventory) if host not in backups]


# Sent with a request that must reach a backend even if its model caches (registry `cache`).
PAST_THE_CACHE = {"Cache-Control": "no-store"}


def backend_path(model: dict[str, Any], endpoint: str) -> str:
    """Where a model's server answers an endpoint: its api_prefix replaces /v1 (Infinity-style
    servers have none), and the paths outside /v1 (vLLM's /tokenize, /detokenize) stay at the root."""
    path = {**GATEWAY_PATHS, **MULTIPART_PATHS}[endpoint]
    if path.startswith("/v1/"):
        return model.get("api_prefix", "/v1") + path[len("/v1"):]
    return path


@dataclass(frozen=True)
class Backend:
    """One model's test backend on one host, asked what it received (GET /_test/requests)."""

    host: str
    url: str
    model: dict

    def received(self) -> list[dict]:
        """Every request but the probes: readiness's GET /health, the health agent's checks and
        Prometheus' scrapes of GET /metrics (the default scenario's gateway is also its Prometheus)."""
        records = requests.get(f"{self.url}/_test/requests", timeout=5).json()
        return [r for r in records if (r["method"], r["path"]) not in (("GET", "/health"), ("GET", "/metrics"))
                and r["headers"].get("user-agent") != ["llm-gateway-health"]]

    def clear(self) -> None:
        requests.delete(f"{self.url}/_test/requests", timeout=5).raise_for_status()


@pytest.fixture(scope="module")
def backends(registry, inventory, address_of) -> list[Backend]:
    """One Backend per (model, host), hosts expanded from groups as the registry does."""
    return [Backend(host, f"http://{address_of(host)}:{model['port']}", model)
            for model in registry for host in hosts_of(model, inventory)]


@pytest.fixture()
def clean(backends) -> list[Backend]:
    """The backends with their request logs emptied, so a test sees only its own requests."""
    for backend in backends:
        backend.clear()
    return backends


def landed(backends: list[Backend]) -> dict[tuple[str, str], list[dict]]:
    """What each (model, host) received, for the backends that received anything."""
    received = {(b.model["name"], b.host): b.received() for b in backends}
    return {key: records for key, records in received.items() if records}


def credential(name: str) -> str:
    """A secret the scenario generated on the controller (ansible.builtin.password lookups into
    the inventory's credentials/ directory): an API key, an admin password, a model server's key."""
    path = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent / "credentials" / name
    return path.read_text().split()[0]


def api_key(key_id: str = "tests") -> str:
    """A client key of the scenario's llm_api_keys; "tests" may use every model."""
    return credential(f"api-keys/{key_id}")


def bearer(key_id: str = "tests") -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key(key_id)}"}


def post(gateway_url: str, endpoint: str, body: bytes, headers: dict | None = None) -> requests.Response:
    """A JSON body, as is, to an endpoint's path on the gateway, with the "tests" key unless
    `headers` bring an Authorization of their own."""
    return requests.post(gateway_url + GATEWAY_PATHS[endpoint], data=body,
                         headers={"Content-Type": "application/json", **bearer(), **(headers or {})}, timeout=60)


def get(gateway_url: str, path: str, key_id: str | None = "tests") -> requests.Response:
    """A GET on the gateway, with a client key (None: without one)."""
    return requests.get(gateway_url + path, headers=bearer(key_id) if key_id else {}, timeout=10)


def assert_openai_error(response: requests.Response, status: int, code: str | None = None) -> dict:
    """The gateway's errors are OpenAI-shaped JSON, never nginx's HTML; returns the error object."""
    assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= error.keys(), error
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code, error
    return error


CONNECT_TIMEOUT = 3
# Exits 0 when a TCP connection opens within the timeout, 1 (with the reason) when it does not.
CONNECT = ("import socket, sys\n"
           "try:\n"
           f"    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout={CONNECT_TIMEOUT}).close()\n"
           "except OSError as error:\n"
           "    sys.exit(f'{type(error).__name__}: {error}')\n")


def connects(client: testinfra.host.Host, address: str, port: int) -> bool:
    """Whether `client` (a lab host) can open a TCP connection to address:port, within CONNECT_TIMEOUT."""
    result = client.run(f"python3 -c {shlex.quote(CONNECT)} {address} {port}")
    return result.rc == 0


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


# The smallest body of each kind, for wait_served.
SMALLEST_BODY = {"chat": {"messages": [{"role": "user", "content": "hi"}]}, "embeddings": {"input": "hi"}}


def wait_served(gateway_url: str, models: list[dict], headers: dict | None = None, timeout: float = 90.0) -> None:
    """Wait until the gateway serves each of `models` again. A converge that restarts a model
    server (a new key, new arguments) can end before the gateway routes to it again: its health
    agent took the server out while it restarted and takes it back only after `rise` good probes
    and a reload (the rolling playbook waits for that; site.yml does not)."""
    for model in models:
        endpoint = next(name for name in SMALLEST_BODY if name in model["endpoints"])
        path, body = GATEWAY_PATHS[endpoint], SMALLEST_BODY[endpoint]

        def answers(name: str = model["name"]) -> bool:
            try:
                return requests.post(gateway_url + path, json={"model": name, **body}, headers=headers or {},
                                     timeout=30).status_code == 200
            except requests.RequestException:
                return False

        assert wait_until(answers, timeout, 1.0), f"the gateway does not serve {model['name']} within {timeout:g} s"


def play_output(result: subprocess.CompletedProcess) -> str:
    """The end of a playbook's output, for assertion messages."""
    return result.stdout[-4000:] + result.stderr[-2000:]


def access_log_lines(host: testinfra.host.Host, needle: str) -> list[str]:
    """The gateway's access log lines holding `needle`, grepped on the host: after the load
    tests the log holds hundreds of thousands of lines, too many to copy each time."""
    return host.run(f"grep -F -- {shlex.quote(needle)} /var/log/nginx/llm-access.log").stdout.splitlines()


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

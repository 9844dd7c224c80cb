"""A registry of 1,000 models with two aliases each, every name routed by nginx alone.

The backends are one small nginx listening on every model's address and port, answering
with the address, port and path it was reached at; the gateway's njs router refuses every
request, so each answer proves that nginx's patterns and name table routed it.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import llm_registry
import pytest
from gateway_lab import NGINX, bindable, free_port, model, nginx_missing, nginx_test, post_json, refuse_njs_routes, \
    render_gateway, start_nginx, stop, write_nginx_conf

MODELS = 1000
HOSTS = {f"gpu-{i}": f"127.0.1.{i + 1}" for i in range(10)}
# Endpoint sets that cover every API path between them.
ENDPOINT_SETS = [["chat", "completions"], ["embeddings", "rerank"], ["responses", "score"],
                 ["tokenize", "detokenize"], ["chat", "completions", "responses", "score", "tokenize", "detokenize"]]


def backend_conf(root: Path, listeners: list[tuple[str, int]]) -> Path:
    """One nginx answering on every listener with where it was reached."""
    servers = "\n".join(f"    server {{ listen {address}:{port}; return 200 '{{{{\"ok\":true}}}}'; }}"
                        for address, port in listeners)
    return write_nginx_conf(root, f"""
    access_log off;
    default_type application/json;
    client_max_body_size 1m;
    client_body_buffer_size 1m;
    add_header X-Reached "$server_addr:$server_port $uri" always;
{servers}
""")


def registry(base_port: int) -> list[dict[str, object]]:
    entries = []
    for i in range(MODELS):
        entries.append(model(f"org-{i % 37}/model-{i:04d}", [f"gpu-{i % len(HOSTS)}"], base_port + i,
                             ENDPOINT_SETS[i % len(ENDPOINT_SETS)], [f"model-{i:04d}-latest", f"m{i}:v2.{i % 7}"],
                             api_prefix="" if i % 3 == 0 else "/v1"))
    return entries


@pytest.fixture(scope="module")
def base_port() -> int:
    """The first of MODELS ports, each free on the address of the host its model runs on."""
    hosts = list(HOSTS.values())
    for _ in range(20):
        base = random.randrange(20000, 60000 - MODELS)
        if all(bindable(hosts[i % len(hosts)], base + i) for i in range(MODELS)):
            return base
    raise RuntimeError("no free range of ports")


def test_thousand_models_routed_by_nginx_alone(tmp_path: Path, base_port: int,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    models = registry(base_port)
    started = time.monotonic()
    conf = render_gateway(tmp_path / "gateway", models, HOSTS, gateway_http_port=(port := free_port()),
                          gateway_https_port=0)
    rendered = time.monotonic() - started
    refuse_njs_routes(tmp_path / "gateway")
    started = time.monotonic()
    check = nginx_test(conf)
    checked = time.monotonic() - started
    assert check.returncode == 0, check.stderr[-2000:]
    gateway_conf = (tmp_path / "gateway" / "llm" / "gateway.conf").read_text()

    normalized = llm_registry.llm_registry_normalize(models, {"all": sorted(HOSTS)})
    listeners = [(HOSTS[m["hosts"][0]], m["port"]) for m in normalized]
    backend = start_nginx(backend_conf(tmp_path / "backend", listeners), listeners[0][1], host=listeners[0][0])
    gateway = start_nginx(conf, port)
    try:
        started = time.monotonic()
        reload_time = reload(gateway, tmp_path / "gateway" / "logs" / "nginx.pid", port)
        sample = [m for i, m in enumerate(normalized) if i % 7 == 0]
        sent = 0
        for n, entry in enumerate(sample):
            for k, name in enumerate(entry["served_names"]):
                endpoint = entry["endpoints"][(n + k) % len(entry["endpoints"])]
                path = llm_registry.GATEWAY_PATHS[endpoint]
                body = {"model": name, "input": "x"} if k % 2 else {"input": "x", "model": name}
                reply = post_json(port, json.dumps(body).encode(), path)
                assert reply.status == 200, (name, path, reply.body[:200])
                expected = f"{HOSTS[entry['hosts'][0]]}:{entry['port']} {entry['paths'][endpoint]}"
                assert reply.headers["X-Reached"] == expected, name
                sent += 1
        assert sent >= 200
        assert {llm_registry.GATEWAY_PATHS[e] for e in llm_registry.JSON_ENDPOINTS} <= {
            llm_registry.GATEWAY_PATHS[e] for m in sample for e in m["endpoints"]}
    finally:
        stop(gateway)
        stop(backend)
    with capsys.disabled():
        print(f"\n  1,000 models, 3,000 names: gateway.conf {len(gateway_conf.splitlines())} lines, "
              f"{len(gateway_conf) // 1024} KB; rendered in {rendered:.2f} s, nginx -t {checked:.2f} s, "
              f"reload {reload_time:.2f} s; {sent} names routed by nginx alone")


def wait_for_text(path: Path, timeout: float = 5) -> bool:
    """Whether `path` holds something within `timeout`."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def reload(proc: subprocess.Popen[bytes], pid_file: Path, port: int) -> float:
    """A graceful reload: seconds until a new worker serves."""
    # nginx writes its pid file after it answers: wait for the number, not only the port.
    assert wait_for_text(pid_file), f"{pid_file} stayed empty"
    before = workers(int(pid_file.read_text()))
    started = time.monotonic()
    subprocess.run([NGINX, "-p", str(pid_file.parent.parent), "-c", str(pid_file.parent.parent / "nginx.conf"),
                    "-s", "reload"], check=True, capture_output=True)
    while not (workers(int(pid_file.read_text())) - before):
        assert time.monotonic() - started < 30, "no new worker after the reload"
        time.sleep(0.01)
    return time.monotonic() - started


def workers(master: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout
    return {int(pid) for pid in out.split()}

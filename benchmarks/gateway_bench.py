#!/usr/bin/env python3
"""Throughput of the gateway's routing against a plain nginx proxy_pass, on loopback.

Starts, on 127.0.0.1 high ports:
  - backend: a tiny nginx answering every request with a fixed JSON (the fastest fair
    backend), plus a "decoy" server that answers 409;
  - plain:   nginx proxy_pass to the backend with the same proxy settings as the gateway
             (keepalive, buffers, buffering off), minus the routing;
  - gateway: the role itself, rendered by tests/support/gateway_lab.py from a registry in
             which chat-small is served by the backend and chat-large by the decoy (and,
             with --registry-size, more models the traffic never names).
Then drives each with wrk (POST, one connection pool, fixed duration) for bodies of 400 B,
100 KB and 1 MB, each with the top-level "model" last and first. Each body carries a nested
"model" naming the decoy in a tool schema, so a router that picked the nested key would get
409s (counted as errors). Before a body is measured, one request must reach the backend,
routed by nginx (the access log's "router" field), not by njs. With two CPUs or more, the
proxy under test runs on the first and wrk and the backend on the second: what is measured
is the proxy's own cost, not how the scheduler shares two cores among three busy processes.
Rounds run direct/plain/gateway and then the reverse order, so that a drift in the
machine's speed falls on all alike; the table shows the median round.

A virtual machine's speed also changes from one second to the next, more than the routing
costs. So the script also loads plain and gateway at the same time, both on the proxies'
CPU, each with its own wrk: the scheduler gives each worker half of that CPU, and the ratio
of their req/s is the ratio of their costs per request, measured in the same seconds
("same CPU" column). Every number printed is measured in this run.

--production measures the production path instead: the gateway with HTTPS only, an API key
checked on every request, the per-key and per-address limits counted on every request (set
far above the load, so none refuses) and its JSON log, against a plain TLS proxy_pass with the
same certificate (wrk keeps its connections, so handshakes are not what is measured).

--config-size measures nothing: it renders the role for the lab inventory's registry and
prints the lines and bytes of the gateway's nginx files.

    .venv/bin/python benchmarks/gateway_bench.py [--duration 4] [--rounds 5] [--connections 16]
                                                 [--registry-size 2] [--bodies LABEL ...] [--production]
    .venv/bin/python benchmarks/gateway_bench.py --config-size
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# As tests/conftest.py: the harness and the roles' plugins are plain modules on sys.path.
for _path in reversed([REPO / "tests" / "support", *sorted((REPO / "roles").glob("*/filter_plugins"))]):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import yaml  # noqa: E402
from gateway_lab import (  # noqa: E402 - after the sys.path set-up above
    NGINX,
    NJS_MODULE,
    nginx_environment,
    free_port,
    model,
    nginx_missing,
    render_gateway,
    start_nginx,
    stop,
    write_nginx_conf,
)

WRK = shutil.which("wrk") or "/usr/bin/wrk"
# The proxy under test on one CPU, the load generator and the backend on another.
CPUS = sorted(os.sched_getaffinity(0))
PINNED = len(CPUS) >= 2
PROXY_CPUS, LOAD_CPUS = ({CPUS[0]}, {CPUS[1]}) if PINNED else (None, None)
# label -> (bytes, whether the top-level "model" comes first). SDKs such as openai-python send
# it after "messages" (last here); curl examples and many clients put it first.
BODIES = {f"{size}, model {where}": (nbytes, where == "first")
          for size, nbytes in (("400 B", 400), ("100 KB", 100 * 1024), ("1 MB", 1024 * 1024))
          for where in ("last", "first")}
MAX_BODY = "16m"
# Registry hosts: the backend's address, and one where nothing listens for the extra models.
BACKEND_ADDRESS = "127.0.0.1"
ADDRESSES = {"bench-gpu": BACKEND_ADDRESS, "bench-idle": "127.0.0.3"}
IDLE_PORT_BASE = 20000
# The lab inventory (inventories/lab) and made-up private addresses for its GPU hosts.
LAB_MODELS = REPO / "inventories" / "lab" / "group_vars" / "all" / "llm_models.yml"
LAB_HOSTS = REPO / "inventories" / "lab" / "hosts.yml"
# What the role writes on a lab gateway (its defaults: every address, TLS on), instead of the
# harness's loopback listener and temporary paths, so that the size does not depend on where
# the files were rendered.
AS_ON_A_HOST = {"ansible_managed": "Ansible managed", "gateway_listen_address": "",
                "gateway_access_log": "/var/log/nginx/llm-access.log",
                "__gateway_tls_certificate_path": "/etc/nginx/llm/tls/gateway.crt",
                "__gateway_tls_key_path": "/etc/nginx/llm/tls/gateway.key"}

WRK_SCRIPT = """
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
if os.getenv("BENCH_KEY") then
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
end
function done(summary, latency, requests)
  io.write(string.format('BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"status_errors":%d,"socket_errors":%d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def body_of_size(size: int, model_first: bool = False) -> bytes:
    """A chat request of about `size` bytes with a nested decoy "model" in a tool schema.

    The top-level "model" comes last (after the decoy and the prompt), or first.
    """
    body: dict[str, Any] = {"model": "chat-small"} if model_first else {}
    body["tools"] = [{"type": "function", "function": {
        "name": "pick", "parameters": {"type": "object", "properties": {"model": {"type": "string"}}},
        "model": "chat-large"}}]
    body["messages"] = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": ""}]
    body["model"] = "chat-small"  # a key already there keeps its place
    base = len(json.dumps(body))
    body["messages"][1]["content"] = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:max(size - base, 1)]
    return json.dumps(body).encode()


def bench_registry(backend_port: int, decoy_port: int, size: int) -> list[dict[str, Any]]:
    """llm_models: chat-small on the backend, chat-large on the decoy, then size-2 idle models.

    Each idle model has two aliases, so the name table holds 2 + 3 * (size - 2) names; no
    request names them, they only make the table (and the upstreams) as big as a real one.
    """
    models = [model("chat-small", ["bench-gpu"], backend_port), model("chat-large", ["bench-gpu"], decoy_port)]
    for i in range(size - 2):
        name = f"idle-model-{i:05d}"
        models.append(model(name, ["bench-idle"], IDLE_PORT_BASE + i,
                            aliases=[f"{name}-instruct", f"vendor/{name}:latest"]))
    return models


def backend_conf(root: Path, port: int, decoy_port: int) -> Path:
    """The fixed-answer backend and the decoy."""
    return write_nginx_conf(root, f"""
    access_log off;
    client_max_body_size {MAX_BODY};
    # What an OpenAI-compatible backend answers with.
    default_type application/json;
    server {{
        listen {BACKEND_ADDRESS}:{port};
        location / {{ return 200 '{{"id":"cmpl-1","object":"chat.completion","choices":[]}}'; }}
    }}
    server {{
        listen {BACKEND_ADDRESS}:{decoy_port};
        location / {{ return 409 '{{"error":"the decoy was routed"}}'; }}
    }}""")


def plain_conf(root: Path, port: int, backend_port: int, tls: tuple[Path, Path] | None = None) -> Path:
    """nginx proxy_pass with the gateway's proxy settings but no routing (over TLS with `tls`:
    the certificate and key, with the gateway's TLS settings)."""
    listen = f"127.0.0.1:{port}"
    if tls is not None:
        listen += f""" ssl;
        ssl_certificate {tls[0]};
        ssl_certificate_key {tls[1]};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:plain_tls:10m"""
    return write_nginx_conf(root, f"""
    access_log {root}/logs/access.log;
    upstream backend {{ server {BACKEND_ADDRESS}:{backend_port}; keepalive 32; keepalive_timeout 4s; }}
    server {{
        listen {listen};
        client_max_body_size {MAX_BODY};
        client_body_buffer_size {MAX_BODY};
        location / {{
            proxy_pass http://backend/v1/chat/completions;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}""")


@dataclass
class Result:
    """One wrk run."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def start_wrk(url: str, body: Path, script: Path, duration: int, connections: int,
              key: str | None = None) -> subprocess.Popen[str]:
    """wrk with one thread on the load CPU, running (with `key` as its Bearer key)."""
    env = {"BENCH_BODY": str(body), "PATH": "/usr/bin:/bin", **({"BENCH_KEY": key} if key else {})}
    return subprocess.Popen([WRK, "-t1", f"-c{connections}", f"-d{duration}s", "-s", str(script), url],
                            stdout=subprocess.PIPE, text=True, env=env,
                            preexec_fn=(lambda: os.sched_setaffinity(0, LOAD_CPUS)) if PINNED else None)


def wrk_result(proc: subprocess.Popen[str]) -> Result:
    """Wait for a wrk started by start_wrk and parse its script's done() line."""
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}")
    line = next(raw for raw in out.splitlines() if raw.startswith("BENCH "))
    data = json.loads(line[len("BENCH "):])
    return Result(rps=data["requests"] / (data["duration_us"] / 1e6), p50_ms=data["p50_us"] / 1000,
                  p99_ms=data["p99_us"] / 1000, errors=data["status_errors"] + data["socket_errors"])


def check_route(url: str, body: bytes, access_log: Path, key: str | None = None) -> None:
    """Before measuring: the body must reach the chat-small backend, routed by nginx alone.

    A body njs routed would measure the fallback, not the routing; the access log says
    which half routed it (it is flushed at least once a second). Only what is written after
    this request is read: the measured runs before it left gigabytes of log.
    """
    request_id = f"bench-{uuid.uuid4().hex}"
    start = access_log.stat().st_size if access_log.exists() else 0
    headers = {"Content-Type": "application/json", "X-Request-ID": request_id,
               **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=body, headers=headers)
    # The gateway's self-signed certificate, on loopback.
    context = ssl._create_unverified_context() if url.startswith("https:") else None  # noqa: S323
    with urllib.request.urlopen(request, timeout=10, context=context) as reply:  # noqa: S310 - loopback URL
        answer = reply.read()
    if b"chat.completion" not in answer:
        raise SystemExit(f"gateway answered {answer[:200]!r}, not the chat-small backend")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with access_log.open("rb") as log:
            log.seek(start)
            lines = [line for line in log.read().splitlines() if request_id.encode() in line]
        for line in lines:
            entry = json.loads(line)
            if entry["request_id"] == request_id:
                if (entry["router"], entry["model"]) != ("nginx", "chat-small"):
                    raise SystemExit(f"the gateway did not route the body by nginx alone: {entry}")
                return
        time.sleep(0.2)
    raise SystemExit(f"request {request_id} never appeared in {access_log}")


def median_result(results: list[Result]) -> Result:
    """The round with the median throughput (its latencies belong to that same round)."""
    ordered = sorted(results, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]


def file_size(path: Path) -> tuple[int, int, int]:
    """Lines, bytes and the longest line's length of a file (a long line is one no diff can show)."""
    data = path.read_bytes()
    return data.count(b"\n"), len(data), max(map(len, data.splitlines()), default=0)


def config_size() -> int:
    """Render the role for the lab registry and print the size of its nginx files."""
    models = yaml.safe_load(LAB_MODELS.read_text())["llm_models"]
    gpu_hosts = yaml.safe_load(LAB_HOSTS.read_text())["all"]["children"]["llm_gpu_hosts"]["hosts"]
    addresses = {host: f"10.0.0.{11 + i}" for i, host in enumerate(sorted(gpu_hosts))}
    with tempfile.TemporaryDirectory(prefix="gateway-config-") as tmp:
        root = Path(tmp)
        render_gateway(root, models, addresses, **AS_ON_A_HOST)
        files = [root / "llm" / "gateway.conf", root / "llm" / "find-model.conf"]
        names = sum(1 + len(m.get("aliases", [])) for m in models)
        print(f"lab registry ({LAB_MODELS.relative_to(REPO)}): {len(models)} models, {names} names, "
              f"GPU hosts {', '.join(sorted(addresses))}")
        total_lines = total_bytes = 0
        for path in files:
            lines, nbytes, longest = file_size(path)
            total_lines, total_bytes = total_lines + lines, total_bytes + nbytes
            print(f"{path.name:>16}: {lines:5d} lines {nbytes:7d} bytes, longest line {longest} characters")
        print(f"{'together':>16}: {total_lines:5d} lines {total_bytes:7d} bytes")
    return 0


def production_settings(port: int, key: str) -> dict[str, Any]:
    """The gateway as a real inventory runs it: HTTPS only, one client key checked on every
    request, the per-key and per-address rate and concurrency limits counted on every request
    (set far above what the run sends, so that none refuses), the JSON access log."""
    return {"gateway_http_port": 0, "gateway_https_port": port, "gateway_api_keys_required": True,
            "llm_api_keys": [{"id": "bench", "key": key, "models": "all", "rate_per_minute": 100_000_000,
                              "burst": 1_000_000, "concurrency": 60_000}],
            "gateway_address_rate_per_minute": 100_000_000, "gateway_address_burst": 1_000_000,
            "gateway_address_concurrency": 60_000}


def measure(args: argparse.Namespace) -> int:
    """Start everything, measure, print the table, stop what was started."""
    reason = nginx_missing() or (None if Path(WRK).exists() else "wrk not found (apt install wrk)")
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    ports = {name: free_port() for name in ("backend", "decoy", "plain", "gateway")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start_nginx(backend_conf(work / "backend", ports["backend"], ports["decoy"]), ports["backend"],
                                 cpus=LOAD_CPUS))
        # Both proxies run with the environment the gateway role gives nginx.service.
        heap = nginx_environment()
        registry = bench_registry(ports["backend"], ports["decoy"], args.registry_size)
        started = time.monotonic()
        key = secrets.token_urlsafe(32) if args.production else None
        conf = render_gateway(work / "gateway", registry, ADDRESSES, gateway_client_max_body_size=MAX_BODY,
                              **(production_settings(ports["gateway"], key) if key else
                                 {"gateway_http_port": ports["gateway"], "gateway_https_port": 0,
                                  "gateway_address_rate_per_minute": 0, "gateway_address_concurrency": 0}))
        rendered = time.monotonic() - started
        tls = (work / "gateway" / "llm" / "gateway.crt", work / "gateway" / "llm" / "gateway.key")
        procs.append(start_nginx(plain_conf(work / "plain", ports["plain"], ports["backend"],
                                            tls if key else None), ports["plain"], heap, PROXY_CPUS))
        procs.append(start_nginx(conf, ports["gateway"], heap, PROXY_CPUS))
        access_log = work / "gateway" / "logs" / "llm-access.log"

        script = work / "post.lua"
        script.write_text(WRK_SCRIPT)
        scheme = "https" if key else "http"
        targets = {
            "direct": f"http://{BACKEND_ADDRESS}:{ports['backend']}/v1/chat/completions",
            "plain": f"{scheme}://127.0.0.1:{ports['plain']}/v1/chat/completions",
            "gateway": f"{scheme}://127.0.0.1:{ports['gateway']}/v1/chat/completions",
        }
        names = sum(1 + len(m["aliases"]) for m in registry)
        lines, nbytes, _ = file_size(work / "gateway" / "llm" / "gateway.conf")
        print(f"nginx: {subprocess.run([NGINX, '-v'], capture_output=True, text=True).stderr.strip()}; "
              f"njs module: {NJS_MODULE}; {args.rounds} rounds x {args.duration}s, {args.connections} connections; "
              + (f"proxy on CPU {CPUS[0]}, wrk and backend on CPU {CPUS[1]}" if PINNED else "one CPU: nothing pinned"))
        print(f"gateway registry: {len(registry)} models, {names} names; gateway.conf {lines} lines, {nbytes} bytes, "
              f"rendered in {rendered:.1f} s")
        rows = []
        for label in args.bodies:
            size, model_first = BODIES[label]
            body = work / f"body-{size}-{int(model_first)}.json"
            body.write_bytes(body_of_size(size, model_first))
            check_route(targets["gateway"], body.read_bytes(), access_log, key)
            runs: dict[str, list[Result]] = {name: [] for name in targets}
            shared: list[float] = []
            for round_no in range(args.rounds):
                order = list(targets) if round_no % 2 == 0 else list(reversed(targets))
                for name in order:
                    runs[name].append(wrk_result(start_wrk(targets[name], body, script, args.duration,
                                                           args.connections, key)))
                together = [start_wrk(targets[name], body, script, args.duration, args.connections, key)
                            for name in ("plain", "gateway")]
                plain_share, gateway_share = (wrk_result(proc) for proc in together)
                shared.append(gateway_share.rps / plain_share.rps)
                # A wrong route is an error wherever it happens.
                runs["gateway"][-1].errors += gateway_share.errors
            best = {name: median_result(results) for name, results in runs.items()}
            ratios = [g.rps / p.rps for g, p in zip(runs["gateway"], runs["plain"])]
            rows.append((label, len(body.read_bytes()), best, ratios, shared))

        print(f"\n{'body':>19} {'bytes':>8} | {'target':<8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
              f" | gateway/plain: alone, same CPU (median; lowest-highest)")
        for label, nbytes, best, ratios, shared in rows:
            for name, result in best.items():
                share = (f"{statistics.median(ratios):6.1%} ({min(ratios):.1%}-{max(ratios):.1%}), "
                         f"{statistics.median(shared):6.1%} ({min(shared):.1%}-{max(shared):.1%})"
                         if name == "gateway" else "")
                print(f"{label:>19} {nbytes:>8} | {name:<8} {result.rps:9.0f} {result.p50_ms:8.2f} "
                      f"{result.p99_ms:8.2f} {result.errors:6d} | {share}")
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    """Parse the options; measure, or print the lab configuration's size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (default 4)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per body (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--bodies", nargs="+", choices=list(BODIES), default=list(BODIES), metavar="LABEL",
                        help=f"bodies to measure (default: all of {', '.join(repr(b) for b in BODIES)})")
    parser.add_argument("--registry-size", type=int, default=2, metavar="N",
                        help="models in the gateway's registry: chat-small, chat-large and N-2 idle ones "
                             "with two aliases each (default 2)")
    parser.add_argument("--production", action="store_true",
                        help="the production path: TLS, API key check, rate and concurrency limits and the JSON "
                             "log, against a plain TLS proxy_pass")
    parser.add_argument("--config-size", action="store_true",
                        help="measure nothing: print the lines and bytes of the lab registry's gateway config")
    args = parser.parse_args()
    if args.config_size:
        return config_size()
    if not 2 <= args.registry_size <= 65535 - IDLE_PORT_BASE:
        parser.error(f"--registry-size must be from 2 to {65535 - IDLE_PORT_BASE}")
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())

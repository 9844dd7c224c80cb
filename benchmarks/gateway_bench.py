#!/usr/bin/env python3
"""Throughput of the gateway's routing against a plain nginx proxy_pass, on loopback.

Starts, on 127.0.0.1 high ports:
  - backend: a tiny nginx answering every request with a fixed JSON (the fastest fair
    backend), plus a "decoy" server that answers 409;
  - plain:   nginx proxy_pass to the backend with the same proxy settings as the gateway
             (keepalive, buffers, buffering off), minus the routing;
  - gateway: the role's own templates and router.js, rendered as in the unit tests.
Then drives each with wrk (POST, one connection pool, fixed duration) for bodies of 400 B,
100 KB and 1 MB, with the top-level "model" last and, for the big ones, first. Each body
carries a nested "model" naming the decoy in a tool schema, so a router that picked the
nested key would get 409s (counted as errors). With two CPUs or more, the proxy under test
runs on the first and wrk and the backend on the second: what is measured is the proxy's
own cost, not how the scheduler shares two cores among three busy processes. Rounds run
direct/plain/gateway and then the reverse order, so that a drift in the machine's speed
falls on all alike; the table shows the median round.

A virtual machine's speed also changes from one second to the next, more than the routing
costs. So the script also loads plain and gateway at the same time, both on the proxies'
CPU, each with its own wrk: the scheduler gives each worker half of that CPU, and the ratio
of their req/s is the ratio of their costs per request, measured in the same seconds
("same CPU" column). Every number printed is measured in this run.

    benchmarks/gateway_bench.py [--duration 4] [--rounds 5] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "unit"))

from test_gateway_router import (  # noqa: E402 - the shared harness lives with the unit tests
    NGINX,
    NJS_MODULE,
    Upstream,
    free_port,
    nginx_missing,
    render_gateway,
    role_defaults,
    route,
    routes_for,
    start_nginx,
    stop,
)

WRK = shutil.which("wrk") or "/usr/bin/wrk"
# The proxy under test on one CPU, the load generator and the backend on another.
CPUS = sorted(os.sched_getaffinity(0))
PINNED = len(CPUS) >= 2
PROXY_CPUS, LOAD_CPUS = ({CPUS[0]}, {CPUS[1]}) if PINNED else (None, None)
# label -> (bytes, whether the top-level "model" comes first). SDKs such as openai-python send
# it after "messages" (last here); hand-written requests often put it first.
SIZES = {"400 B": (400, False), "100 KB": (100 * 1024, False), "1 MB": (1024 * 1024, False),
         "100 KB, model first": (100 * 1024, True), "1 MB, model first": (1024 * 1024, True)}
MAX_BODY = "16m"

WRK_SCRIPT = """
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
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
    body["model"] = "chat-small"
    base = len(json.dumps(body))
    body["messages"][1]["content"] = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:max(size - base, 1)]
    return json.dumps(body).encode()


def write_nginx_conf(root: Path, http_block: str) -> Path:
    """A one-worker nginx.conf under `root` around the given http{} contents."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {root}/logs/nginx.pid;
error_log {root}/logs/error.log;
events {{ worker_connections 4096; }}
http {{
{http_block}
}}
""")
    return conf


def backend_conf(root: Path, port: int, decoy_port: int) -> Path:
    """The fixed-answer backend and the decoy."""
    return write_nginx_conf(root, f"""
    access_log off;
    client_max_body_size {MAX_BODY};
    # What an OpenAI-compatible backend answers with.
    default_type application/json;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 '{{"id":"cmpl-1","object":"chat.completion","choices":[]}}'; }}
    }}
    server {{
        listen 127.0.0.1:{decoy_port};
        location / {{ return 409 '{{"error":"the decoy was routed"}}'; }}
    }}""")


def plain_conf(root: Path, port: int, backend_port: int) -> Path:
    """nginx proxy_pass with the gateway's proxy settings but no routing."""
    return write_nginx_conf(root, f"""
    access_log {root}/logs/access.log;
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 32; keepalive_timeout 4s; }}
    server {{
        listen 127.0.0.1:{port};
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


def on_cpus(cpus: set[int] | None, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    """Start an nginx (master and workers inherit this process's CPUs) on `cpus`, when pinning.

    Its workers run as another user, whose affinity only CAP_SYS_NICE could change later.
    """
    if cpus is None:
        return start()
    everything = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        return start()
    finally:
        os.sched_setaffinity(0, everything)


def start_wrk(url: str, body: Path, script: Path, duration: int, connections: int) -> subprocess.Popen[str]:
    """wrk with one thread on the load CPU, running."""
    return subprocess.Popen([WRK, "-t1", f"-c{connections}", f"-d{duration}s", "-s", str(script), url],
                            stdout=subprocess.PIPE, text=True, env={"BENCH_BODY": str(body), "PATH": "/usr/bin:/bin"},
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


def check_route(url: str, body: bytes) -> None:
    """Before measuring: the gateway must answer from the real backend, not the decoy."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - loopback URL built here
        answer = reply.read()
    if b"chat.completion" not in answer:
        raise SystemExit(f"gateway answered {answer[:200]!r}, not the chat-small backend")


def median_result(results: list[Result]) -> Result:
    """The round with the median throughput (its latencies belong to that same round)."""
    ordered = sorted(results, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]


def main() -> int:
    """Start everything, measure, print the table, stop what was started."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (default 4)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per size (default 5)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES),
                        help="body sizes to measure (default: all)")
    args = parser.parse_args()
    reason = nginx_missing() or (None if Path(WRK).exists() else "wrk not found (apt install wrk)")
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    ports = {name: free_port() for name in ("backend", "decoy", "plain", "gateway")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(on_cpus(LOAD_CPUS, lambda: start_nginx(
            backend_conf(work / "backend", ports["backend"], ports["decoy"]), ports["backend"])))
        # Both proxies run with the environment the gateway role gives nginx.service.
        heap = {"MALLOC_TOP_PAD_": str(role_defaults()["gateway_malloc_top_pad"])}
        procs.append(on_cpus(PROXY_CPUS, lambda: start_nginx(
            plain_conf(work / "plain", ports["plain"], ports["backend"]), ports["plain"], heap)))
        entries = [route("chat-small", "llm_chat_small", "/v1", ["chat", "completions"], []),
                   route("chat-large", "llm_chat_large", "/v1", ["chat", "completions"], [])]
        upstreams = [Upstream("llm_chat_large", "chat-large", [f"127.0.0.1:{ports['decoy']}"]),
                     Upstream("llm_chat_small", "chat-small", [f"127.0.0.1:{ports['backend']}"])]
        conf = render_gateway(work / "gateway", routes_for(entries), upstreams, ["chat-small", "chat-large"],
                              gateway_http_port=ports["gateway"], gateway_https_port=0,
                              gateway_client_max_body_size=MAX_BODY)
        procs.append(on_cpus(PROXY_CPUS, lambda: start_nginx(conf, ports["gateway"], heap)))

        script = work / "post.lua"
        script.write_text(WRK_SCRIPT)
        targets = {
            "direct": f"http://127.0.0.1:{ports['backend']}/v1/chat/completions",
            "plain": f"http://127.0.0.1:{ports['plain']}/v1/chat/completions",
            "gateway": f"http://127.0.0.1:{ports['gateway']}/v1/chat/completions",
        }
        print(f"nginx: {subprocess.run([NGINX, '-v'], capture_output=True, text=True).stderr.strip()}; "
              f"njs module: {NJS_MODULE}; {args.rounds} rounds x {args.duration}s, {args.connections} connections; "
              + (f"proxy on CPU {CPUS[0]}, wrk and backend on CPU {CPUS[1]}" if PINNED else "one CPU: nothing pinned"))
        rows = []
        for label in args.sizes:
            size, model_first = SIZES[label]
            body = work / f"body-{size}-{int(model_first)}.json"
            body.write_bytes(body_of_size(size, model_first))
            check_route(targets["gateway"], body.read_bytes())
            runs: dict[str, list[Result]] = {name: [] for name in targets}
            shared: list[float] = []
            for round_no in range(args.rounds):
                order = list(targets) if round_no % 2 == 0 else list(reversed(targets))
                for name in order:
                    runs[name].append(wrk_result(start_wrk(targets[name], body, script, args.duration,
                                                           args.connections)))
                together = [start_wrk(targets[name], body, script, args.duration, args.connections)
                            for name in ("plain", "gateway")]
                plain_share, gateway_share = (wrk_result(proc) for proc in together)
                shared.append(gateway_share.rps / plain_share.rps)
                # A wrong route is an error wherever it happens.
                runs["gateway"][-1].errors += gateway_share.errors
            best = {name: median_result(results) for name, results in runs.items()}
            ratios = [g.rps / p.rps for g, p in zip(runs["gateway"], runs["plain"])]
            rows.append((label, len(body.read_bytes()), best, statistics.median(ratios), shared))

        print(f"\n{'body':>19} {'bytes':>8} | {'target':<8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
              f" | gateway/plain: alone, same CPU (median; lowest-highest)")
        for label, nbytes, best, ratio, shared in rows:
            for name, result in best.items():
                share = (f"{ratio:6.1%}, {statistics.median(shared):6.1%} ({min(shared):.1%}-{max(shared):.1%})"
                         if name == "gateway" else "")
                print(f"{label:>19} {nbytes:>8} | {name:<8} {result.rps:9.0f} {result.p50_ms:8.2f} "
                      f"{result.p99_ms:8.2f} {result.errors:6d} | {share}")
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

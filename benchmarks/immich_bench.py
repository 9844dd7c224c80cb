#!/usr/bin/env python3
"""Immich ML's POST /predict through the gateway against a plain nginx proxy_pass, on loopback.

The gateway (the role, rendered by tests/support/gateway_lab.py) routes each /predict by
the task its multipart "entries" part names: njs reads the part where nginx holds the
body (roles/gateway/files/multipart.js), then nginx proxies the upload as sent. The plain
proxy holds the body in memory the same way (the same buffer sizes) and proxies it to the
same backend with no routing. The backend is a tiny nginx with a fixed JSON answer; the
gateway sends clip_visual there and every other task to a decoy that answers 409, so a
wrong route counts as an error.

Bodies: a CLIP visual request with a 5 MB image part (random bytes), the "entries" part
first (as Immich's server sends it) and last. Pinning and rounds as in gateway_bench.py:
the proxy under test on the first CPU, wrk and the backend on the second; rounds alternate
the order of plain and gateway, and the table shows the median round. Every number
printed is measured in this run.

    .venv/bin/python benchmarks/immich_bench.py [--duration 4] [--rounds 3] [--connections 8] [--image-mb 5]
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
from pathlib import Path

import gateway_bench as bench
from gateway_lab import NGINX, free_port, nginx_environment, nginx_missing, render_gateway, start_nginx, stop, \
    write_nginx_conf

ADDRESSES = {"bench-gpu": "127.0.0.1"}
MAX_BODY = "32m"
BOUNDARY = "----formdata-undici-043847285935"
ENTRIES = b'{"clip":{"visual":{"modelName":"ViT-B-32__openai"}}}'

WRK_SCRIPT = """
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. os.getenv("BENCH_BOUNDARY")
function done(summary, latency, requests)
  io.write(string.format('BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"status_errors":%d,"socket_errors":%d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def predict_body(image: bytes, entries_first: bool) -> bytes:
    """An Immich-style /predict form: "entries" and an image part, in the order asked for."""
    entries = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="entries"\r\n\r\n'.encode() + ENTRIES + b"\r\n")
    picture = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="blob"\r\n'
               f"Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")
    parts = entries + picture if entries_first else picture + entries
    return parts + f"--{BOUNDARY}--\r\n".encode()


def backend_conf(root: Path, port: int, decoy: int) -> Path:
    return write_nginx_conf(root, f"""
    access_log off;
    client_max_body_size {MAX_BODY};
    client_body_buffer_size {MAX_BODY};
    default_type application/json;
    server {{ listen 127.0.0.1:{port}; location / {{ return 200 '{{"clip":"[0.1,0.2]"}}'; }} }}
    server {{ listen 127.0.0.1:{decoy}; location / {{ return 409 '{{"error":"the decoy was routed"}}'; }} }}""")


def plain_conf(root: Path, port: int, backend: int) -> Path:
    return write_nginx_conf(root, f"""
    access_log {root}/logs/access.log;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 32; keepalive_timeout 4s; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size {MAX_BODY};
        client_body_buffer_size {MAX_BODY};
        client_body_in_single_buffer on;
        location / {{
            proxy_pass http://backend/predict;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}""")


def start_wrk(url: str, body: Path, script: Path, duration: int, connections: int) -> subprocess.Popen[str]:
    env = {"BENCH_BODY": str(body), "BENCH_BOUNDARY": BOUNDARY, "PATH": "/usr/bin:/bin"}
    return subprocess.Popen([bench.WRK, "-t1", f"-c{connections}", f"-d{duration}s", "-s", str(script), url],
                            stdout=subprocess.PIPE, text=True, env=env,
                            preexec_fn=(lambda: os.sched_setaffinity(0, bench.LOAD_CPUS)) if bench.PINNED else None)


def check_route(url: str, body: bytes) -> None:
    """Before measuring: the body must reach the clip_visual backend (not the decoy)."""
    request = urllib.request.Request(url, data=body, headers={
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - loopback URL
        answer = reply.read()
    if json.loads(answer) != {"clip": "[0.1,0.2]"}:
        raise SystemExit(f"gateway answered {answer[:200]!r}, not the clip_visual backend")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--image-mb", type=float, default=5)
    args = parser.parse_args()
    reason = nginx_missing() or (None if Path(bench.WRK).exists() else "wrk not found (apt install wrk)")
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="immich-bench-"))
    ports = {name: free_port() for name in ("backend", "decoy", "plain", "gateway")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start_nginx(backend_conf(work / "backend", ports["backend"], ports["decoy"]), ports["backend"],
                                 cpus=bench.LOAD_CPUS))
        heap = nginx_environment()
        service = {"name": "immich-ml", "kind": "immich_ml", "prefix": "/immich-ml", "hosts": ["bench-gpu"],
                   "port": ports["decoy"], "tasks": {"clip_visual": {"port": ports["backend"]}}}
        conf = render_gateway(work / "gateway", [], ADDRESSES, services=[service], gateway_http_port=ports["gateway"],
                              gateway_https_port=0, gateway_address_rate_per_minute=0,
                              gateway_address_concurrency=0)
        procs.append(start_nginx(plain_conf(work / "plain", ports["plain"], ports["backend"]), ports["plain"], heap,
                                 bench.PROXY_CPUS))
        procs.append(start_nginx(conf, ports["gateway"], heap, bench.PROXY_CPUS))
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT)
        targets = {"plain": f"http://127.0.0.1:{ports['plain']}/immich-ml/predict",
                   "gateway": f"http://127.0.0.1:{ports['gateway']}/immich-ml/predict"}
        image = os.urandom(int(args.image_mb * 1024 * 1024))
        print(f"nginx: {subprocess.run([NGINX, '-v'], capture_output=True, text=True).stderr.strip()}; "
              f"{args.rounds} rounds x {args.duration}s, {args.connections} connections; "
              + (f"proxy on CPU {bench.CPUS[0]}, wrk and backend on CPU {bench.CPUS[1]}" if bench.PINNED
                 else "one CPU: nothing pinned"))
        print(f"\n{'body':>22} {'bytes':>9} | {'target':<8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
              f" | gateway/plain (median; lowest-highest)")
        for entries_first in (True, False):
            label = f"entries {'first' if entries_first else 'last'}"
            body = work / f"body-{int(entries_first)}.bin"
            body.write_bytes(predict_body(image, entries_first))
            check_route(targets["gateway"], body.read_bytes())
            runs: dict[str, list[bench.Result]] = {name: [] for name in targets}
            for round_no in range(args.rounds):
                for name in (targets if round_no % 2 == 0 else list(reversed(targets))):
                    runs[name].append(bench.wrk_result(start_wrk(targets[name], body, script, args.duration,
                                                                 args.connections)))
            ratios = [g.rps / p.rps for g, p in zip(runs["gateway"], runs["plain"])]
            for name, results in runs.items():
                result = bench.median_result(results)
                share = (f"{statistics.median(ratios):6.1%} ({min(ratios):.1%}-{max(ratios):.1%})"
                         if name == "gateway" else "")
                print(f"{label:>22} {body.stat().st_size:>9} | {name:<8} {result.rps:8.0f} {result.p50_ms:8.2f} "
                      f"{result.p99_ms:8.2f} {result.errors:6d} | {share}")
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

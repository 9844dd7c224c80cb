#!/usr/bin/env python3
"""Embeddings answered from the gateway's response cache against the same requests answered
by the model server, through the gateway, on loopback.

Starts, on 127.0.0.1 high ports, the test backend (tests/backend: OpenAI-style embeddings
computed in Python, standing in for the model server) and the gateway role rendered by
tests/support/gateway_lab.py with two models on that backend: embed-cached (`cache: true`)
and embed-direct (no cache). API keys are checked on every request, as in production. wrk
sends the same embeddings request (a batch of 16 sentences) to each model in turn; before a
run, one request must be a MISS (cached) or carry no cache status (direct) and the next a HIT
or again none. With two CPUs or more the gateway runs on the first, wrk and the backend on
the second. Rounds alternate the order; the table shows the median round.

    .venv/bin/python benchmarks/cache_bench.py [--duration 4] [--rounds 3] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

# gateway_bench puts tests/support and the roles' plugins on sys.path.
from gateway_bench import (CPUS, LOAD_CPUS, NGINX, PINNED, PROXY_CPUS, WRK, WRK_SCRIPT, Result,
                           median_result, start_wrk, wrk_result)
from gateway_lab import (free_port, model, nginx_environment, nginx_missing, render_gateway, start_backend,
                         start_nginx, stop)

ADDRESS = "127.0.0.1"
BATCH = [f"sentence number {i} of the benchmark, long enough to be a real input" for i in range(16)]


def cache_status(url: str, body: bytes, key: str) -> tuple[str, int]:
    """One request through the gateway; its X-Cache-Status (empty without one) and answer size."""
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.headers.get("X-Cache-Status") or "", len(reply.read())


def measure(args: argparse.Namespace) -> int:
    reason = nginx_missing() or (None if Path(WRK).exists() else "wrk not found (apt install wrk)")
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    procs = []
    backend = None
    try:
        port = free_port(ADDRESS)
        backend = start_backend(["embed-cached", "embed-direct"], ADDRESS, port, api_prefix="")
        if PINNED:
            os.sched_setaffinity(backend.proc.pid, LOAD_CPUS)
        registry = [
            {**model("embed-cached", ["bench-gpu"], port, endpoints=["embeddings"], api_prefix=""), "cache": True},
            # The same server under another host name: the registry gives one port of a host one model.
            model("embed-direct", ["bench-twin"], port, endpoints=["embeddings"], api_prefix=""),
        ]
        key = secrets.token_urlsafe(32)
        gateway_port = free_port()
        conf = render_gateway(work, registry, {"bench-gpu": ADDRESS, "bench-twin": ADDRESS}, gateway_http_port=gateway_port,
                              gateway_https_port=0, gateway_api_keys_required=True,
                              llm_api_keys=[{"id": "bench", "key": key, "models": "all",
                                             "rate_per_minute": 0, "concurrency": 0}],
                              gateway_address_rate_per_minute=0, gateway_address_concurrency=0)
        procs.append(start_nginx(conf, gateway_port, nginx_environment(), PROXY_CPUS))
        url = f"http://127.0.0.1:{gateway_port}/v1/embeddings"
        script = work / "post.lua"
        script.write_text(WRK_SCRIPT)
        bodies, answer_size = {}, 0
        for name in ("embed-cached", "embed-direct"):
            bodies[name] = work / f"{name}.json"
            bodies[name].write_bytes(json.dumps({"model": name, "input": BATCH}).encode())
            replies = [cache_status(url, bodies[name].read_bytes(), key) for _ in range(2)]
            statuses, answer_size = [status for status, _ in replies], replies[0][1]
            expected = ["MISS", "HIT"] if name == "embed-cached" else ["", ""]
            if statuses != expected:
                print(f"cannot run: {name} answered with cache status {statuses}, not {expected}", file=sys.stderr)
                return 1
        print(f"nginx: {NGINX}; {args.rounds} rounds x {args.duration}s, {args.connections} connections; "
              + (f"gateway on CPU {CPUS[0]}, wrk and backend on CPU {CPUS[1]}" if PINNED else "nothing pinned")
              + f"; request {bodies['embed-cached'].stat().st_size} B ({len(BATCH)} inputs), answer {answer_size} B")
        runs: dict[str, list[Result]] = {name: [] for name in bodies}
        for round_no in range(args.rounds):
            order = list(bodies) if round_no % 2 == 0 else list(reversed(bodies))
            for name in order:
                runs[name].append(wrk_result(start_wrk(url, bodies[name], script, args.duration,
                                                       args.connections, key)))
        best = {name: median_result(results) for name, results in runs.items()}
        print(f"\n{'model':<13} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for name, result in best.items():
            print(f"{name:<13} {result.rps:9.0f} {result.p50_ms:8.2f} {result.p99_ms:8.2f} {result.errors:6d}")
        ratios = [c.rps / d.rps for c, d in zip(runs["embed-cached"], runs["embed-direct"])]
        print(f"\ncached / direct: {statistics.median(ratios):.1f}x (rounds {min(ratios):.1f}x-{max(ratios):.1f}x)")
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)
        if backend is not None:
            stop(backend.proc)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    return measure(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())

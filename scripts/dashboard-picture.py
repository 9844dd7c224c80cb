#!/usr/bin/env python3
"""The README's picture of the dashboard's per-model panels, drawn from the lab's own Prometheus.

Run after scripts/quickstart.sh, from the repository, with the .venv's Python:

    .venv/bin/python scripts/dashboard-picture.py [--traffic 180] [--out PATH]

It first sends a bounded mix of requests through the lab's gateway (127.0.0.1:8080 only):
chats, streamed chats and embeddings for the real all-MiniLM-L6-v2, plus unknown models
(404) and a missing key (401), so every panel has something to show. Then it asks the lab's
Prometheus (on gw1's loopback, through `docker exec`) for each panel's queries over that
window, exactly as roles/monitoring/files/llm-gateway-dashboard.json writes them, and draws
them. There is no Grafana in Debian: the queries are the dashboard's, the drawing is
matplotlib's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import matplotlib
import requests

matplotlib.use("Agg")
from matplotlib import pyplot  # noqa: E402 - after the backend is chosen

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "roles" / "monitoring" / "files" / "llm-gateway-dashboard.json"
GATEWAY = "http://127.0.0.1:8080"
PROMETHEUS_HOST = "llm-lab-gw1"
# The panels drawn: the per-model ones, by title.
PANELS = ["Requests per second by model", "Requests per second by status", "Request duration p50 / p99",
          "Gateway overhead p50 / p99 (request time minus upstream time)", "Upstream time to first byte p99",
          "Bytes in / out", "Live servers per model (health agent)", "Client errors per second (4xx)"]
RATE_INTERVAL = "30s"  # Grafana's $__rate_interval for the lab's 5 s scrape
SCALE = {"s": (1000, "ms"), "reqps": (1, "req/s"), "Bps": (1 / 1024, "KiB/s"), "short": (1, "")}


def send_traffic(seconds: float, workers: int = 3) -> int:
    """A bounded mix of requests through the lab's gateway for `seconds`, about 6 a second (under the
    lab key's 600 a minute, so no 429 crowds the panels); returns how many."""
    key = (REPO / "inventories" / "lab" / "credentials" / "lab-api-key").read_text().split()[0]
    headers = {"Authorization": f"Bearer {key}"}
    chat = {"messages": [{"role": "user", "content": "Hello"}]}
    sentences = ["How do I reset my password?", "The train to Hanoi leaves at noon.",
                 "Embeddings place similar sentences close together."]
    requests_sent = [0]
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def one(session: requests.Session, rng: random.Random) -> None:
        pick = rng.random()
        if pick < 0.35:
            session.post(f"{GATEWAY}/v1/chat/completions", json={"model": "chat-small", **chat},
                         headers=headers, timeout=30)
        elif pick < 0.5:
            with session.post(f"{GATEWAY}/v1/chat/completions", headers=headers, stream=True, timeout=30,
                              json={"model": "chat-large", "stream": True, **chat}) as reply:
                for _ in reply.iter_lines():
                    pass
        elif pick < 0.9:
            session.post(f"{GATEWAY}/v1/embeddings", headers=headers, timeout=30,
                         json={"model": "text-embedding-3-small", "input": rng.sample(sentences, 2)})
        elif pick < 0.96:
            session.post(f"{GATEWAY}/v1/chat/completions", json={"model": "no-such-model", **chat},
                         headers=headers, timeout=30)
        else:
            session.post(f"{GATEWAY}/v1/chat/completions", json={"model": "chat-small", **chat}, timeout=30)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as session:
            while time.monotonic() < deadline:
                one(session, rng)
                with lock:
                    requests_sent[0] += 1
                time.sleep(rng.uniform(0.25, 0.6))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return requests_sent[0]


def query_range(expr: str, start: float, end: float, step: float) -> list[dict]:
    """One range query of the lab's Prometheus, asked on gw1 (it listens on loopback only)."""
    url = "http://127.0.0.1:9090/api/v1/query_range?" + urllib.parse.urlencode(
        {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"})
    out = subprocess.run(["docker", "exec", PROMETHEUS_HOST, "curl", "-sS", "--fail", url],
                         check=True, capture_output=True, text=True).stdout
    body = json.loads(out)
    if body.get("status") != "success":
        raise SystemExit(f"Prometheus refused {expr!r}: {body}")
    return body["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    for name, value in labels.items():
        template = template.replace("{{" + name + "}}", value)
    return template


def draw(panels: list[dict], start: float, end: float, out: Path) -> None:
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(14, 3.1 * rows), sharex=True)
    step = max(2.0, (end - start) / 240)
    for axis, panel in zip(axes.flat, panels):
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        factor, label = SCALE.get(unit, (1, unit))
        for target in panel["targets"]:
            expr = target["expr"].replace("$model", ".+").replace("$__rate_interval", RATE_INTERVAL)
            for series in query_range(expr, start, end, step):
                points = [(float(t) - start, float(v) * factor) for t, v in series["values"] if v != "NaN"]
                if points:
                    axis.plot(*zip(*points), linewidth=1.2, label=legend(target.get("legendFormat", ""),
                                                                        series["metric"]))
        axis.set_title(panel["title"], fontsize=10, loc="left")
        axis.set_ylabel(label, fontsize=8)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
        if axis.get_lines():
            axis.legend(fontsize=7, loc="upper left", ncol=2, framealpha=0.6)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("seconds", fontsize=8)
    figure.suptitle(f"llm-gateway dashboard, per-model panels: the lab's Prometheus, "
                    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(end))}", fontsize=11)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traffic", type=float, default=180, help="seconds of lab traffic first (0: none)")
    parser.add_argument("--window", type=float, default=0, help="seconds drawn (default: the traffic's)")
    parser.add_argument("--out", type=Path, default=REPO / "roles" / "monitoring" / "files" / "lab-dashboard.png")
    args = parser.parse_args()
    if not 0 <= args.traffic <= 600:
        parser.error("--traffic: from 0 to 600 seconds")
    start = time.time()
    if args.traffic:
        print(f"sent {send_traffic(args.traffic)} requests in {args.traffic:g} s")
        time.sleep(12)  # two scrapes, so the last requests are in
    end = time.time()
    window = args.window or (end - start) or 300
    by_title = {panel["title"]: panel for panel in json.loads(DASHBOARD.read_text())["panels"]}
    missing = [title for title in PANELS if title not in by_title]
    if missing:
        raise SystemExit(f"the dashboard has no panel {missing}")
    draw([by_title[title] for title in PANELS], end - window, end, args.out)


if __name__ == "__main__":
    main()

"""The monitoring role's files rendered for tests, and a real Prometheus started on loopback.

prometheus.yml, the rules and the blackbox module are rendered from the role's templates
with its defaults (and the overrides a test gives), the targets from its filter, the way
the role writes them. Used by tests/unit (promtool on the rules) and tests/nginx/test_metrics.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import jinja2
import yaml
from gateway_lab import REPO, free_port, wait_for_port

ROLE = REPO / "roles" / "monitoring"
DASHBOARD = ROLE / "files" / "llm-gateway-dashboard.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def missing(*programs: str) -> str | None:
    """Why a test that needs these programs (Debian's packages, scripts/setup.sh) cannot run, or None."""
    absent = [name for name in programs if shutil.which(name) is None and not Path("/usr/bin", name).exists()]
    return f"not installed: {', '.join(absent)} (scripts/setup.sh installs them)" if absent else None


def render(root: Path, targets: dict[str, list[dict[str, Any]]], **overrides: Any) -> dict[str, Path]:
    """prometheus.yml, the rules, the blackbox module and the file_sd files under `root`; their paths."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROLE / "templates")),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True)
    env.filters["to_json"] = json.dumps
    env.filters["regex_escape"] = re.escape
    values: dict[str, Any] = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    values.update({"ansible_managed": "rendered by tests/support/monitoring_lab.py",
                   "monitoring_targets_dir": str(root / "targets"),
                   "__monitoring_rules_file": str(root / "rules.yml"),
                   "__monitoring_basic_auth_file": str(root / "password"), **overrides})
    (root / "targets").mkdir(parents=True, exist_ok=True)
    for job, groups in targets.items():
        (root / "targets" / f"{job}.json").write_text(json.dumps(groups, indent=2) + "\n")
    paths = {"config": root / "prometheus.yml", "rules": root / "rules.yml", "blackbox": root / "blackbox.yml"}
    for template, name in (("prometheus.yml.j2", "config"), ("llm-gateway.rules.yml.j2", "rules"),
                           ("blackbox.yml.j2", "blackbox")):
        paths[name].write_text(env.get_template(template).render(values))
    return paths


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """promtool with `args`; its output in the result."""
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False, cwd=cwd, timeout=60)


def start_prometheus(root: Path, config: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Prometheus on 127.0.0.1 with its data under `root`; (process, port)."""
    port = free_port()
    log = (root / "prometheus.log").open("wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                            stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(port, proc, timeout=30)
    return proc, port


def api(port: int, path: str, **params: str) -> Any:
    """The `data` of a Prometheus HTTP API answer; fails on an error answer."""
    url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - loopback, built here
        body = json.load(answer)
    assert body["status"] == "success", body
    return body["data"]


def query(port: int, expr: str) -> list[dict[str, Any]]:
    """An instant query's result vector."""
    return api(port, "query", query=expr)["result"]


def wait_for(port: int, expr: str, check: Any, timeout: float) -> list[dict[str, Any]]:
    """Query until check(result) holds; the last result either way."""
    deadline = time.monotonic() + timeout
    while True:
        result = query(port, expr)
        if check(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def dashboard_queries() -> list[str]:
    """Every `expr` of every panel of the dashboard, in panel order."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def dashboard_expr(expr: str, model: str = ".+") -> str:
    """A dashboard query as Grafana sends it: its variables replaced."""
    return expr.replace("$model", model).replace("$__rate_interval", "1m")

"""A gateway on 127.0.0.1 rendered from the role itself, with test backends behind it.

The role's templates, router.js and variables (defaults/main.yml and vars/main.yml,
evaluated with the roles' own filter plugins) are rendered from a registry written the
way an inventory writes `llm_models`, into a temporary prefix, and started with this
host's nginx and njs module. GPU hosts are loopback addresses (127.0.0.2, ...), so two
servers of a model share its registry port as real hosts do. Used by tests/nginx and by
benchmarks/gateway_bench.py.
"""

from __future__ import annotations

import base64
import collections
import getpass
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import gateway_api_keys
import gateway_health
import health_agent
import gateway_model_patterns
import jinja2
import llm_registry
import yaml
from http_reply import Reply, exchange

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "gateway"
BACKEND = REPO / "tests" / "backend" / "llm_test_backend.py"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NJS_MODULE = Path(os.environ.get("NJS_MODULE", "/usr/lib/nginx/modules/ngx_http_js_module.so"))
CACHE_PURGE_MODULE = Path("/usr/lib/nginx/modules/ngx_http_cache_purge_module.so")
MIME_TYPES = Path("/etc/nginx/mime.types")


# ---------------------------------------------------------------- processes


def free_port(*hosts: str) -> int:
    """A port nobody listens on right now, on every one of `hosts` (default 127.0.0.1)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind((hosts[0] if hosts else "127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if all(bindable(host, port) for host in hosts[1:]):
            return port
    raise RuntimeError(f"no port free on all of {hosts}")


def bindable(host: str, port: int) -> bool:
    """Whether host:port is free to listen on."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def wait_for_port(port: int, proc: subprocess.Popen[bytes], host: str = "127.0.0.1", timeout: float = 10) -> None:
    """Until something accepts on host:port, or fail with the process' exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate one process we started, by its own handle."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nginx_missing() -> str | None:
    """Why nginx tests cannot run here, or None."""
    if not Path(NGINX).exists():
        return "nginx binary not found (install Debian's nginx package)"
    if not NJS_MODULE.exists():
        return f"njs module {NJS_MODULE} not found (install libnginx-mod-http-js)"
    if not CACHE_PURGE_MODULE.exists():
        return f"cache purge module {CACHE_PURGE_MODULE} not found (install libnginx-mod-http-cache-purge)"
    return None


def nginx_test(conf: Path) -> subprocess.CompletedProcess[str]:
    """nginx -t on a rendered configuration."""
    return subprocess.run([NGINX, "-t", "-p", str(conf.parent), "-c", str(conf)], capture_output=True, text=True)


def start_nginx(conf: Path, port: int, env: dict[str, str] | None = None, cpus: set[int] | None = None,
                host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
    """nginx in the foreground (our child, so we stop exactly it), once it listens on `port`.

    `env` is added to the environment (the role sets MALLOC_TOP_PAD_ for nginx.service);
    `cpus` pins it (its workers inherit the affinity).
    """
    check = nginx_test(conf)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
    proc = subprocess.Popen([NGINX, "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"],
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    try:
        wait_for_port(port, proc, host)
    except RuntimeError:
        stop(proc)
        raise
    return proc


def write_nginx_conf(root: Path, http_block: str) -> Path:
    """A one-worker nginx.conf under `root` around the given http{} contents (stand-in servers)."""
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


@dataclass
class Backend:
    """A test backend process."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    models: list[str]
    log_tail: collections.deque[bytes] = field(default_factory=collections.deque)

    @property
    def address(self) -> str:
        """host:port as an upstream server line names it."""
        return f"{self.host}:{self.port}"

    def control(self, method: str, path: str, body: Any = None) -> Any:
        """The backend's /_test API, directly (not through the gateway)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        conn.request(method, path, body=None if body is None else json.dumps(body))
        data = conn.getresponse().read()
        conn.close()
        return json.loads(data)

    def requests(self) -> list[dict[str, Any]]:
        """What this backend received since the last clear()."""
        return list(self.control("GET", "/_test/requests"))

    def clear(self) -> None:
        """Forget received requests and any injected fault."""
        self.control("DELETE", "/_test/requests")
        self.control("POST", "/_test/behaviour", {"mode": "ok"})


def start_backend(models: list[str], host: str = "127.0.0.1", port: int = 0, api_prefix: str = "/v1",
                  api_key: str | None = None, service: str | None = None) -> Backend:
    """A test backend; with port 0 it picks one, read from its start-up line.

    With `api_key` it takes only that key on its API paths, as a model server of the role does;
    with `service` it stands in for Qdrant or Immich ML instead of the OpenAI API.
    """
    command = [sys.executable, str(BACKEND), "--host", host, "--port", str(port),
               "--model", *models, "--api-prefix", api_prefix, "--stream-interval", "0.2",
               *(["--service", service] if service else [])]
    env = dict(os.environ)
    if api_key is not None:
        command += ["--api-key-env", "LLM_API_KEY"]
        env["LLM_API_KEY"] = api_key
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    match = re.search(r"listening on [0-9.]+:(\d+)", line)
    if not match:
        stop(proc)
        raise RuntimeError(f"test backend did not start: {line!r}")
    # It logs a line per request: read them, or the pipe fills and the backend blocks.
    tail: collections.deque[bytes] = collections.deque(maxlen=200)
    threading.Thread(target=lambda: tail.extend(iter(proc.stderr.readline, b"")), daemon=True).start()
    return Backend(proc, host, int(match.group(1)), models, tail)


# ---------------------------------------------------------------- rendering the role


def model(name: str, hosts: list[str], port: int, endpoints: Iterable[str] = ("chat", "completions"),
          aliases: Iterable[str] = (), api_prefix: str = "/v1") -> dict[str, Any]:
    """One `llm_models` entry of the `command` engine, as an inventory writes it."""
    return {"name": name, "aliases": list(aliases), "engine": "command", "command": "test-backend",
            "endpoints": list(endpoints), "hosts": hosts, "port": port, "api_prefix": api_prefix}


def _filters() -> dict[str, Any]:
    """Every filter of the roles' plugins, plus the few of Ansible's the templates use."""
    filters: dict[str, Any] = {}
    for plugin in (llm_registry, gateway_model_patterns, gateway_api_keys, gateway_health):
        filters.update(plugin.FilterModule().filters())
    filters["to_nice_json"] = lambda value, indent=4, sort_keys=True: json.dumps(value, indent=indent,
                                                                                 sort_keys=sort_keys)
    filters["dirname"] = os.path.dirname
    filters["regex_escape"] = re.escape
    filters["regex_replace"] = lambda value, pattern, replacement="": re.sub(pattern, replacement, value)
    filters["hash"] = lambda text, algorithm: __import__("hashlib").new(algorithm, text.encode()).hexdigest()
    return filters


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROLE / "templates")),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True)  # as Ansible renders templates
    env.filters.update(_filters())
    env.tests["search"] = lambda value, pattern: re.search(pattern, value) is not None
    return env


def role_variables(env: jinja2.Environment, context: dict[str, Any]) -> dict[str, Any]:
    """defaults/main.yml, then vars/main.yml, each value templated as Ansible would.

    A value that is one whole expression keeps its type (Ansible's native templating);
    defaults given in `context` win, as inventory variables do.
    """
    values = dict(context)
    for source in ("defaults", "vars"):
        for key, raw in yaml.safe_load((ROLE / source / "main.yml").read_text()).items():
            if source == "defaults" and key in values:
                continue
            values[key] = _template(env, raw, values)
    return values


def _template(env: jinja2.Environment, raw: Any, values: dict[str, Any]) -> Any:
    if isinstance(raw, list):
        return [_template(env, item, values) for item in raw]
    if not isinstance(raw, str) or "{{" not in raw:
        return raw
    whole = re.fullmatch(r"\s*\{\{(.*)\}\}\s*", raw, re.S)
    if whole and "{{" not in whole.group(1):
        return env.compile_expression(whole.group(1).strip())(**values)
    return env.from_string(raw).render(**values).strip()


def render_gateway(root: Path, models: list[dict[str, Any]], addresses: dict[str, str],
                   services: list[dict[str, Any]] | None = None, **overrides: Any) -> Path:
    """Render nginx.conf, gateway.conf, find-model.conf and routes.js as the role does; return nginx.conf.

    `models` is `llm_models`, `services` `llm_services`; `addresses` the hosts' llm_private_address. Paths the
    role points at /etc/nginx and /var/log/nginx go under `root` instead.
    """
    conf_dir = root / "llm"
    (root / "logs").mkdir(parents=True, exist_ok=True)
    conf_dir.mkdir(parents=True, exist_ok=True)
    groups = {"all": sorted(addresses), "llm_gpu_hosts": sorted(addresses)}
    registry = llm_registry.llm_registry_normalize(models, groups)
    hostvars = {host: {"llm_private_address": address} for host, address in addresses.items()}
    env = _environment()
    context: dict[str, Any] = {
        "inventory_hostname": "gw-test",
        "llm_registry": registry,
        "llm_service_registry": llm_registry.llm_services_normalize(services or [], groups, registry),
        "hostvars": hostvars,
        "ansible_managed": "rendered by tests/support/gateway_lab.py",
        "gateway_access_log": str(root / "logs" / "llm-access.log"),
        "gateway_error_log": str(root / "logs" / "error.log"),
        "gateway_cache_path": str(root / "cache"),
        "gateway_include_conf_d": False,
        "gateway_worker_processes": 1,
        "gateway_listen_address": "127.0.0.1",
        "groups": {"llm_gateways": ["gw-test"]},
        # The tests of routing send no key; the security tests turn keys on.
        "gateway_api_keys_required": False,
        "gateway_http_api": "serve",
        # Server lines inline and /ready probing: no agent runs beside these gateways (the health
        # tests render its includes and start one: tests/support/health_agent.py).
        "gateway_health_checks": False,
        "__gateway_nginx_user": getpass.getuser(),
        **{k: v for k, v in overrides.items() if not k.startswith("__")},
    }
    values = role_variables(env, context)
    # What the role takes from the host: the nginx user, pid file and module loading.
    values.update({
        "__gateway_nginx_user": getpass.getuser(),
        "__gateway_nginx_pid": str(root / "logs" / "nginx.pid"),
        "__gateway_njs_load": f"load_module {NJS_MODULE};\nload_module {CACHE_PURGE_MODULE};",
        "__gateway_tls_certificate_path": str(conf_dir / "gateway.crt"),
        "__gateway_tls_key_path": str(conf_dir / "gateway.key"),
        "__gateway_request_id_tag": "0123abcd",
        **{k: v for k, v in overrides.items() if k.startswith("__")},
    })
    for template, target in (("nginx.conf.j2", root / "nginx.conf"), ("gateway.conf.j2", conf_dir / "gateway.conf"),
                             ("find-model.conf.j2", conf_dir / "find-model.conf"),
                             ("routes.js.j2", conf_dir / "routes.js"),
                             ("api_keys.js.j2", conf_dir / "api_keys.js"),
                             ("backend-auth.conf.j2", conf_dir / "backend-auth.conf"),
                             ("services-auth.conf.j2", conf_dir / "services-auth.conf"),
                             ("llm_gateway.mtail.j2", conf_dir / "llm_gateway.mtail")):
        target.write_text(env.get_template(template).render(values))
    for script in ("router.js", "auth.js", "cache.js", "multipart.js"):
        shutil.copy(ROLE / "files" / script, conf_dir / script)
    # The role writes it with community.general.htpasswd (bcrypt); the same hashes here.
    (conf_dir / "admin.htpasswd").write_text("".join(
        f"{user['name']}:{bcrypt.hashpw(user['password'].encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
        for user in values["gateway_admin_users"]))
    shutil.copy(MIME_TYPES, root / "mime.types")
    if values["gateway_health_checks"]:
        # As the role does before it checks gateway.conf: the agent's server lines, from its config.
        config = {**values["__gateway_health_config"], "include_dir": str(conf_dir / "upstreams"),
                  "state_file": str(values["__gateway_health_state_file"]), "drain_file": str(root / "drain.json")}
        health_agent.load().render_once(health_agent.load().parse_config(config))
    if values["gateway_https_port"] and not (conf_dir / "gateway.key").exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(conf_dir / "gateway.key"),
                        "-out", str(conf_dir / "gateway.crt")], check=True, capture_output=True)
    return root / "nginx.conf"


def nginx_environment(**overrides: Any) -> dict[str, str]:
    """The environment the role's systemd drop-in gives nginx.service, from its template."""
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    text = _environment().get_template("malloc.conf.j2").render({**defaults, "ansible_managed": "", **overrides})
    return dict(line.split("=", 2)[1:] for line in text.splitlines() if line.startswith("Environment="))


def refuse_njs_routes(root: Path) -> None:
    """Make the rendered router.js answer every request it is asked to route with a 500.

    What still succeeds then was routed by nginx alone.
    """
    router = root / "llm" / "router.js"
    refuse = "function route(r) {\n    return sendError(r, 500, 'njs was asked', 'server_error');"
    text = router.read_text()
    assert "function route(r) {" in text
    router.write_text(text.replace("function route(r) {", refuse, 1))


# ---------------------------------------------------------------- talking to it


def basic_auth(user: str, password: str) -> str:
    """An HTTP Basic Authorization value (the admin paths')."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def post_json(port: int, raw: bytes, path: str = "/v1/chat/completions", timeout: float = 10,
              headers: dict[str, str] | None = None) -> Reply:
    """One POST to a gateway on `port`, on a new connection."""
    return exchange(http.client.HTTPConnection("127.0.0.1", port, timeout=timeout), "POST", path, raw,
                    {"Content-Type": "application/json", **(headers or {})})


@dataclass
class Gateway:
    """A rendered and running gateway with its backends."""

    root: Path
    http_port: int
    https_port: int
    backends: dict[str, Backend]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None, tls: bool = False, timeout: float = 30) -> Reply:
        """One request on a new connection; `body` is sent as JSON, `raw` as is."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        return exchange(self.connect(tls, timeout), method, path, data,
                        {"Content-Type": "application/json", **(headers or {})})

    def connect(self, tls: bool = False, timeout: float = 30) -> http.client.HTTPConnection:
        """A connection to the plain or the TLS listener."""
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection("127.0.0.1", self.https_port, timeout=timeout, context=context)
        return http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)

    def served(self) -> dict[str, list[dict[str, Any]]]:
        """Backend name -> the requests it received."""
        return {name: backend.requests() for name, backend in self.backends.items()}

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON access log, one object per request."""
        path = self.root / "logs" / "llm-access.log"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def logged(self, request_ids: set[str], timeout: float = 5) -> dict[str, dict[str, Any]]:
        """Request id -> log entry, once all of `request_ids` are in (the log is flushed every second)."""
        deadline = time.monotonic() + timeout
        while True:
            entries = {e["request_id"]: e for e in self.access_log()}
            if request_ids <= set(entries) or time.monotonic() > deadline:
                return entries
            time.sleep(0.2)

    def error_log(self) -> str:
        """nginx's error log so far."""
        return (self.root / "logs" / "error.log").read_text()

    def stop(self) -> None:
        """Stop nginx and every backend."""
        for proc in self.procs:
            stop(proc)
        for backend in self.backends.values():
            stop(backend.proc)


def assert_error(reply: Reply, status: int, code: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped JSON error with the given status (and code), in valid UTF-8."""
    assert reply.status == status, reply.body[:500]
    assert reply.headers["Content-Type"].startswith("application/json"), reply.headers
    error = json.loads(reply.body.decode("utf-8"))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return dict(error)

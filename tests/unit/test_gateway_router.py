"""The gateway's njs router exercised through a real nginx on 127.0.0.1.

The role's own templates (roles/gateway/templates) and router.js are rendered with
test routes into a temporary prefix, started with this host's nginx and njs module,
and put in front of the project's test backends (tests/backend/llm_test_backend.py).
Every check looks at what the client got and, where routing matters, at what the
backend received.

The rendering and process helpers here are also used by benchmarks/gateway_bench.py.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import importlib.util
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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from http_reply import Reply, exchange

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "gateway"
BACKEND = REPO / "tests" / "backend" / "llm_test_backend.py"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NJS_MODULE = Path(os.environ.get("NJS_MODULE", "/usr/lib/nginx/modules/ngx_http_js_module.so"))
MIME_TYPES = Path("/etc/nginx/mime.types")
PARSE_MAX = 16384
# Bodies up to this many bytes (with a Content-Length) are checked whole by nginx's
# "whole" regex; bigger ones from their top-level "model" key on by the "tail" regex.
FAST_MAX = 9999


def free_port() -> int:
    """A port nobody listens on right now (for a 'down' server and for nginx's listeners)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Until something accepts on 127.0.0.1:port, or fail with the process' exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


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
    return None


def _template_env() -> Any:
    """Jinja2 with the few Ansible filters the role's templates use."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ROLE / "templates")),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True)  # as Ansible renders templates
    env.filters["to_nice_json"] = lambda value, indent=4, sort_keys=True: json.dumps(
        value, indent=indent, sort_keys=sort_keys)
    env.filters["dirname"] = os.path.dirname
    env.filters.update(_role_filters())
    return env


@functools.cache
def gateway_regex_plugin() -> Any:
    """The gateway role's filter plugin module, loaded once from its file as Ansible would."""
    spec = importlib.util.spec_from_file_location("gateway_body_regex",
                                                  ROLE / "filter_plugins" / "gateway_body_regex.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _role_filters() -> dict[str, Any]:
    """The gateway role's own filters."""
    return gateway_regex_plugin().FilterModule().filters()


def role_defaults() -> dict[str, Any]:
    """defaults/main.yml without the entries that need Ansible's own variables."""
    import yaml

    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    return {k: v for k, v in defaults.items() if "{{" not in json.dumps(v)}


@dataclass
class Upstream:
    """One model's upstream as llm_gateway_upstreams returns it."""

    name: str
    model: str
    servers: list[str]


def render_gateway(root: Path, routes: dict[str, Any], upstreams: list[Upstream], models: list[str],
                   **overrides: Any) -> Path:
    """Render nginx.conf, gateway.conf (with the upstreams) and routes.js as the role does; return nginx.conf.

    Paths that the role points at /etc/nginx and /var/log/nginx go under `root` instead.
    """
    conf_dir = root / "llm"
    (root / "logs").mkdir(parents=True, exist_ok=True)
    conf_dir.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        **role_defaults(),
        "ansible_managed": "rendered by tests/unit/test_gateway_router.py",
        "__gateway_conf_subdir": "llm",
        "__gateway_nginx_user": getpass.getuser(),
        "__gateway_nginx_pid": str(root / "logs" / "nginx.pid"),
        "__gateway_njs_load": f"load_module {NJS_MODULE};",
        "__gateway_tls_certificate_path": str(conf_dir / "gateway.crt"),
        "__gateway_tls_key_path": str(conf_dir / "gateway.key"),
        "__gateway_routes": routes,
        "__gateway_upstreams": [vars(u) for u in upstreams],
        "__gateway_models": models,
        "__gateway_request_id_tag": "0123abcd",
        "gateway_access_log": str(root / "logs" / "llm-access.log"),
        "gateway_error_log": str(root / "logs" / "error.log"),
        "gateway_include_conf_d": False,
        "gateway_worker_processes": 1,
        "gateway_listen_address": "127.0.0.1",
        **overrides,
    }
    values.setdefault("__gateway_fast_routes",
                      _role_filters()["llm_fast_routes"](routes, values["gateway_fast_route_max_depth"]))
    env = _template_env()
    for template, target in (("nginx.conf.j2", root / "nginx.conf"), ("gateway.conf.j2", conf_dir / "gateway.conf"),
                             ("routes.js.j2", conf_dir / "routes.js")):
        target.write_text(env.get_template(template).render(values))
    shutil.copy(ROLE / "files" / "router.js", conf_dir / "router.js")
    shutil.copy(MIME_TYPES, root / "mime.types")
    if values["gateway_https_port"] and not (conf_dir / "gateway.key").exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(conf_dir / "gateway.key"),
                        "-out", str(conf_dir / "gateway.crt")], check=True, capture_output=True)
    return root / "nginx.conf"


def nginx_test(conf: Path) -> subprocess.CompletedProcess[str]:
    """nginx -t on a rendered configuration."""
    return subprocess.run([NGINX, "-t", "-p", str(conf.parent), "-c", str(conf)], capture_output=True, text=True)


def start_nginx(conf: Path, port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """nginx in the foreground (our child, so we stop exactly it), once it listens on `port`.

    `env` is added to the environment (the role sets MALLOC_TOP_PAD_ for nginx.service).
    """
    check = nginx_test(conf)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
    proc = subprocess.Popen([NGINX, "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"],
                            stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    wait_for_port(port, proc)
    return proc


@dataclass
class Backend:
    """A test backend process on 127.0.0.1."""

    proc: subprocess.Popen[bytes]
    port: int
    models: list[str]

    @property
    def address(self) -> str:
        """host:port as an upstream server line names it."""
        return f"127.0.0.1:{self.port}"

    def control(self, method: str, path: str, body: Any = None) -> Any:
        """The backend's /_test API, directly (not through the gateway)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
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


def start_backend(models: list[str], api_prefix: str = "/v1") -> Backend:
    """A test backend on a free port; the port is read from its start-up line."""
    proc = subprocess.Popen([sys.executable, str(BACKEND), "--host", "127.0.0.1", "--port", "0",
                             "--model", *models, "--api-prefix", api_prefix, "--stream-interval", "0.2"],
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    if not match:
        stop(proc)
        raise RuntimeError(f"test backend did not start: {line!r}")
    return Backend(proc, int(match.group(1)), models)


def route(model: str, upstream: str, prefix: str, endpoints: list[str], aliases: list[str],
          engine: str = "command") -> dict[str, Any]:
    """One route as llm_gateway_routes returns it."""
    return {"id": model, "upstream": upstream, "prefix": prefix, "endpoints": endpoints, "engine": engine,
            "aliases": aliases}


def routes_for(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Every name and alias -> its route, the shape router.js imports."""
    return {name: entry for entry in entries for name in [entry["id"], *entry["aliases"]]}


# ---------------------------------------------------------------- the test gateway


def post_json(port: int, raw: bytes, path: str = "/v1/chat/completions", timeout: float = 10) -> Reply:
    """One POST to a gateway on `port`, on a new connection."""
    return exchange(http.client.HTTPConnection("127.0.0.1", port, timeout=timeout), "POST", path, raw,
                    {"Content-Type": "application/json"})


@dataclass
class Gateway:
    """A rendered and running gateway with its backends."""

    root: Path
    http_port: int
    https_port: int
    backends: dict[str, Backend]
    down_ports: list[int]
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


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Four backends behind a gateway rendered from the role with test routes."""
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    backends = {
        "small-a": start_backend(["chat-small", "gpt-4o-mini"]),
        "small-b": start_backend(["chat-small", "gpt-4o-mini"]),
        "large": start_backend(["chat-large"]),
        "embed": start_backend(["embed-small", "text-embedding-3-small"], api_prefix=""),
    }
    down_ports = [free_port(), free_port()]
    entries = [
        route("chat-small", "llm_chat_small", "/v1", ["chat", "completions"], ["gpt-4o-mini", "Mixed-Case"]),
        route("chat-large", "llm_chat_large", "/v1", ["chat", "completions"], ["mixed-case"]),
        route("embed-small", "llm_embed_small", "", ["embeddings", "rerank"], ["text-embedding-3-small"]),
        route("down-model", "llm_down_model", "/v1", ["chat"], []),
    ]
    upstreams = [
        Upstream("llm_chat_large", "chat-large", [backends["large"].address]),
        Upstream("llm_chat_small", "chat-small", [backends["small-a"].address, backends["small-b"].address]),
        Upstream("llm_down_model", "down-model", [f"127.0.0.1:{p}" for p in down_ports]),
        Upstream("llm_embed_small", "embed-small", [backends["embed"].address]),
    ]
    root = tmp_path_factory.mktemp("gateway")
    http_port, https_port = free_port(), free_port()
    conf = render_gateway(root, routes_for(entries), upstreams, [e["id"] for e in entries],
                          gateway_http_port=http_port, gateway_https_port=https_port,
                          gateway_proxy_read_timeout="3s", gateway_router_parse_max_bytes=PARSE_MAX)
    gw = Gateway(root, http_port, https_port, backends, down_ports)
    try:
        gw.procs.append(start_nginx(conf, http_port))
        yield gw
    finally:
        for proc in gw.procs:
            stop(proc)
        for backend in backends.values():
            stop(backend.proc)


@pytest.fixture(autouse=True)
def clean_backends(request: pytest.FixtureRequest) -> None:
    """Each test starts with empty request logs and no injected faults."""
    if "gateway" in request.fixturenames:
        for backend in request.getfixturevalue("gateway").backends.values():
            backend.clear()


def chat(model: Any, **extra: Any) -> dict[str, Any]:
    """A chat completion request body."""
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def assert_error(reply: Reply, status: int, code: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped JSON error with the given status (and code)."""
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json"), reply.headers
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


def assert_no_pcre_error(gw: Gateway) -> None:
    """PCRE failing (stack, match limit) makes nginx log the body in an alert: it must never happen."""
    assert "pcre" not in (gw.root / "logs" / "error.log").read_text().lower()


def served_by(gw: Gateway) -> dict[str, list[dict[str, Any]]]:
    """Backend name -> the requests it received."""
    return {name: backend.requests() for name, backend in gw.backends.items()}


# ---------------------------------------------------------------- routing


def test_nginx_t_accepts_rendered_config(gateway: Gateway) -> None:
    assert nginx_test(gateway.root / "nginx.conf").returncode == 0


@pytest.mark.parametrize(("model", "backend_model"), [
    ("chat-small", "chat-small"), ("gpt-4o-mini", "chat-small"), ("chat-large", "chat-large"),
])
def test_routes_by_model_and_alias(gateway: Gateway, model: str, backend_model: str) -> None:
    reply = gateway.request("POST", "/v1/chat/completions", chat(model))
    assert reply.status == 200, reply.body
    assert reply.headers["X-Backend-Model"] == backend_model
    assert reply.json()["backend"]["path"] == "/v1/chat/completions"


def test_embeddings_path_mapped_to_backend_prefix(gateway: Gateway) -> None:
    reply = gateway.request("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"})
    assert reply.status == 200, reply.body
    got = gateway.backends["embed"].requests()
    assert [(r["path"], r["model"]) for r in got] == [("/embeddings", "text-embedding-3-small")]
    reply = gateway.request("POST", "/v1/rerank", {"model": "embed-small", "query": "q", "documents": ["a", "b"]})
    assert reply.status == 200, reply.body
    assert gateway.backends["embed"].requests()[-1]["path"] == "/rerank"


def test_completions_path(gateway: Gateway) -> None:
    reply = gateway.request("POST", "/v1/completions", {"model": "chat-large", "prompt": "hi"})
    assert reply.status == 200, reply.body
    assert gateway.backends["large"].requests()[-1]["path"] == "/v1/completions"


def test_both_servers_of_a_model_are_used(gateway: Gateway) -> None:
    for _ in range(20):
        assert gateway.request("POST", "/v1/chat/completions", chat("chat-small")).status == 200
    got = served_by(gateway)
    assert len(got["small-a"]) > 0 and len(got["small-b"]) > 0
    assert len(got["small-a"]) + len(got["small-b"]) == 20


def test_one_megabyte_body_arrives_byte_for_byte(gateway: Gateway) -> None:
    raw = json.dumps({"messages": [{"role": "user", "content": "é lorem ipsum " * 80_000}],
                      "tools": [{"model": "chat-large"}], "model": "chat-small"}).encode()
    assert len(raw) > 1_000_000
    reply = gateway.request("POST", "/v1/chat/completions", raw=raw)
    assert reply.status == 200, reply.body[:300]
    got = served_by(gateway)
    received = got["small-a"] + got["small-b"]
    assert [r["body_sha256"] for r in received] == [hashlib.sha256(raw).hexdigest()]
    assert got["large"] == []


# ---------------------------------------------------------------- the top-level "model" scanner

PAD = "p" * (PARSE_MAX + 100)

# (body text with {pad} where a big top-level string may go, expected backend model or error code)
TRICKY_BODIES = [
    ('{"tools":[{"model":"chat-large"}],{pad}"model":"chat-small"}', "chat-small"),
    ('{"tools":[{"type":"function","function":{"parameters":{"properties":{"model":{"type":"string"}}}}}],'
     '{pad}"model":"chat-small"}', "chat-small"),
    ('{"messages":[{"role":"user","content":"say \\"model\\": \\"chat-large\\""}],{pad}"model":"chat-small"}',
     "chat-small"),
    ('{"x":"\\\\","y":"\\\\\\"model\\\\\\":","z":"\\"}",{pad}"model":"chat-small"}', "chat-small"),
    ('{"messages":[{"content":"ünïcødé ✓ 中文 {\\"model\\":\\"chat-large\\"}"}],{pad}"model":"chat-small"}',
     "chat-small"),
    ('  \n\t{ {pad}  "model"  :\n  "chat-large" \n, "messages": [] }\r\n', "chat-large"),
    ('{{pad}"model":"chat-l\\u0061rge","messages":[{"model":"chat-small"}]}', "chat-large"),
    ('{{pad}"mod\\u0065l":"chat-large"}', "chat-large"),
    ('{{pad}"model":"chat-small","messages":[],"model":"chat-large"}', "chat-large"),
    ('{{pad}"model":"chat-small","messages":[{"model":"x"}],"mod\\u0065l":"chat-large"}', "chat-large"),
    ('{{pad}"models":"chat-large","model_":"x","model":"chat-small"}', "chat-small"),
    ('{{pad}"a":{"b":[1,2,{"c":"]}"}],"d":null},"model":"chat-small"}', "chat-small"),
    ('{{pad}"model":7}', "invalid_body"),
    ('{{pad}"model":null}', "invalid_body"),
    ('{{pad}"model":["chat-small"]}', "invalid_body"),
    ('{{pad}"messages":[{"model":"chat-small"}]}', "missing_model"),
    ('{{pad}"model":""}', "missing_model"),
    ('[{{pad}"model":"chat-small"}]', "invalid_body"),
    ('"{pad}"', "invalid_body"),
    ('{{pad}"messages":["unterminated],"model":"chat-small"}', "invalid_body"),
    ('{{pad}"messages":[{"a":1}},"model":"chat-small"}', "invalid_body"),
    ('{{pad}"messages":[[[{}]],"model":"chat-small"', "invalid_body"),
    ('{{pad}"model":"chat-small"', "invalid_body"),
    ('{{pad}"messages":[],"model":"chat-small"} {"model":"chat-large"}', "invalid_body"),
    ('{{pad}"model":"no-such-model"}', "model_not_found"),
    ('{{pad}"model":"constructor"}', "model_not_found"),
    ('{{pad}"model":"__proto__"}', "model_not_found"),
    # Exact names only: nginx maps compare case-insensitively, the router must not.
    ('{{pad}"model":"CHAT-SMALL"}', "model_not_found"),
    ('{{pad}"model":"Mixed-Case"}', "chat-small"),
    ('{{pad}"model":"mixed-case"}', "chat-large"),
    ('{{pad}"model":"MIXED-case"}', "model_not_found"),
    # A top-level key with an escape, and escapes in the value: njs decodes them.
    ('{{pad}"m\\u006fdel":"chat-large","model":"chat-small"}', "chat-small"),
    ('{{pad}"model":"chat-small","\\u006dodel":"chat-large"}', "chat-large"),
    ('{{pad}"model":"chat\\u002dlarge"}', "chat-large"),
    ('{{pad}"model":"chat-small","a":"\\ud83d\\ude00 \\/ \\b\\f\\n\\r\\t"}', "chat-small"),
    ('{{pad}"model" :\t"chat-small" ,"a":[ ] , "b":{ } }', "chat-small"),
    ('{{pad}"a":[1,-2.5e+3,0.5,true,false,null,"x",{},[[]]],"model":"chat-small"}', "chat-small"),
    ('{{pad}"model":"chat-small","model":7}', "invalid_body"),
    ('{{pad}"model":"chat-small","model":""}', "missing_model"),
]

# Bodies JSON.parse rejects although their structure is sound: the fast path must
# reject them too (they never reach a backend). The scanner, which checks
# structure only, leaves them to the backend's parser. (njs 0.7.9's JSON.parse
# itself accepts 01 and 1., so those are left out.)
INVALID_SCALARS = [
    '{{pad}"model":"chat-small","a":[1,]}',
    '{{pad}"model":"chat-small","a":[,1]}',
    '{{pad}"model":"chat-small",}',
    '{{pad}"model":"chat-small","a":+1}',
    '{{pad}"model":"chat-small","a":tru}',
    '{{pad}"model":"chat-small","a":"\\x41"}',
    '{{pad}"model":"chat-small","a":"\\u12"}',
    '{{pad}"model":"chat-small","a":"raw\ttab"}',
    '{{pad}"model":"chat-small","a":{"b" 1}}',
    '{{pad}"model":"chat-small","a":{"b":1 "c":2}}',
    '{{pad}"model":"chat-small" "a":1}',
    '{{pad}"model":"chat-small","a":\v1}',
]


# Where a body of each size is read: "fast" by nginx's "whole" regex, the others by
# its "tail" regex; when a regex gives no answer, "fast" and "parsed" bodies by njs's
# JSON.parse, "scanned" ones by njs's scanner.
PAD_FOR = {"fast": "", "parsed": "p" * (FAST_MAX + 100), "scanned": PAD}

# Bodies over FAST_MAX bytes that are invalid before their top-level "model" key: the
# tail regex vouches only for what follows the key, so they go on, unchanged, to the
# backend of the model the key names, whose own parser refuses them.
PREFIX_LEFT_TO_BACKEND = {
    '{{pad}"messages":["unterminated],"model":"chat-small"}': "chat-small",
    '{{pad}"messages":[{"a":1}},"model":"chat-small"}': "chat-small",
    '{{pad}"messages":[],"model":"chat-small"} {"model":"chat-large"}': "chat-large",
}
# Likewise the tail regex checks where strings end, not their escapes or raw control
# characters; the backend's parser does.
STRING_LEFT_TO_BACKEND = {
    '{{pad}"model":"chat-small","a":"\\x41"}',
    '{{pad}"model":"chat-small","a":"\\u12"}',
    '{{pad}"model":"chat-small","a":"raw\ttab"}',
}


@pytest.mark.parametrize("size", ["fast", "parsed", "scanned"])
@pytest.mark.parametrize(("template", "expected"), TRICKY_BODIES)
def test_top_level_model(gateway: Gateway, template: str, expected: str, size: str) -> None:
    pad = f'"pad":"{PAD_FOR[size]}",' if size != "fast" else ""
    text = template.replace("{pad}", pad)
    if template.startswith('"{pad}"'):
        text = json.dumps(PAD_FOR[size] or "x")
    raw = text.encode()
    assert {"fast": len(raw) <= FAST_MAX, "parsed": FAST_MAX < len(raw) <= PARSE_MAX,
            "scanned": len(raw) > PARSE_MAX}[size]
    if size != "fast":
        expected = PREFIX_LEFT_TO_BACKEND.get(template, expected)
    reply = gateway.request("POST", "/v1/chat/completions", raw=raw)
    if expected in ("chat-small", "chat-large"):
        # The backend may refuse these odd bodies itself; what matters is where they went, unchanged.
        received = [(gateway.backends[name].models[0], r["body_sha256"])
                    for name, rs in served_by(gateway).items() for r in rs]
        assert received == [(expected, hashlib.sha256(raw).hexdigest())], reply.body
    else:
        assert_error(reply, 404 if expected == "model_not_found" else 400, expected)
        assert all(not rs for rs in served_by(gateway).values())


def test_dense_large_body_falls_back_to_full_parse(gateway: Gateway) -> None:
    """Past the scanner's token budget the router parses the whole body; the answer is the same."""
    body = {"messages": [{"role": "user", "content": f"w{i}", "model": "chat-large"} for i in range(3000)],
            "model": "gpt-4o-mini"}
    reply = gateway.request("POST", "/v1/chat/completions", body)
    assert reply.status == 200, reply.body[:300]
    assert reply.headers["X-Backend-Model"] == "chat-small"
    broken = json.dumps(body)[:-1] + ",}"
    assert_error(gateway.request("POST", "/v1/chat/completions", raw=broken.encode()), 400, "invalid_body")


@pytest.mark.parametrize("size", ["fast", "parsed"])
@pytest.mark.parametrize("template", INVALID_SCALARS)
def test_invalid_json_never_reaches_a_backend(gateway: Gateway, template: str, size: str) -> None:
    pad = f'"pad":"{PAD_FOR[size]}",' if size != "fast" else ""
    raw = template.replace("{pad}", pad).encode()
    reply = gateway.request("POST", "/v1/chat/completions", raw=raw)
    if size != "fast" and template in STRING_LEFT_TO_BACKEND:
        got = served_by(gateway)
        assert [r["body_sha256"] for r in got["small-a"] + got["small-b"]] == [hashlib.sha256(raw).hexdigest()]
        assert_error(reply, 400, "invalid_json")
        return
    assert_error(reply, 400, "invalid_body")
    assert all(not rs for rs in served_by(gateway).values())


@pytest.mark.parametrize(("depth", "nested"), [(14, "["), (14, '{"a":'), (20, "["), (20, '{"a":'),
                                              (40, "["), (40, '{"a":'), (1000, "["), (1000, '{"m":')])
def test_deep_nesting_never_takes_a_nested_model(gateway: Gateway, depth: int, nested: str) -> None:
    """A decoy at the bottom. Deeper than the fast path's bound (16), njs takes over, whose
    JSON.parse (njs 0.7.9) refuses a few dozen levels: a 400, never the decoy."""
    close = "]" if nested == "[" else "}"
    raw = ('{"a":' + nested * depth + '{"model":"chat-large"}' + close * depth + ',"model":"chat-small"}').encode()
    assert len(raw) <= FAST_MAX
    reply = gateway.request("POST", "/v1/chat/completions", raw=raw)
    got = served_by(gateway)
    assert got["large"] == []
    received = [r["body_sha256"] for r in got["small-a"] + got["small-b"]]
    if received or depth < 30:
        assert received == [hashlib.sha256(raw).hexdigest()], reply.body[:300]
    else:
        assert_error(reply, 400, "invalid_body")
    assert_no_pcre_error(gateway)


@pytest.mark.parametrize("where", ["after", "inside"])
def test_big_body_with_many_nested_models(gateway: Gateway, where: str) -> None:
    """Hundreds of nested "model" keys, each a candidate for the tail regex: only the top-level one routes."""
    tools = [{"type": "function", "function": {"name": f"f{i}", "model": "chat-large",
                                               "parameters": {"properties": {"model": {"type": "string"}}}}}
             for i in range(400)]
    body: dict[str, Any] = {"model": "chat-small", "tools": tools} if where == "after" else {
        "tools": tools, "messages": [{"role": "user", "content": "hi", "model": "chat-large"}], "model": "chat-small"}
    raw = json.dumps(body).encode()
    assert len(raw) > PARSE_MAX
    reply = gateway.request("POST", "/v1/chat/completions", raw=raw)
    got = served_by(gateway)
    assert got["large"] == []
    assert [r["body_sha256"] for r in got["small-a"] + got["small-b"]] == [hashlib.sha256(raw).hexdigest()], \
        reply.body[:300]
    assert_no_pcre_error(gateway)


def test_big_dense_body_after_the_model_key(gateway: Gateway) -> None:
    """An embeddings request of 200,000 token ids after "model": one long walk, within PCRE's stack."""
    raw = json.dumps({"model": "embed-small", "input": list(range(200_000))}).encode()
    reply = gateway.request("POST", "/v1/embeddings", raw=raw)
    assert reply.status == 200, reply.body[:300]
    assert gateway.backends["embed"].requests()[-1]["body_sha256"] == hashlib.sha256(raw).hexdigest()
    assert_no_pcre_error(gateway)


@pytest.mark.parametrize("nested", ["[", '{"a":'])
def test_deep_nesting_in_a_big_body(gateway: Gateway, nested: str) -> None:
    """Deeper than the tail regex's bound after the key: njs decides, never the nested decoy."""
    close = "]" if nested == "[" else "}"
    raw = ('{"pad":"' + "p" * PARSE_MAX + '","model":"chat-small","a":' + nested * 30
           + '{"model":"chat-large"}' + close * 30 + "}").encode()
    reply = gateway.request("POST", "/v1/chat/completions", raw=raw)
    got = served_by(gateway)
    assert got["large"] == []
    assert [r["body_sha256"] for r in got["small-a"] + got["small-b"]] == [hashlib.sha256(raw).hexdigest()], \
        reply.body[:300]


def test_chunked_body_is_routed_by_njs(gateway: Gateway) -> None:
    """No Content-Length: the fast path does not apply; the answer is the same."""
    conn = gateway.connect()
    raw = json.dumps(chat("chat-large", tools=[{"model": "chat-small"}])).encode()
    conn.request("POST", "/v1/chat/completions", body=iter([raw[:10], raw[10:]]),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200
    assert resp.headers["X-Backend-Model"] == "chat-large"
    assert gateway.backends["large"].requests()[-1]["body_sha256"] == hashlib.sha256(raw).hexdigest()


def refuse_njs_routes(root: Path) -> None:
    """Make the rendered router.js answer every request it is asked to route with a 500."""
    router = root / "llm" / "router.js"
    refuse = "function route(r) {\n    return sendError(r, 500, 'njs was asked', 'server_error');"
    router.write_text(router.read_text().replace("function route(r) {", refuse, 1))


def test_fast_path_routes_without_njs(tmp_path: Path) -> None:
    """With an njs router that refuses everything, only what the fast path cannot answer fails."""
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    backend = start_backend(["chat-small"])
    conf = render_gateway(tmp_path, routes_for([route("chat-small", "llm_chat_small", "/v1", ["chat"], [])]),
                          [Upstream("llm_chat_small", "chat-small", [backend.address])], ["chat-small"],
                          gateway_http_port=(port := free_port()), gateway_https_port=0)
    refuse_njs_routes(tmp_path)
    proc = start_nginx(conf, port)
    try:
        plain = json.dumps(chat("chat-small", tools=[{"model": "chat-large"}])).encode()
        big = json.dumps(chat("chat-small", tools=[{"model": "chat-large"}], pad="p" * FAST_MAX)).encode()
        assert post_json(port, plain).status == 200
        assert post_json(port, big).status == 200, "the tail regex routes a big body"
        for njs_only in (b'{"mod\\u0065l":"chat-small"}', b'{"model":"nope"}', b'{"model":"CHAT-SMALL"}',
                         big[:-1] + b',"mod\\u0065l":"x"}'):
            reply = post_json(port, njs_only)
            assert reply.status == 500 and b"njs was asked" in reply.body, njs_only[:60]
        assert len(backend.requests()) == 2
    finally:
        stop(proc)
        stop(backend.proc)


def test_names_with_slashes_colons_and_dots_route_without_njs(tmp_path: Path) -> None:
    """Every character the registry allows in a name works in nginx's maps and location names."""
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    names = ["Qwen/Qwen2.5-7B-Instruct", "qwen:7b.v1"]
    backend = start_backend(names, api_prefix="")
    conf = render_gateway(tmp_path, routes_for([route(names[0], "llm_qwen", "", ["chat"], names[1:])]),
                          [Upstream("llm_qwen", names[0], [backend.address])], names[:1],
                          gateway_http_port=(port := free_port()), gateway_https_port=0)
    refuse_njs_routes(tmp_path)
    proc = start_nginx(conf, port)
    try:
        for name in names:
            for pad in ("", "p" * FAST_MAX):
                reply = post_json(port, json.dumps(chat(name, pad=pad)).encode(), "/v1/chat/completions?trace=1")
                assert reply.status == 200, reply.body[:200]
        # The empty API prefix (Infinity's): /v1/chat/completions -> /chat/completions.
        assert {(r["path"], r["model"]) for r in backend.requests()} == {("/chat/completions", name) for name in names}
    finally:
        stop(proc)
        stop(backend.proc)


def test_names_told_apart_by_case_route_without_njs(tmp_path: Path) -> None:
    """The regex compares exactly: two names that differ only in case go to their own models."""
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    upper, lower = start_backend(["Qwen-Chat"]), start_backend(["qwen-chat"])
    entries = [route("Qwen-Chat", "llm_upper", "/v1", ["chat"], []), route("qwen-chat", "llm_lower", "/v1", ["chat"], [])]
    conf = render_gateway(tmp_path, routes_for(entries),
                          [Upstream("llm_upper", "Qwen-Chat", [upper.address]),
                           Upstream("llm_lower", "qwen-chat", [lower.address])], ["Qwen-Chat", "qwen-chat"],
                          gateway_http_port=(port := free_port()), gateway_https_port=0)
    refuse_njs_routes(tmp_path)
    proc = start_nginx(conf, port)
    try:
        for pad in ("", "p" * FAST_MAX):
            for name in ("Qwen-Chat", "qwen-chat"):
                reply = post_json(port, json.dumps(chat(name, pad=pad)).encode())
                assert reply.status == 200 and reply.headers["X-Backend-Model"] == name, reply.body[:200]
        reply = post_json(port, json.dumps(chat("QWEN-CHAT")).encode())
        assert reply.status == 500 and b"njs was asked" in reply.body
        assert [len(upper.requests()), len(lower.requests())] == [2, 2]
    finally:
        stop(proc)
        stop(upper.proc)
        stop(lower.proc)


def test_names_beyond_the_regex_room_are_routed_by_njs(tmp_path: Path) -> None:
    """A registry too big for one nginx regex: nginx takes the names that fit, njs the rest, same result."""
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    # Enough names that the list of those left to njs is longer than one 4 KB config line.
    names = [f"org-{i:03d}/model-{i:03d}.instruct" for i in range(200)]
    backend = start_backend(names)
    routes = routes_for([route(names[0], "llm_many", "/v1", ["chat"], names[1:])])
    plan = gateway_regex_plugin().llm_fast_routes(routes)["chat"]
    fast, njs_only = plan["nginx"], plan["njs"]
    assert fast and njs_only and fast + njs_only == names
    conf = render_gateway(tmp_path, routes, [Upstream("llm_many", names[0], [backend.address])], names[:1],
                          gateway_http_port=(port := free_port()), gateway_https_port=0)
    block = re.search(r"# Routed by njs: .*\n((?:    #   .*\n)+)", (tmp_path / "llm" / "gateway.conf").read_text())
    assert block and block.group(1).replace("#", " ").split() == njs_only, "the config names what njs routes"
    try:
        for refused in (False, True):
            if refused:
                refuse_njs_routes(tmp_path)
            proc = start_nginx(conf, port)
            try:
                for name in (fast[0], fast[-1], njs_only[0], njs_only[-1]):
                    for pad in ("", "p" * FAST_MAX):
                        reply = post_json(port, json.dumps(chat(name, pad=pad)).encode())
                        if refused and name in njs_only:
                            assert reply.status == 500 and b"njs was asked" in reply.body
                        else:
                            assert reply.status == 200 and backend.requests()[-1]["model"] == name, reply.body
            finally:
                stop(proc)
        assert len(backend.requests()) == 8 + 4
    finally:
        stop(backend.proc)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"", 400, "invalid_body"),
    (b"not json", 400, "invalid_body"),
    (b'{"model": "chat-small",', 400, "invalid_body"),
    (b"[]", 400, "invalid_body"),
    (b'{"messages": []}', 400, "missing_model"),
    (b'{"model": "nope"}', 404, "model_not_found"),
])
def test_bad_requests_are_json_errors(gateway: Gateway, raw: bytes, status: int, code: str) -> None:
    assert_error(gateway.request("POST", "/v1/chat/completions", raw=raw), status, code)


def test_model_on_wrong_endpoint(gateway: Gateway) -> None:
    error = assert_error(gateway.request("POST", "/v1/embeddings", {"model": "chat-small", "input": "x"}), 400,
                         "unsupported_endpoint")
    assert "/v1/chat/completions" in error["message"]
    assert_error(gateway.request("POST", "/v1/chat/completions", chat("embed-small")), 400, "unsupported_endpoint")


def test_body_over_limit_is_413_json(gateway: Gateway) -> None:
    raw = b'{"model":"chat-small","x":"' + b"a" * (16 * 1024 * 1024) + b'"}'
    error = assert_error(gateway.request("POST", "/v1/chat/completions", raw=raw), 413, "request_too_large")
    assert "16m" in error["message"]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/chat/completions", 405),
    ("PUT", "/v1/embeddings", 405),
    ("POST", "/v1/models", 405),
    ("GET", "/v1/nothing", 404),
    ("GET", "/", 404),
    ("POST", "/v1/chat/completions/x", 404),
])
def test_no_html_error_pages(gateway: Gateway, method: str, path: str, status: int) -> None:
    reply = gateway.request(method, path, body=chat("chat-small") if method != "GET" else None)
    assert_error(reply, status)
    assert b"<html" not in reply.body
    if status == 405 and path != "/v1/models":
        assert reply.headers["Allow"] == "POST"
    assert all(not rs for rs in served_by(gateway).values())


def test_all_servers_down_is_503_json_with_retry_after(gateway: Gateway) -> None:
    reply = gateway.request("POST", "/v1/chat/completions", chat("down-model"))
    error = assert_error(reply, 503, "model_unavailable")
    assert "down-model" in error["message"]
    assert reply.headers["Retry-After"] == "5"


def test_upstream_timeout_is_504_json(gateway: Gateway) -> None:
    gateway.backends["large"].control("POST", "/_test/behaviour", {"mode": "hang"})
    try:
        assert_error(gateway.request("POST", "/v1/chat/completions", chat("chat-large")), 504, "upstream_timeout")
    finally:
        gateway.backends["large"].control("POST", "/_test/behaviour", {"mode": "ok"})
    # Once: a request that reached a backend is not repeated on another one.
    assert len(gateway.backends["large"].requests()) == 1


def test_connect_timeout_on_every_server_is_503(tmp_path: Path) -> None:
    """A server that never accepts (a host gone silent) is unavailable, not slow: 503, not 504.

    The stand-in listens with a backlog of 0 and one connection already queued, so the
    kernel drops the gateway's SYNs and its connects time out, all on 127.0.0.1.
    """
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    queued = socket.create_connection(silent.getsockname(), timeout=2)
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        with pytest.raises(OSError):
            socket.create_connection(silent.getsockname(), timeout=0.5).close()
        conf = render_gateway(tmp_path, routes_for([route("gone-model", "llm_gone_model", "/v1", ["chat"], [])]),
                              [Upstream("llm_gone_model", "gone-model", [address, address])], ["gone-model"],
                              gateway_http_port=(port := free_port()), gateway_https_port=0,
                              gateway_proxy_connect_timeout="1s")
        proc = start_nginx(conf, port)
        try:
            reply = post_json(port, json.dumps(chat("gone-model")).encode(), timeout=20)
        finally:
            stop(proc)
    finally:
        queued.close()
        silent.close()
    error = assert_error(reply, 503, "model_unavailable")
    assert "gone-model" in error["message"]
    assert reply.headers["Retry-After"] == "5"


def test_backend_error_bodies_pass_through(gateway: Gateway) -> None:
    gateway.backends["large"].control("POST", "/_test/behaviour", {"mode": "fail", "status": 503})
    reply = gateway.request("POST", "/v1/chat/completions", chat("chat-large"))
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "injected_failure"


def test_one_server_down_retries_to_the_other(gateway: Gateway, tmp_path: Path) -> None:
    """Connection refused on one server of a model: every request still succeeds."""
    spare = start_backend(["chat-large"])
    dead = free_port()
    conf = render_gateway(tmp_path, routes_for([route("chat-large", "llm_chat_large", "/v1", ["chat"], [])]),
                          [Upstream("llm_chat_large", "chat-large", [f"127.0.0.1:{dead}", spare.address])],
                          ["chat-large"], gateway_http_port=(port := free_port()), gateway_https_port=0,
                          gateway_upstream_balance="round_robin", gateway_upstream_fail_timeout="1s")
    proc = start_nginx(conf, port)
    try:
        failures = 0
        for _ in range(200):
            failures += post_json(port, json.dumps(chat("chat-large")).encode()).status != 200
        assert failures == 0
        assert len(spare.requests()) == 200
    finally:
        stop(proc)
        stop(spare.proc)


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("tls", [False, True])
def test_stream_events_arrive_as_sent(gateway: Gateway, tls: bool) -> None:
    conn = gateway.connect(tls)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(chat("chat-small", stream=True, max_tokens=6)),
                 headers={"Content-Type": "application/json", "X-Test-Stream-Interval": "0.3"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    start, arrivals, buffer = time.monotonic(), [], b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            arrivals.append((time.monotonic() - start, event))
    conn.close()
    assert arrivals[-1][1] == b"data: [DONE]"
    content_times = [t for t, e in arrivals if b'"content"' in e]
    assert len(content_times) >= 4
    # Paced 0.3 s apart at the backend: buffering would deliver them all together at the end.
    # (The backend sends its first two content events together, like vLLM's role and first token.)
    gaps = [b - a for a, b in zip(content_times[1:], content_times[2:])]
    assert min(gaps) > 0.15, gaps
    assert content_times[0] < content_times[-1] - 0.6


# ---------------------------------------------------------------- models, health, readiness


def test_models_list_is_the_canonical_registry(gateway: Gateway) -> None:
    reply = gateway.request("GET", "/v1/models")
    assert reply.status == 200
    body = reply.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["chat-small", "chat-large", "embed-small", "down-model"]
    for entry in body["data"]:
        assert entry["object"] == "model" and isinstance(entry["created"], int) and entry["owned_by"]


def test_model_lookup_by_alias_and_unknown(gateway: Gateway) -> None:
    assert gateway.request("GET", "/v1/models/gpt-4o-mini").json()["id"] == "chat-small"
    assert gateway.request("GET", "/v1/models/embed-small").json()["id"] == "embed-small"
    assert_error(gateway.request("GET", "/v1/models/nope"), 404, "model_not_found")


def test_health_and_readiness(gateway: Gateway) -> None:
    assert gateway.request("GET", "/health").status == 200
    reply = gateway.request("GET", "/ready")
    assert reply.status == 503  # down-model has no live server
    body = reply.json()
    live = {u["model"]: u["live"] for u in body["upstreams"]}
    assert live == {"chat-large": 1, "chat-small": 2, "down-model": 0, "embed-small": 1}
    down = next(u for u in body["upstreams"] if u["model"] == "down-model")
    assert {s["address"] for s in down["servers"]} == {f"127.0.0.1:{p}" for p in gateway.down_ports}


# ---------------------------------------------------------------- request ids and the access log


def test_request_id_kept_or_made_and_logged(gateway: Gateway) -> None:
    reply = gateway.request("POST", "/v1/chat/completions", chat("chat-large"), headers={"X-Request-ID": "abc-123"})
    assert reply.headers.get_all("X-Request-ID") == ["abc-123"], "returned once, not doubled by the backend's echo"
    assert gateway.backends["large"].requests()[-1]["request_id"] == "abc-123"
    reply = gateway.request("POST", "/v1/chat/completions", chat("chat-large"),
                            headers={"X-Request-ID": "bad id\" with junk"})
    made = reply.headers["X-Request-ID"]
    # gateway_request_id: sequence, with the tag render_gateway passes.
    assert re.fullmatch(r"0123abcd-[0-9]+\.[0-9]{3}-[0-9]+-[0-9]+", made), made
    assert gateway.backends["large"].requests()[-1]["request_id"] == made
    others = {gateway.request("GET", "/v1/nothing").headers["X-Request-ID"] for _ in range(5)}
    assert len(others | {made}) == 6, "every request gets its own id"


def test_random_request_ids_are_nginx_request_id(tmp_path: Path) -> None:
    """gateway_request_id: random hands the choice to nginx's $request_id (32 hex digits)."""
    conf = render_gateway(tmp_path, routes_for([route("chat-small", "llm_chat_small", "/v1", ["chat"], [])]),
                          [Upstream("llm_chat_small", "chat-small", ["127.0.0.1:9"])], ["chat-small"],
                          gateway_http_port=(port := free_port()), gateway_https_port=0, gateway_request_id="random")
    proc = start_nginx(conf, port)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v1/nothing")
        made = conn.getresponse().headers["X-Request-ID"]
        conn.close()
    finally:
        stop(proc)
    assert re.fullmatch(r"[0-9a-f]{32}", made), made


def test_access_log_is_json_per_request(gateway: Gateway) -> None:
    gateway.request("POST", "/v1/chat/completions", chat("gpt-4o-mini", stream=True),
                    headers={"X-Request-ID": "log-stream-1"})
    gateway.request("POST", "/v1/chat/completions", chat("nope"), headers={"X-Request-ID": "log-404-1"})
    entries = gateway.logged({"log-stream-1", "log-404-1"})
    streamed = entries["log-stream-1"]
    assert streamed["model"] == "chat-small" and streamed["model_requested"] == "gpt-4o-mini"
    assert streamed["stream"] is True and streamed["status"] == 200
    assert streamed["upstream"] == "llm_chat_small"
    assert streamed["upstream_addr"] in {b.address for b in gateway.backends.values()}
    assert streamed["api_key_id"] == "" and streamed["bytes_in"] > 0 and streamed["bytes_out"] > 0
    assert entries["log-404-1"]["status"] == 404 and entries["log-404-1"]["stream"] is False


def test_access_log_stays_json_whatever_the_client_sends(gateway: Gateway) -> None:
    """Routed requests log without escaping (nothing in them can need it); the rest escape.

    Names with a quote, a backslash or a control character never reach @model_<name>, and a
    name that differs in case leaves it for njs through the escaping log.
    """
    sent = {"log-routed-1": "chat-small", "log-quote-1": 'nope"}, "x": "', "log-backslash-1": "no\\pe",
            "log-control-1": "no\u0001pe", "log-case-1": "CHAT-SMALL"}
    for request_id, model in sent.items():
        gateway.request("POST", "/v1/chat/completions", chat(model), headers={"X-Request-ID": request_id})
    gateway.request("POST", '/v1/chat/completions?"}{"x', chat("chat-small"), headers={"X-Request-ID": "log-query-1"})
    # Every line must parse: one unescaped quote would break the line it is in.
    entries = gateway.logged({*sent, "log-query-1"})
    assert entries["log-routed-1"]["status"] == 200 and entries["log-routed-1"]["upstream"] == "llm_chat_small"
    assert entries["log-query-1"]["status"] == 200 and entries["log-query-1"]["path"] == "/v1/chat/completions"
    for request_id in ("log-quote-1", "log-backslash-1", "log-control-1", "log-case-1"):
        assert entries[request_id]["status"] == 404, request_id
        assert entries[request_id]["model_requested"] == sent[request_id], request_id

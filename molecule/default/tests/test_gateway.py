"""The gateway host: nginx with njs from Debian's packages, its files, sockets and logs."""

from __future__ import annotations

import json
import uuid

import requests
from lab_pytest import access_log_lines, bearer, wait_until

testinfra_hosts = ["llm_gateways"]


def test_nginx_and_njs_come_from_the_distribution(host):
    assert host.package("nginx").is_installed
    assert host.package("libnginx-mod-http-js").is_installed
    assert host.file("/usr/lib/nginx/modules/ngx_http_js_module.so").exists


def test_nginx_runs_and_its_configuration_checks(host):
    nginx = host.service("nginx")
    assert nginx.is_running and nginx.is_enabled
    assert host.run("nginx -t").rc == 0


def test_nginx_runs_with_the_heap_setting(host):
    """The drop-in is loaded and nginx started after it was written (its environment is read at start).

    /proc/<pid>/environ cannot tell: nginx writes its process title over that memory.
    """
    path = "/etc/systemd/system/nginx.service.d/llm-gateway-malloc.conf"
    dropin = host.file(path)
    assert dropin.exists and (dropin.user, dropin.mode) == ("root", 0o644)
    show = dict(line.split("=", 1) for line in host.check_output(
        "systemctl show nginx -p Environment -p NeedDaemonReload -p MainPID").splitlines())
    assert {"MALLOC_TOP_PAD_=33554432", "MALLOC_MMAP_THRESHOLD_=33554432"} <= set(show["Environment"].split())
    assert show["NeedDaemonReload"] == "no"
    started = int(host.check_output("date +%s")) - int(host.check_output(f"ps -o etimes= -p {show['MainPID']}"))
    assert started >= int(host.check_output(f"stat -c %Y {path}")) - 1, "nginx was not restarted after the drop-in"


def test_gateway_listens_on_http_and_https(host):
    assert host.socket("tcp://0.0.0.0:80").is_listening
    assert host.socket("tcp://0.0.0.0:443").is_listening


def test_debian_default_site_is_gone(host):
    assert not host.file("/etc/nginx/sites-enabled/default").exists


def test_gateway_files_are_root_owned_and_readable_by_nginx_only(host):
    """Some hold the model servers' keys, the htpasswd hashes or the client keys' hashes."""
    assert not host.file("/etc/nginx/llm/upstreams.conf").exists, "the upstreams are in gateway.conf"
    directory = host.file("/etc/nginx/llm")
    assert (directory.user, directory.group, directory.mode) == ("root", "www-data", 0o750)
    for name in ("router.js", "multipart.js", "routes.js", "api_keys.js", "gateway.conf", "find-model.conf",
                 "backend-auth.conf", "services-auth.conf", "admin.htpasswd"):
        config = host.file(f"/etc/nginx/llm/{name}")
        assert config.exists, name
        assert (config.user, config.group, config.mode) == ("root", "www-data", 0o640), name


def test_routes_are_derived_from_the_registry(host):
    routes = host.file("/etc/nginx/llm/routes.js").content_string
    for model in ("chat-small", "gpt-4o-mini", "chat-large", "embed-small", "text-embedding-3-small"):
        assert json.dumps(model) in routes, model


def test_access_log_is_one_json_object_per_request(host, gateway_url):
    probe = f"log-probe-{uuid.uuid4().hex}"
    requests.get(f"{gateway_url}/v1/models", headers={"X-Request-ID": probe, **bearer()}, timeout=10)

    def probe_lines() -> list[str]:
        return access_log_lines(host, probe)

    # The log is buffered: nginx writes it at least once a second.
    assert wait_until(lambda: bool(probe_lines()), timeout=5), "no access log line for the probe"
    [line] = probe_lines()
    entry = json.loads(line)
    assert entry["request_id"] == probe
    assert entry["status"] == 200
    assert {"time", "model", "upstream_addr", "request_time", "bytes_in", "bytes_out", "stream"} <= entry.keys()
    assert entry["api_key_id"] == "tests"

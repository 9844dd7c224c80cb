"""The configuration the role writes for the lab's registry, kept in the repository so that a
change of the templates shows in review as a diff of real nginx configuration.

`UPDATE_EXAMPLES=1 python -m pytest tests/nginx/test_lab_config.py` writes them anew.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from gateway_lab import REPO, nginx_missing, nginx_test, render_gateway

EXAMPLES = REPO / "roles" / "gateway" / "examples" / "lab"
FILES = ("gateway.conf", "find-model.conf", "routes.js", "api_keys.js")
# The lab's GPU hosts, at stand-in addresses.
ADDRESSES = {"gpu1": "10.89.0.11", "gpu2": "10.89.0.12"}


def render(root: Path) -> Path:
    registry = yaml.safe_load((REPO / "inventories" / "lab" / "group_vars" / "all" / "llm_models.yml").read_text())
    # The lab's gateway variables, its generated key and password replaced by stand-ins.
    return render_gateway(root, registry["llm_models"], ADDRESSES, gateway_http_port=80, gateway_http_api="serve",
                          gateway_https_port=0, gateway_api_keys_required=True,
                          llm_api_keys=[{"id": "lab", "key": "stand-in-for-the-generated-lab-key", "models": "all"}],
                          gateway_admin_users=[{"name": "admin", "password": "stand-in"}],
                          gateway_listen_address="", gateway_access_log="/var/log/nginx/llm-access.log",
                          gateway_cache_path="/var/cache/nginx/llm", gateway_health_checks=True,
                          ansible_managed="Ansible managed (roles/gateway/examples/lab: the lab registry rendered)")


def test_lab_configuration_example_is_current(tmp_path: Path) -> None:
    render(tmp_path)
    if os.environ.get("UPDATE_EXAMPLES") == "1":
        EXAMPLES.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            (EXAMPLES / name).write_text((tmp_path / "llm" / name).read_text())
    for name in FILES:
        assert (tmp_path / "llm" / name).read_text() == (EXAMPLES / name).read_text(), \
            f"{name} changed: run UPDATE_EXAMPLES=1 python -m pytest {Path(__file__).relative_to(REPO)}"


def test_lab_configuration_passes_nginx_t(tmp_path: Path) -> None:
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    conf = render(tmp_path)
    # nginx -t must bind nothing: port 80 may be taken, so check a copy listening elsewhere.
    gateway = tmp_path / "llm" / "gateway.conf"
    gateway.write_text(gateway.read_text().replace("listen 80 default_server;", "listen 127.0.0.1:1 default_server;"))
    check = nginx_test(conf)
    assert check.returncode == 0, check.stderr

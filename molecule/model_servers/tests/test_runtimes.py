"""Every GPU host: each model a hardened systemd unit, or a container; all answer on the private address."""

from __future__ import annotations

import requests

from lab_pytest import assigned_models

testinfra_hosts = ["llm_gpu_hosts"]


def test_systemd_models_run_as_hardened_units_and_nothing_else_has_one(host, inventory):
    models = assigned_models(host, inventory, "systemd")
    units = host.check_output("systemctl list-units --all --no-legend --plain 'llm-model-*' | awk '{print $1}'")
    assert set(units.split()) == {f"llm-model-{m['name']}.service" for m in models}
    for model in models:
        unit = f"llm-model-{model['name']}.service"
        service = host.service(unit)
        assert service.is_running and service.is_enabled, unit
        props = host.run(f"systemctl show {unit} -p User -p NoNewPrivileges -p Restart -p ProtectSystem").stdout
        assert "User=llm" in props and "NoNewPrivileges=yes" in props and "Restart=on-failure" in props


def test_every_model_answers_health_from_the_gateways_side(host, inventory, address_of):
    address = address_of(host.backend.get_hostname())
    for model in assigned_models(host, inventory):
        assert requests.get(f"http://{address}:{model['port']}/health", timeout=5).status_code == 200, model["name"]

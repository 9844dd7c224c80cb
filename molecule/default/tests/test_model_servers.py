"""GPU hosts: one hardened systemd unit per assigned model, listening on the private address only."""

from __future__ import annotations

from lab_pytest import assigned_models

testinfra_hosts = ["llm_gpu_hosts"]


def test_service_account_is_unprivileged(host):
    user = host.user("llm")
    assert user.exists
    assert user.shell == "/usr/sbin/nologin"
    assert user.uid < 1000, "a system account"
    home = host.file("/var/lib/llm")
    assert home.is_directory and home.user == "llm" and home.mode == 0o750


def test_every_assigned_model_runs_as_its_own_unit(host, inventory):
    models = assigned_models(host, inventory)
    assert models, "the scenario assigns at least one model to every GPU host"
    for model in models:
        unit = f"llm-model-{model['name']}.service"
        unit_file = host.file(f"/etc/systemd/system/{unit}")
        assert unit_file.exists and unit_file.user == "root" and unit_file.mode == 0o644
        service = host.service(unit)
        assert service.is_running and service.is_enabled
        props = host.run(f"systemctl show {unit} -p User -p NoNewPrivileges -p Restart").stdout
        assert "User=llm" in props and "NoNewPrivileges=yes" in props and "Restart=on-failure" in props


def test_models_listen_on_the_private_address_only(host, inventory, address_of):
    address = address_of(host.backend.get_hostname())
    for model in assigned_models(host, inventory):
        assert host.socket(f"tcp://{address}:{model['port']}").is_listening
        assert not host.socket(f"tcp://0.0.0.0:{model['port']}").is_listening


def test_unassigned_models_do_not_run(host, inventory):
    assigned = {f"llm-model-{m['name']}.service" for m in assigned_models(host, inventory)}
    units = host.check_output("systemctl list-units --all --no-legend --plain 'llm-model-*' | awk '{print $1}'")
    assert set(units.split()) == assigned


def test_model_answers_health_on_its_port(host, inventory, address_of):
    address = address_of(host.backend.get_hostname())
    for model in assigned_models(host, inventory):
        code = host.check_output(f"curl -s -o /dev/null -w '%{{http_code}}' http://{address}:{model['port']}/health")
        assert code == "200", f"{model['name']}: /health answered {code}"

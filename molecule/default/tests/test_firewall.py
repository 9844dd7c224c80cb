"""Host firewall (roles/firewall): the model ports admit the gateways (and the listed
monitoring sources, here the test machine) alone; the gateways admit their listeners and SSH.

Connections are opened from the lab hosts themselves with a bounded timeout; a port
counts as closed to a host only if the same port answers a host that may reach it, so
a stopped service cannot pass for a firewall.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

import pytest
import testinfra

from lab_pytest import CONNECT_TIMEOUT as TIMEOUT, assigned_models, connects

testinfra_hosts = ["llm_gateways", "llm_gpu_hosts"]

TABLE = "inet llm_firewall"
RULESET = "/etc/nftables.d/llm-firewall.nft"
UNIT = "llm-firewall.service"
GATEWAY_PORTS = {80, 443}
def input_rules(host: testinfra.host.Host) -> list[str]:
    """The rules of the role's input chain, one per line, as nft lists them."""
    return [line.strip() for line in host.check_output(f"nft list chain {TABLE} input").splitlines()]


def without_counters(listing: str) -> str:
    return re.sub(r"packets \d+ bytes \d+", "", listing)


@pytest.fixture(scope="module")
def group(inventory) -> Callable[[str], list[str]]:
    """The hosts of an inventory group; "all" is every host (ansible-inventory lists it by children)."""
    def hosts(name: str) -> list[str]:
        if name == "all":
            return sorted(inventory["_meta"]["hostvars"])
        return list(inventory.get(name, {}).get("hosts", []))
    return hosts


def model_ports(lab_host, inventory, name: str) -> list[int]:
    return sorted({model["port"] for model in assigned_models(lab_host(name), inventory)})


def test_ruleset_file_is_checked_and_loaded(host):
    ruleset = host.file(RULESET)
    assert ruleset.is_file and ruleset.user == "root" and ruleset.group == "root" and ruleset.mode == 0o640
    statements = [line.strip() for line in ruleset.content_string.splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    # Only the role's table is replaced: declared (so the delete cannot fail), deleted, rebuilt.
    assert statements[:3] == [f"table {TABLE}", f"delete table {TABLE}", f"table {TABLE} {{"]
    assert not [line for line in statements if line.startswith("flush")]
    check = host.run(f"nft -c -f {RULESET}")
    assert check.rc == 0, check.stderr
    assert host.service(UNIT).is_enabled
    assert host.run(f"systemctl is-active {UNIT}").stdout.strip() == "active"
    assert "policy drop;" in host.check_output(f"nft list chain {TABLE} input")


def test_ssh_is_admitted_on_every_host(host, inventory):
    port = inventory["_meta"]["hostvars"][host.backend.get_hostname()].get("firewall_ssh_port", 22)
    assert any(re.search(rf'saddr \S.* tcp dport {port} accept comment "ssh"', rule) for rule in input_rules(host))


def test_the_unit_loads_the_same_table_after_it_was_lost(host):
    """What a boot does: the table is gone and the unit loads it from the file."""
    before = without_counters(host.check_output(f"nft list table {TABLE}"))
    host.run_expect([0], f"nft delete table {TABLE}")
    assert host.run(f"nft list table {TABLE}").rc != 0
    host.run_expect([0], f"systemctl restart {UNIT}")
    assert without_counters(host.check_output(f"nft list table {TABLE}")) == before


def test_gateways_reach_every_model_port(lab_host, inventory, address_of, group):
    pairs = 0
    for gateway in group("llm_gateways"):
        for gpu in group("llm_gpu_hosts"):
            for port in model_ports(lab_host, inventory, gpu):
                assert connects(lab_host(gateway), address_of(gpu), port), f"{gateway} -> {gpu}:{port}"
                pairs += 1
    assert pairs, "the scenario runs at least one model behind a gateway"


def test_the_test_machine_reaches_every_model_port(lab_host, inventory, address_of, group):
    """Listed as a monitoring source by the scenario: other tests call the backends directly."""
    for gpu in group("llm_gpu_hosts"):
        for port in model_ports(lab_host, inventory, gpu):
            socket.create_connection((address_of(gpu), port), timeout=TIMEOUT).close()


def test_other_hosts_do_not_reach_the_model_ports(lab_host, inventory, address_of, group):
    gateways = set(group("llm_gateways"))
    pairs = []
    for gpu in group("llm_gpu_hosts"):
        for client in sorted(set(group("all")) - gateways - {gpu}):
            pairs += [(client, gpu, port) for port in model_ports(lab_host, inventory, gpu)]
    assert pairs, "the scenario has a host besides the gateways to try from"
    reached = [f"{client} -> {gpu}:{port}" for client, gpu, port in pairs
               if connects(lab_host(client), address_of(gpu), port)]
    assert not reached, f"reached a model port without being a gateway: {reached}"


def test_gateways_admit_only_their_listeners_and_ssh(lab_host, address_of, group):
    gpu = lab_host(group("llm_gpu_hosts")[0])
    for name in group("llm_gateways"):
        gateway = lab_host(name)
        accepted = [rule for rule in input_rules(gateway) if "dport" in rule and "accept" in rule
                    and "saddr fe80::/10 udp dport 546" not in rule]
        comments = {re.search(r'comment "([^"]+)"', rule).group(1) for rule in accepted}
        assert comments <= {"ssh", "open", "ansible controller", "metrics"}, accepted
        opened = [rule for rule in accepted if rule.endswith('comment "open"')]
        assert opened == ["tcp dport { 80, 443 } accept comment \"open\""], accepted
        for port in sorted(GATEWAY_PORTS):
            assert connects(gpu, address_of(name), port), f"{name}:{port} is a listener"
        # The metrics listener admits the llm_monitoring hosts only (here the gateway itself).
        scrapers = {address_of(host) for host in group("llm_monitoring")}
        metrics = [rule for rule in accepted if rule.endswith('comment "metrics"')]
        assert metrics and all(re.match(r"ip6? saddr (\S+) tcp dport 9145 accept", rule).group(1) in scrapers
                               for rule in metrics), metrics
        assert not connects(gpu, address_of(name), 9145), "a GPU host may not scrape the gateway"


def test_an_unlisted_gateway_port_stays_closed(lab_host, address_of, group):
    name = group("llm_gateways")[0]
    gateway, client = lab_host(name), lab_host(group("llm_gpu_hosts")[0])
    unit = "llm-firewall-probe-9999"
    # The listener stops by itself even if this test dies half way.
    gateway.run_expect([0], f"systemd-run --unit={unit} -p RuntimeMaxSec=60 "
                            f"/usr/bin/python3 -m http.server 9999 --bind {address_of(name)}")
    try:
        assert gateway.run(f"timeout 10 sh -c 'until ss -Hltn sport = :9999 | grep -q .; do sleep 0.2; done'").rc == 0
        assert connects(gateway, address_of(name), 9999), "the probe listener answers on the host itself"
        assert not connects(client, address_of(name), 9999), "9999 is not a listener of the gateway"
    finally:
        gateway.run(f"systemctl stop {unit}")

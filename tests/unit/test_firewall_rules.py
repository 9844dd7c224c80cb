"""Unit tests for the firewall role: roles/firewall/filter_plugins/firewall_rules.py and its ruleset.

Errors are asserted on their message (variable, entry and field named), because the
message is what an operator reads when a play stops before touching a host. The
ruleset template is rendered here with the plugin's output, and the rules that decide
who reaches what are asserted line by line; nft itself checks the file in molecule.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from ansible.errors import AnsibleFilterError

import firewall_rules as fw

ROLE = Path(__file__).resolve().parents[2] / "roles" / "firewall"
GATEWAYS = ["10.20.0.10", "10.20.0.11"]


def plan(restricted: Any = None, **settings: Any) -> dict[str, Any]:
    """The plan with the role's defaults for whatever a test does not set."""
    values: dict[str, Any] = {"ssh_port": 22, "ssh_sources": ["0.0.0.0/0", "::/0"], "open_tcp_ports": [],
                              "ssh_client": ""}
    values.update(settings)
    return fw.firewall_plan([] if restricted is None else restricted, **values)


def errors_of(restricted: Any = None, **settings: Any) -> str:
    with pytest.raises(AnsibleFilterError) as info:
        plan(restricted, **settings)
    return str(info.value)


def models(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "models", "ports": [8101, 8102], "sources": list(GATEWAYS)}
    entry.update(overrides)
    return entry


# --- ports -------------------------------------------------------------------

def test_ports_are_sorted_merged_and_ranges_kept() -> None:
    result = plan([models(ports=[8102, 8101, "8103", "9000-9010", 9005, 9011, 7000])])
    assert result["restricted"][0]["ports"] == ["7000", "8101", "8102", "8103", "9000-9010", "9011"]
    assert result["restricted_ports"] == ["7000", "8101", "8102", "8103", "9000-9010", "9011"]


@pytest.mark.parametrize(("port", "message"), [
    (0, "port 0 is outside 1-65535"),
    (65536, "port 65536 is outside 1-65535"),
    ("70000", "port 70000 is outside 1-65535"),
    (True, "got boolean true"),
    ("http", "got 'http'"),
    (8.5, "got 8.5"),
    ("9010-9000", "range '9010-9000' runs backwards (write '9000-9010')"),
    ("1-70000", "port 70000 is outside 1-65535"),
])
def test_a_bad_port_names_the_entry_and_field(port: Any, message: str) -> None:
    error = errors_of([models(ports=[8101, port])])
    assert "firewall_restricted_tcp_ports: entry 'models': field 'ports': " in error
    assert message in error


def test_ports_must_be_a_list() -> None:
    assert "field 'ports': must be a list of ports, got 8101" in errors_of([models(ports=8101)])


def test_a_bad_open_port_names_the_variable() -> None:
    assert "firewall_open_tcp_ports: port 0 is outside 1-65535" in errors_of(open_tcp_ports=[80, 0])


@pytest.mark.parametrize("port", [0, "22-23", "ssh", None])
def test_the_ssh_port_is_one_valid_port(port: Any) -> None:
    assert "firewall_ssh_port: " in errors_of(ssh_port=port)


def test_a_restricted_port_may_not_also_be_open() -> None:
    error = errors_of([models(ports=["8100-8102"])], open_tcp_ports=[80, "8102-8200"])
    assert ("firewall_restricted_tcp_ports: entry 'models': field 'ports': 8102 also in "
            "firewall_open_tcp_ports, which would open them to everyone") in error


def test_the_ssh_port_may_be_neither_open_nor_restricted() -> None:
    error = errors_of([models(ports=[22])], open_tcp_ports=["20-30"])
    assert "entry 'models': field 'ports': port 22 is the SSH port (firewall_ssh_port)" in error
    assert "firewall_open_tcp_ports: port 22 is the SSH port (firewall_ssh_port)" in error


def test_a_moved_ssh_port_frees_22() -> None:
    result = plan(open_tcp_ports=[22], ssh_port=2222)
    assert result["ssh"]["port"] == 2222
    assert result["open_ports"] == ["22"]


# --- sources -----------------------------------------------------------------

def test_sources_are_split_by_family_and_collapsed() -> None:
    result = plan([models(sources=["10.20.0.11", "10.20.0.10", "10.20.0.10", "10.30.0.0/24", "10.30.0.7",
                                   "2001:db8::1", "2001:db8::/64", "fd00::5"])])
    assert result["restricted"][0]["sources"] == {
        "ip": ["10.20.0.10", "10.20.0.11", "10.30.0.0/24"],
        "ip6": ["2001:db8::/64", "fd00::5"],
    }


def test_neighbours_stay_apart_and_covered_ones_go() -> None:
    result = plan([models(sources=["10.0.0.1", "10.0.0.0", "10.0.1.9", "10.0.1.0/24", "10.0.0.0/8"])])
    assert result["restricted"][0]["sources"]["ip"] == ["10.0.0.0/8"]
    result = plan([models(sources=["10.0.0.1", "10.0.0.0"])])
    assert result["restricted"][0]["sources"]["ip"] == ["10.0.0.0", "10.0.0.1"]


def test_neighbouring_ports_stay_apart() -> None:
    assert plan(open_tcp_ports=[81, 80, "82-90"])["open_ports"] == ["80", "81", "82-90"]


@pytest.mark.parametrize(("source", "message"), [
    ("10.0.0.300", "'10.0.0.300' is not an IPv4 or IPv6 address or network (CIDR)"),
    ("gw1.example", "'gw1.example' is not an IPv4 or IPv6 address or network (CIDR)"),
    ("10.0.0.5/24", "'10.0.0.5/24' has host bits set: write the host as 10.0.0.5 or the network as 10.0.0.0/24"),
    ("fe80::1%eth0", "has a zone index"),
    ("", "must be an IPv4 or IPv6 address or network (CIDR), got ''"),
    (10, "got 10"),
    (None, "got null"),
])
def test_a_bad_source_names_the_entry_and_field(source: Any, message: str) -> None:
    error = errors_of([models(sources=["10.20.0.10", source])])
    assert "firewall_restricted_tcp_ports: entry 'models': field 'sources': " in error
    assert message in error


def test_a_bad_ssh_source_names_the_variable() -> None:
    assert "firewall_ssh_sources: '10.1.1.1/33' is not" in errors_of(ssh_sources=["10.1.1.1/33"])


def test_sources_must_be_a_list() -> None:
    assert "field 'sources': must be a list of addresses or networks, got '10.0.0.1'" in errors_of(
        [models(sources="10.0.0.1")])


# --- entries -----------------------------------------------------------------

def test_every_error_of_a_run_is_reported_at_once() -> None:
    error = errors_of([models(ports=[0]), {"name": "metrics", "ports": [9100], "sources": ["x"]}],
                      open_tcp_ports=[-1], ssh_sources=["y"])
    assert error.startswith("firewall: 4 error(s):")
    for part in ("entry 'models': field 'ports'", "entry 'metrics': field 'sources'",
                 "firewall_open_tcp_ports:", "firewall_ssh_sources:"):
        assert part in error


def test_an_unknown_field_suggests_the_near_miss() -> None:
    error = errors_of([{"name": "models", "ports": [8101], "sourcse": GATEWAYS}])
    assert "entry 'models': field 'sourcse': unknown field (did you mean 'sources'?)" in error
    assert "entry 'models': field 'sources': is required" in error


def test_an_entry_without_a_valid_name_is_named_by_position() -> None:
    error = errors_of([models(), models(name="Models")])
    assert "firewall_restricted_tcp_ports[1]: field 'name': must match" in error


def test_names_are_unique() -> None:
    error = errors_of([models(), models(ports=[9100])])
    assert "entry 'models': field 'name': is used by another entry" in error


@pytest.mark.parametrize("entry", ["models", None, ["models"]])
def test_an_entry_is_a_mapping(entry: Any) -> None:
    assert "firewall_restricted_tcp_ports[0]: must be a mapping with name, ports and sources" in errors_of([entry])


def test_restricted_must_be_a_list() -> None:
    assert "firewall_restricted_tcp_ports: must be a list" in errors_of({"name": "models"})


def test_an_entry_without_ports_adds_nothing() -> None:
    result = plan([models(ports=[]), {"name": "metrics", "ports": [9100], "sources": []}])
    assert [entry["name"] for entry in result["restricted"]] == ["metrics"]
    assert result["restricted_ports"] == ["9100"]


def test_one_port_in_two_entries_is_counted_once() -> None:
    result = plan([models(ports=[8101]), {"name": "metrics", "ports": [8101, 9100], "sources": ["10.9.0.1"]}])
    assert result["restricted_ports"] == ["8101", "9100"]


# --- the controller's connection ---------------------------------------------

@pytest.mark.parametrize(("ssh_client", "expected"), [
    ("10.0.0.5 51234 22", {"family": "ip", "address": "10.0.0.5", "port": 22}),
    ("2001:db8::7 51234 2222", {"family": "ip6", "address": "2001:db8::7", "port": 2222}),
    ("::ffff:10.0.0.5 51234 22", {"family": "ip", "address": "10.0.0.5", "port": 22}),
    ("fe80::1%eth0 51234 22", {"family": "ip6", "address": "fe80::1", "port": 22}),
    ("", None),
    ("10.0.0.5 51234", None),
    ("not-an-address 1 22", None),
    ("10.0.0.5 51234 99999", None),
    (None, None),
])
def test_the_controller_address_comes_from_ssh_client(ssh_client: Any, expected: Any) -> None:
    assert plan(ssh_client=ssh_client)["controller"] == expected


# --- inputs from the inventory -----------------------------------------------

REGISTRY = [
    {"name": "chat-small", "hosts": ["gpu1", "gpu2"], "port": 8101, "upstream": "llm_chat_small"},
    {"name": "chat-large", "hosts": ["gpu1"], "port": 8102, "upstream": "llm_chat_large"},
    {"name": "embed-small", "hosts": ["gpu2"], "port": 8103, "upstream": "llm_embed_small"},
]


@pytest.mark.parametrize(("host", "ports"), [("gpu1", [8101, 8102]), ("gpu2", [8101, 8103]), ("gw1", [])])
def test_the_registry_ports_of_a_host(host: str, ports: list[int]) -> None:
    assert fw.firewall_registry_ports(REGISTRY, host) == ports


def test_raw_llm_models_are_refused() -> None:
    raw = [{"name": "chat-small", "hosts": ["llm_gpu_hosts"], "port": 8101}]
    with pytest.raises(AnsibleFilterError, match="expects llm_registry"):
        fw.firewall_registry_ports(raw, "gpu1")


def test_host_addresses_prefer_llm_private_address() -> None:
    hostvars = {
        "gw1": {"llm_private_address": "10.20.0.10", "ansible_facts": {"default_ipv4": {"address": "203.0.113.5"}}},
        "gw2": {"ansible_facts": {"default_ipv4": {"address": "10.20.0.11"}}},
        "gw3": {"llm_private_address": "", "ansible_facts": {"default_ipv4": {"address": "10.20.0.12"}}},
    }
    assert fw.firewall_host_addresses(["gw1", "gw2", "gw3"], hostvars) == ["10.20.0.10", "10.20.0.11", "10.20.0.12"]


def test_a_host_without_address_is_an_error_that_names_it() -> None:
    hostvars = {"gw1": {"ansible_facts": {}}, "gw2": {"llm_private_address": "gw2.lan"}}
    with pytest.raises(AnsibleFilterError) as info:
        fw.firewall_host_addresses(["gw1", "gw2", "gw9"], hostvars)
    message = str(info.value)
    assert "host 'gw1': has no address" in message
    assert "host 'gw2': llm_private_address 'gw2.lan' is not an IP address" in message
    assert "host 'gw9': not found in hostvars" in message


def test_no_gateways_no_addresses() -> None:
    assert fw.firewall_host_addresses([], {}) == []


# --- the ruleset the role writes ----------------------------------------------

def render(result: dict[str, Any], allow_icmp: bool = True) -> str:
    variables = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    # trim_blocks as Ansible renders templates.
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                     trim_blocks=True)
    environment.filters["comment"] = lambda text: f"# {text}"
    text = (ROLE / "templates" / "llm-firewall.nft.j2").read_text()
    return environment.from_string(text).render(
        ansible_managed="Ansible managed", __firewall_plan=result, firewall_allow_icmp=allow_icmp,
        __firewall_table=variables["__firewall_table"], __firewall_unit=variables["__firewall_unit"])


def rules(text: str) -> list[str]:
    """The ruleset's statements without comments or blank lines, whitespace collapsed."""
    lines = [re.sub(r"\s+", " ", line.split("#")[0]).strip() for line in text.splitlines()]
    return [line for line in lines if line]


def gpu_ruleset(**settings: Any) -> list[str]:
    result = plan([models(sources=[*GATEWAYS, "2001:db8::9"]), {"name": "metrics", "ports": [9100],
                                                                  "sources": ["10.9.0.0/24"]}], **settings)
    return rules(render(result))


def test_the_table_is_replaced_alone_never_the_ruleset() -> None:
    lines = gpu_ruleset()
    assert lines[:3] == ["table inet llm_firewall", "delete table inet llm_firewall", "table inet llm_firewall {"]
    assert not any("flush" in line for line in lines)


def test_input_drops_by_default_and_admits_established_first() -> None:
    lines = gpu_ruleset()
    start = lines.index("chain input {")
    assert lines[start + 1] == "type filter hook input priority filter; policy drop;"
    assert lines[start + 2] == "ct state established,related accept"
    assert 'iif "lo" accept' in lines


def test_input_admits_each_restricted_entry_from_its_sources_only() -> None:
    lines = gpu_ruleset()
    assert 'ip saddr { 10.20.0.10, 10.20.0.11 } tcp dport { 8101, 8102 } accept comment "models"' in lines
    assert 'ip6 saddr 2001:db8::9 tcp dport { 8101, 8102 } accept comment "models"' in lines
    assert 'ip saddr 10.9.0.0/24 tcp dport 9100 accept comment "metrics"' in lines
    assert not [line for line in lines if "dport" in line and "8101" in line and "saddr" not in line
                and "ct original" not in line]


def test_ssh_from_its_sources_and_the_controller() -> None:
    lines = gpu_ruleset(ssh_sources=["192.0.2.0/24"], ssh_client="198.51.100.7 40000 22")
    assert 'ip saddr 192.0.2.0/24 tcp dport 22 accept comment "ssh"' in lines
    assert 'ip saddr 198.51.100.7 tcp dport 22 accept comment "ansible controller"' in lines
    assert not any(line.startswith("ip6 saddr") and "dport 22" in line for line in lines)


def test_no_controller_rule_without_ssh() -> None:
    assert not any("ansible controller" in line for line in gpu_ruleset())


def test_forward_enforces_restricted_ports_on_dnat_only() -> None:
    lines = gpu_ruleset()
    start = lines.index("chain forward {")
    forward = lines[start + 1:]
    assert forward[0] == "type filter hook forward priority filter; policy accept;"
    assert ('ct status dnat meta l4proto tcp ct original ip saddr { 10.20.0.10, 10.20.0.11 } '
            'ct original proto-dst { 8101, 8102 } accept comment "models"') in forward
    drop = [line for line in forward if line.endswith('drop comment "restricted"')]
    assert drop == ['ct status dnat meta l4proto tcp ct original proto-dst { 8101, 8102, 9100 } counter drop '
                    'comment "restricted"']
    # Every forward rule matches DNATed connections only: the rest keeps Docker's verdict.
    assert all(line.startswith("ct status dnat") for line in forward[1:] if line != "}")


def test_a_gateway_has_open_ports_and_no_forward_chain() -> None:
    lines = rules(render(plan(open_tcp_ports=[443, 80])))
    assert 'tcp dport { 80, 443 } accept comment "open"' in lines
    assert "chain forward {" not in lines


def test_ping_is_optional_but_ipv6_discovery_is_not() -> None:
    without = rules(render(plan(), allow_icmp=False))
    assert not any("echo-request" in line for line in without)
    assert any("nd-neighbor-solicit" in line and "packet-too-big" in line for line in without)
    assert sum("echo-request" in line for line in rules(render(plan()))) == 2

"""Filters of the firewall role: its inputs checked and shaped into what the ruleset template renders.

The checks live here, in Python with unit tests, because a firewall mistake is silent: a
typo'd address or a port listed as both open and restricted loads fine and leaves a model
port open to everyone (or the gateways locked out). Every error of a run is reported at
once, naming the variable, the entry and the field.

Filters:
    firewall_plan(restricted, ssh_port=, ssh_sources=, open_tcp_ports=, ssh_client=)
        -> {ssh, controller, open_ports, restricted, restricted_ports} for the template
    firewall_registry_ports(llm_registry, inventory_hostname) -> the model ports of one host
    firewall_host_addresses(hosts, hostvars)                  -> the private addresses of hosts
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

from ansible.errors import AnsibleFilterError

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

PORT_MIN, PORT_MAX = 1, 65535
PORT_RANGE_RE = re.compile(r"^([0-9]{1,5})-([0-9]{1,5})$")
# Names end up in nft comments and in error messages; keep them plain.
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
ENTRY_FIELDS = ("name", "ports", "sources")
# nft's address families as its rules spell them.
FAMILIES = {4: "ip", 6: "ip6"}

RESTRICTED = "firewall_restricted_tcp_ports"
OPEN = "firewall_open_tcp_ports"
SSH_PORT = "firewall_ssh_port"
SSH_SOURCES = "firewall_ssh_sources"


class _FieldError(ValueError):
    """A value is wrong; the caller adds which variable, entry and field."""


def _describe(value: Any) -> str:
    """Show a bad value the way it was written, with its YAML type when that is the surprise."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _port_bound(text: str) -> int:
    number = int(text)
    if not PORT_MIN <= number <= PORT_MAX:
        raise _FieldError(f"port {number} is outside {PORT_MIN}-{PORT_MAX}")
    return number


def _check_port(value: Any) -> tuple[int, int]:
    """One port or an inclusive 'low-high' range, as (low, high).

    Digit strings are taken too: a port computed by a template may arrive as text.
    YAML's true/false are ints to Python and are refused: a port of `true` is a typo.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if not PORT_MIN <= value <= PORT_MAX:
            raise _FieldError(f"port {value} is outside {PORT_MIN}-{PORT_MAX}")
        return value, value
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            number = _port_bound(text)
            return number, number
        match = PORT_RANGE_RE.match(text)
        if match:
            low, high = _port_bound(match.group(1)), _port_bound(match.group(2))
            if low > high:
                raise _FieldError(f"range {value!r} runs backwards (write '{high}-{low}')")
            return low, high
    raise _FieldError(f"must be a port from {PORT_MIN} to {PORT_MAX} or a range 'low-high', got {_describe(value)}")


def _check_ports(value: Any) -> list[tuple[int, int]]:
    """A list of ports and ranges as sorted disjoint ranges.

    nft refuses an interval set whose elements overlap, so overlaps are merged here;
    neighbours are not (8101, 8102 stay two ports, as the inventory lists them).
    """
    if not isinstance(value, list):
        raise _FieldError(f"must be a list of ports, got {_describe(value)}")
    errors, ranges = [], []
    for item in value:
        try:
            ranges.append(_check_port(item))
        except _FieldError as exc:
            errors.append(str(exc))
    if errors:
        raise _FieldError("; ".join(errors))
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))
    return merged


def _check_source(value: Any) -> Network:
    """An IPv4/IPv6 address or network in CIDR notation.

    A network with host bits set (10.0.0.5/24) is refused rather than widened: it is
    usually an interface address pasted with its prefix, and the reader cannot tell
    whether one host or the whole network was meant.
    """
    if not isinstance(value, str) or not value.strip():
        raise _FieldError(f"must be an IPv4 or IPv6 address or network (CIDR), got {_describe(value)}")
    text = value.strip()
    if "%" in text:
        raise _FieldError(f"{text!r} has a zone index; a firewall source cannot be scoped to an interface")
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        wide = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _FieldError(f"{text!r} is not an IPv4 or IPv6 address or network (CIDR)") from None
    raise _FieldError(f"{text!r} has host bits set: write the host as {text.split('/')[0]} or the network as {wide}")


def _check_sources(value: Any) -> dict[str, list[str]]:
    """Sources per nft family, sorted, without duplicates or networks another one covers.

    nft refuses overlapping elements in a set. Neighbours are not merged into a wider
    network, so the ruleset names the same hosts as the inventory.
    """
    if not isinstance(value, list):
        raise _FieldError(f"must be a list of addresses or networks, got {_describe(value)}")
    errors: list[str] = []
    networks: dict[int, list[Network]] = {4: [], 6: []}
    for item in value:
        try:
            network = _check_source(item)
        except _FieldError as exc:
            errors.append(str(exc))
            continue
        networks[network.version].append(network)
    if errors:
        raise _FieldError("; ".join(errors))
    return {FAMILIES[version]: [_render_network(n) for n in _without_covered(found)]
            for version, found in networks.items()}


def _without_covered(networks: list[Network]) -> list[Network]:
    """Sorted by address then width, a network is covered only by an earlier kept one."""
    kept: list[Network] = []
    for network in sorted(set(networks), key=lambda n: (n.network_address, n.prefixlen)):
        if not any(network.subnet_of(wider) for wider in kept):  # type: ignore[arg-type]
            kept.append(network)
    return kept


def _render_network(network: Network) -> str:
    """A single host without its /32 or /128, so the ruleset reads like the inventory."""
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _render_ports(ranges: Iterable[tuple[int, int]]) -> list[str]:
    return [str(low) if low == high else f"{low}-{high}" for low, high in ranges]


def _overlap(first: list[tuple[int, int]], second: list[tuple[int, int]]) -> list[str]:
    """The ports two lists of ranges share, rendered, for error messages."""
    shared = []
    for low, high in first:
        for other_low, other_high in second:
            start, end = max(low, other_low), min(high, other_high)
            if start <= end:
                shared.append((start, end))
    return _render_ports(sorted(shared))


class _Errors:
    """Collects every error of a run, each naming its variable (and entry and field)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check(self, label: str, value: Any, check: Callable[[Any], Any]) -> Any:
        try:
            return check(value)
        except _FieldError as exc:
            self.messages.append(f"{label}: {exc}")
            return None

    def raise_any(self) -> None:
        if self.messages:
            raise AnsibleFilterError(f"firewall: {len(self.messages)} error(s):\n"
                                     + "\n".join(f"  {m}" for m in self.messages))


def _entry_label(index: int, raw: Any) -> str:
    """Name an entry by its name when it has a valid one, else by its position."""
    if isinstance(raw, Mapping) and isinstance(raw.get("name"), str) and NAME_RE.match(raw["name"]):
        return f"{RESTRICTED}: entry '{raw['name']}'"
    return f"{RESTRICTED}[{index}]"


def _check_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise _FieldError(f"must match {NAME_RE.pattern} (lower case, digits, '_', '-'), got {_describe(value)}")
    return value


def _restricted_entry(index: int, raw: Any, errors: _Errors) -> dict[str, Any] | None:
    """One {name, ports, sources} entry checked field by field; None when any field is wrong."""
    label = _entry_label(index, raw)
    if not isinstance(raw, Mapping):
        errors.messages.append(f"{label}: must be a mapping with name, ports and sources, got {_describe(raw)}")
        return None
    before = len(errors.messages)
    for key in raw:
        if key not in ENTRY_FIELDS:
            close = difflib.get_close_matches(str(key), ENTRY_FIELDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known fields: {', '.join(ENTRY_FIELDS)}"
            errors.messages.append(f"{label}: field '{key}': unknown field ({hint})")
    for key in ENTRY_FIELDS:
        if key not in raw:
            errors.messages.append(f"{label}: field '{key}': is required")
    entry = {
        "name": errors.check(f"{label}: field 'name'", raw["name"], _check_name) if "name" in raw else None,
        "ports": errors.check(f"{label}: field 'ports'", raw["ports"], _check_ports) if "ports" in raw else None,
        "sources": errors.check(f"{label}: field 'sources'", raw["sources"], _check_sources)
        if "sources" in raw else None,
    }
    return entry if len(errors.messages) == before else None


def parse_ssh_client(ssh_client: Any) -> dict[str, Any] | None:
    """The controller's address and the server port from sshd's SSH_CLIENT ("addr port port").

    None when there is no SSH connection (docker exec, local) or the value is unusable:
    established/related still keeps a live connection, this rule only adds a margin.
    An IPv4 client of a dual-stack sshd shows as ::ffff:a.b.c.d, which nft sees as IPv4.
    """
    if not isinstance(ssh_client, str):
        return None
    words = ssh_client.split()
    if len(words) != 3 or not words[2].isdigit():
        return None
    try:
        address = ipaddress.ip_address(words[0].split("%")[0])
        port = _port_bound(words[2])
    except (ValueError, _FieldError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return {"family": FAMILIES[address.version], "address": str(address), "port": port}


def firewall_plan(restricted: Any, ssh_port: Any = 22, ssh_sources: Any = None, open_tcp_ports: Any = None,
                  ssh_client: Any = None) -> dict[str, Any]:
    """Check every input of the role and return the data the ruleset template renders.

    Ports are strings ("80", "8000-8010") in sorted disjoint ranges; sources are
    {"ip": [...], "ip6": [...]}, collapsed. A port may be SSH, open or restricted, never two
    of these: the wider rule would silently win over the narrower one.
    """
    errors = _Errors()
    ssh = errors.check(SSH_PORT, ssh_port, _check_port)
    if ssh is not None and ssh[0] != ssh[1]:
        errors.messages.append(f"{SSH_PORT}: must be one port, got {_describe(ssh_port)}")
    ssh_from = errors.check(SSH_SOURCES, [] if ssh_sources is None else ssh_sources, _check_sources)
    open_ports = errors.check(OPEN, [] if open_tcp_ports is None else open_tcp_ports, _check_ports)

    entries: list[dict[str, Any]] = []
    if not isinstance(restricted, list):
        errors.messages.append(f"{RESTRICTED}: must be a list of {{name, ports, sources}}, got {_describe(restricted)}")
    else:
        checked = [_restricted_entry(index, raw, errors) for index, raw in enumerate(restricted)]
        entries = [entry for entry in checked if entry is not None]
    seen: set[str] = set()
    for entry in entries:
        if entry["name"] in seen:
            errors.messages.append(f"{RESTRICTED}: entry '{entry['name']}': field 'name': is used by another entry")
        seen.add(entry["name"])
        label = f"{RESTRICTED}: entry '{entry['name']}': field 'ports'"
        if ssh is not None and _overlap(entry["ports"], [ssh]):
            errors.messages.append(f"{label}: port {ssh[0]} is the SSH port ({SSH_PORT}); "
                                   f"list extra SSH sources in {SSH_SOURCES}")
        if open_ports and _overlap(entry["ports"], open_ports):
            errors.messages.append(f"{label}: {', '.join(_overlap(entry['ports'], open_ports))} also in {OPEN}, "
                                   f"which would open them to everyone")
    if ssh is not None and open_ports and _overlap(open_ports, [ssh]):
        errors.messages.append(f"{OPEN}: port {ssh[0]} is the SSH port ({SSH_PORT}); "
                               f"open it to everyone with {SSH_SOURCES}: ['0.0.0.0/0', '::/0']")
    errors.raise_any()

    all_restricted = _check_ports([f"{low}-{high}" for entry in entries for low, high in entry["ports"]])
    return {
        "ssh": {"port": ssh[0], "sources": ssh_from},
        "controller": parse_ssh_client(ssh_client),
        "open_ports": _render_ports(open_ports),
        "restricted": [{"name": e["name"], "ports": _render_ports(e["ports"]), "sources": e["sources"]}
                       for e in entries if e["ports"]],
        "restricted_ports": _render_ports(all_restricted),
    }


def firewall_registry_ports(registry: Any, inventory_hostname: Any) -> list[int]:
    """The ports of the registry's models that run on one host, sorted, for a restricted entry.

    Takes the normalised registry (llm_registry), whose `hosts` have their groups expanded;
    raw llm_models still name groups, and their ports would silently be missed.
    """
    if not isinstance(registry, list) or not all(
        isinstance(m, Mapping) and {"hosts", "port", "upstream"} <= set(m) for m in registry
    ):
        raise AnsibleFilterError("firewall_registry_ports: expects llm_registry (the model_registry role's "
                                 "normalised list), not raw llm_models")
    return sorted({int(m["port"]) for m in registry if inventory_hostname in m["hosts"]})


def firewall_host_addresses(hosts: Any, hostvars: Mapping[str, Any]) -> list[str]:
    """The address each host's traffic comes from on the private network, in host order.

    The same rule as the registry's upstreams: llm_private_address when set, else the
    host's default IPv4 address from its facts. A host with neither is an error, not a
    silent gap that would lock that gateway out.
    """
    if isinstance(hosts, str) or not isinstance(hosts, Iterable):
        raise AnsibleFilterError(f"firewall_host_addresses: expects a list of inventory hosts, got {_describe(hosts)}")
    addresses, errors = [], []
    for host in hosts:
        if host not in hostvars:
            errors.append(f"host '{host}': not found in hostvars")
            continue
        host_vars = hostvars[host]
        explicit = host_vars.get("llm_private_address")
        facts = host_vars.get("ansible_facts") or {}
        default_ipv4 = (facts.get("default_ipv4") or {}) if isinstance(facts, Mapping) else {}
        address = explicit if explicit not in (None, "") else default_ipv4.get("address")
        if not address:
            errors.append(f"host '{host}': has no address: gather its facts in this run "
                          f"or set llm_private_address for it")
            continue
        try:
            addresses.append(str(ipaddress.ip_address(str(address))))
        except ValueError:
            errors.append(f"host '{host}': llm_private_address {_describe(address)} is not an IP address")
    if errors:
        raise AnsibleFilterError("firewall_host_addresses: " + "; ".join(errors))
    return addresses


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        """Map filter names to functions."""
        return {
            "firewall_plan": firewall_plan,
            "firewall_registry_ports": firewall_registry_ports,
            "firewall_host_addresses": firewall_host_addresses,
        }

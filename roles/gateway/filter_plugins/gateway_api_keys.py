"""Client API keys: validated, hashed and grouped into the limit classes nginx counts them in.

`llm_api_keys` (vault-encrypted inventory) lists each key with an id, the models it may use,
optional limits and an expiry. The gateway keeps only a SHA-256 of each key: the table this
filter returns holds hashes and ids, never a key, and no error message quotes a key.

nginx counts rate and concurrency per gateway and per zone, and a zone has one rate; a
burst belongs to the directive. So keys with the same (rate, burst) share one rate zone and
keys with the same concurrency cap share one connection zone. Limits in the inventory are
fleet-wide: each gateway enforces its share, rounded up (roles/gateway/README.md, "Rate limits").
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # unit tests without Ansible
    class AnsibleFilterError(Exception):  # type: ignore[no-redef]
        """Stand-in so the plugin imports without Ansible."""

FIELDS = ("id", "key", "models", "expires", "rate_per_minute", "burst", "concurrency")
LIMITS = ("rate_per_minute", "burst", "concurrency")
# Appears in logs, in nginx map keys and in zone keys: no spaces, quotes or braces.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# RFC 6750 b64token: what may follow "Bearer ".
KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
KEY_MIN_LENGTH = 24
KEY_MAX_LENGTH = 256


def _expiry(value: Any) -> int:
    """Seconds since the epoch of a date (the key ends at its midnight UTC) or an ISO date-time."""
    if isinstance(value, datetime.datetime):
        moment = value
    elif isinstance(value, datetime.date):
        moment = datetime.datetime.combine(value, datetime.time())
    elif isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"must be a date (2027-01-31) or an ISO date-time, got {value!r}") from None
    else:
        raise ValueError(f"must be a date (2027-01-31) or an ISO date-time, got {type(value).__name__}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp())


# nginx's limit_conn takes at most 65535.
MAX_CONCURRENCY = 65535


def _limit(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number, 0 for no limit, got {value!r}")
    if field == "concurrency" and value > MAX_CONCURRENCY:
        raise ValueError(f"must be at most {MAX_CONCURRENCY} (nginx's limit), got {value}")
    return value


def _share(value: int, gateways: int) -> int:
    """One gateway's share of a fleet-wide limit, rounded up so no key is cut to nothing."""
    return math.ceil(value / gateways) if value else 0


def llm_fleet_share(value: Any, gateways: Any) -> int:
    """The filter of `_share`, for the limits that are not per key."""
    return _share(int(value), max(1, int(gateways)))


def _models(value: Any, routes: Mapping[str, Any]) -> list[str] | None:
    """Canonical model names a key may use (aliases resolved); None for every model."""
    if value == "all":
        return None
    if isinstance(value, str) or not isinstance(value, list) or not value:
        raise ValueError(f"must be \"all\" or a non-empty list of model names or aliases, got {value!r}")
    models = []
    for name in value:
        if not isinstance(name, str) or name not in routes:
            close = difflib.get_close_matches(str(name), sorted(routes), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown model {name!r}{hint}")
        models.append(routes[name]["id"])
    return sorted(set(models))


def _check_key(value: Any) -> str:
    """A key's own text is never echoed: only what is wrong with it."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if not KEY_MIN_LENGTH <= len(value) <= KEY_MAX_LENGTH:
        raise ValueError(f"must be {KEY_MIN_LENGTH} to {KEY_MAX_LENGTH} characters long (it has {len(value)})")
    if not KEY_PATTERN.fullmatch(value):
        raise ValueError("may hold only letters, digits and . _ ~ + / - (then = padding)")
    return value


def _label(index: int, raw: Any) -> str:
    key_id = raw.get("id") if isinstance(raw, Mapping) else None
    return f"key {key_id!r}" if isinstance(key_id, str) and key_id else f"key #{index + 1}"


def _entry(index: int, raw: Any, routes: Mapping[str, Any], defaults: Mapping[str, int],
           gateways: int, errors: list[str]) -> dict[str, Any] | None:
    label = _label(index, raw)
    if not isinstance(raw, Mapping):
        errors.append(f"llm_api_keys: {label}: must be a mapping with id, key and models")
        return None
    before = len(errors)
    for field in sorted(set(raw) - set(FIELDS)):
        close = difflib.get_close_matches(field, FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        errors.append(f"llm_api_keys: {label}: unknown field {field!r}{hint}")
    for field in ("id", "key", "models"):
        if field not in raw:
            errors.append(f"llm_api_keys: {label}: field {field!r} is required")

    def check(field: str, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(raw[field], *args)
        except ValueError as exc:
            errors.append(f"llm_api_keys: {label}: field {field!r}: {exc}")
            return None

    key_id = raw.get("id")
    if "id" in raw and not (isinstance(key_id, str) and ID_PATTERN.fullmatch(key_id)):
        errors.append(f"llm_api_keys: {label}: field 'id': must be 1 to 64 letters, digits, '.', '_' or '-', "
                      f"starting with a letter or digit, got {key_id!r}")
    key = check("key", _check_key) if "key" in raw else None
    models = check("models", _models, routes) if "models" in raw else None
    expires = check("expires", _expiry) if raw.get("expires") not in (None, "") else None
    limits = {field: check(field, _limit, field) if field in raw else defaults[field] for field in LIMITS}
    if len(errors) > before:
        return None
    return {
        "id": key_id,
        "sha256": hashlib.sha256(key.encode("utf-8")).hexdigest(),
        "models": models,
        "expires": expires,
        **{field: _share(value, gateways) for field, value in limits.items()},
    }


def llm_gateway_api_keys(keys: Any, routes: Mapping[str, Any], defaults: Mapping[str, Any],
                         gateways: Any) -> dict[str, Any]:
    """The gateway's key table: hashed keys, per-model rows and the limit classes.

    `routes` is the gateway's route table (every served name and alias -> its model's `id`);
    `defaults` the fleet-wide limits of keys that set none; `gateways` how many gateways
    share the fleet-wide limits. Every error of every key is reported in one run.
    """
    if keys is None:
        keys = []
    if not isinstance(keys, list):
        raise AnsibleFilterError("llm_api_keys: must be a list of keys")
    count = int(gateways)
    if count < 1:
        raise AnsibleFilterError("llm_gateway_api_keys: at least one gateway must share the limits")
    errors: list[str] = []
    entries = [_entry(index, raw, routes, defaults, count, errors) for index, raw in enumerate(keys)]
    seen_ids: dict[str, int] = {}
    seen_hashes: dict[str, str] = {}
    for entry in filter(None, entries):
        if entry["id"] in seen_ids:
            errors.append(f"llm_api_keys: key {entry['id']!r}: the id is used twice")
        seen_ids[entry["id"]] = 1
        if entry["sha256"] in seen_hashes:
            errors.append(f"llm_api_keys: keys {seen_hashes[entry['sha256']]!r} and {entry['id']!r} "
                          "have the same key")
        seen_hashes[entry["sha256"]] = entry["id"]
    if errors:
        raise AnsibleFilterError("\n".join(errors))
    return _table([entry for entry in entries if entry is not None])


def _table(entries: list[dict[str, Any]]) -> dict[str, Any]:
    rate_classes: dict[tuple[int, int], dict[str, Any]] = {}
    conn_classes: dict[int, dict[str, Any]] = {}
    for entry in entries:
        entry["rate_class"] = entry["conn_class"] = None
        if entry["rate_per_minute"]:
            shape = (entry["rate_per_minute"], entry["burst"])
            rate_class = rate_classes.setdefault(shape, {
                "name": f"llm_key_rate_{len(rate_classes)}", "per_minute": shape[0], "burst": shape[1], "keys": []})
            rate_class["keys"].append(entry["id"])
            entry["rate_class"] = rate_class["name"]
        if entry["concurrency"]:
            conn_class = conn_classes.setdefault(entry["concurrency"], {
                "name": f"llm_key_conn_{len(conn_classes)}", "limit": entry["concurrency"], "keys": []})
            conn_class["keys"].append(entry["id"])
            entry["conn_class"] = conn_class["name"]
    return {
        "keys": entries,
        # nginx's map of known keys: SHA-256 -> "<id> <expires>" (0: never).
        "hash_rows": [(e["sha256"], f"{e['id']} {e['expires'] or 0}") for e in entries],
        # What router.js needs (models listed, Retry-After): no key, no hash.
        "by_id": {e["id"]: {"models": e["models"], "rate_per_minute": e["rate_per_minute"]} for e in entries},
        "model_rows": sorted((e["id"], model) for e in entries if e["models"] is not None for model in e["models"]),
        "all_models": sorted(e["id"] for e in entries if e["models"] is None),
        "rate_classes": list(rate_classes.values()),
        "conn_classes": list(conn_classes.values()),
    }


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        """Map filter names to functions."""
        return {"llm_gateway_api_keys": llm_gateway_api_keys, "llm_fleet_share": llm_fleet_share}

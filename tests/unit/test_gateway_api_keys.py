"""The gateway's key table: validation that names the key and never quotes it, hashes, limit classes."""

from __future__ import annotations

import datetime
import hashlib

import pytest
from gateway_api_keys import AnsibleFilterError, llm_fleet_share, llm_gateway_api_keys

ROUTES = {"chat-small": {"id": "chat-small"}, "gpt-4o-mini": {"id": "chat-small"}, "embed": {"id": "embed"}}
DEFAULTS = {"rate_per_minute": 600, "burst": 100, "concurrency": 64}
KEY_A = "sk-" + "a" * 40
KEY_B = "sk-" + "b" * 40


def table(keys: list, gateways: int = 1) -> dict:
    return llm_gateway_api_keys(keys, ROUTES, DEFAULTS, gateways)


def errors_of(keys: list) -> str:
    with pytest.raises(AnsibleFilterError) as failure:
        table(keys)
    return str(failure.value)


def test_keys_are_hashed_and_aliases_resolved() -> None:
    result = table([{"id": "team-a", "key": KEY_A, "models": ["gpt-4o-mini"]},
                    {"id": "ops", "key": KEY_B, "models": "all", "expires": "2027-01-31"}])
    assert KEY_A not in repr(result) and KEY_B not in repr(result)
    expires = int(datetime.datetime(2027, 1, 31, tzinfo=datetime.timezone.utc).timestamp())
    assert dict(result["hash_rows"]) == {hashlib.sha256(KEY_A.encode()).hexdigest(): "team-a 0",
                                         hashlib.sha256(KEY_B.encode()).hexdigest(): f"ops {expires}"}
    assert result["by_id"]["team-a"]["models"] == ["chat-small"]
    assert result["by_id"]["ops"]["models"] is None
    assert result["model_rows"] == [("team-a", "chat-small")]
    assert result["all_models"] == ["ops"]


def test_keys_of_the_same_limits_share_a_zone_and_limits_are_split_between_gateways() -> None:
    result = table([{"id": "a", "key": KEY_A, "models": "all"},
                    {"id": "b", "key": KEY_B, "models": "all", "rate_per_minute": 10, "burst": 0,
                     "concurrency": 0},
                    {"id": "c", "key": "sk-" + "c" * 40, "models": "all"}], gateways=3)
    assert [(c["per_minute"], c["burst"], c["keys"]) for c in result["rate_classes"]] == \
        [(200, 34, ["a", "c"]), (4, 0, ["b"])]
    assert [(c["limit"], c["keys"]) for c in result["conn_classes"]] == [(22, ["a", "c"])]


def test_every_error_names_the_key_and_the_field_and_never_the_key() -> None:
    secret = "short-secret"
    message = errors_of([
        {"id": "team a", "key": KEY_A, "models": "all"},
        {"id": "weak", "key": secret, "models": "all"},
        {"id": "typo", "key": KEY_B, "models": ["chat-smal"]},
        {"id": "when", "key": "sk-" + "d" * 40, "models": "all", "expires": "next week"},
        {"id": "extra", "key": "sk-" + "e" * 40, "models": "all", "rate": 5},
        {"key": "sk-" + "f" * 40, "models": "all"},
    ])
    assert "key 'team a': field 'id'" in message
    assert "key 'weak': field 'key': must be 24 to 256 characters long" in message
    assert "key 'typo': field 'models': unknown model 'chat-smal' (did you mean 'chat-small'?)" in message
    assert "key 'when': field 'expires'" in message
    assert "key 'extra': unknown field 'rate'" in message
    assert "key #6: field 'id' is required" in message
    assert secret not in message and KEY_A not in message and KEY_B not in message


def test_duplicate_ids_and_duplicate_keys_are_refused() -> None:
    message = errors_of([{"id": "a", "key": KEY_A, "models": "all"}, {"id": "a", "key": KEY_B, "models": "all"},
                         {"id": "c", "key": KEY_A, "models": "all"}])
    assert "key 'a': the id is used twice" in message
    assert "keys 'a' and 'c' have the same key" in message


@pytest.mark.parametrize("models", [[], "some", None, ["embed", 3]])
def test_models_must_be_all_or_a_list_of_names(models: object) -> None:
    assert "field 'models'" in errors_of([{"id": "a", "key": KEY_A, "models": models}])


def test_a_key_with_characters_bearer_cannot_carry_is_refused() -> None:
    assert "may hold only" in errors_of([{"id": "a", "key": "sk-" + "a" * 30 + " x", "models": "all"}])


def test_fleet_share_rounds_up_and_keeps_zero() -> None:
    assert llm_fleet_share(10, 3) == 4
    assert llm_fleet_share(0, 3) == 0
    assert llm_fleet_share("6000", "2") == 3000

"""The gateway's pattern and name-table builder (roles/gateway/filter_plugins/gateway_model_patterns.py).

What the patterns match is tested through a real nginx in tests/nginx; here: the text nginx
gets, and the rows of the name table.
"""

from __future__ import annotations

import re

import gateway_model_patterns as plugin
import llm_registry
import pytest
from ansible.errors import AnsibleFilterError

ENDPOINTS = llm_registry.llm_api_endpoints()


@pytest.mark.parametrize("depth", [1, 16, plugin.MAX_DEPTH])
def test_patterns_fit_one_nginx_config_word(depth: int) -> None:
    """nginx reads no quoted parameter over 4094 characters (its 4 KB buffer holds the quotes)."""
    for text in plugin.llm_model_patterns(depth).values():
        assert len(text) <= plugin.NGINX_PARAMETER_MAX


def test_patterns_survive_nginx_quoting() -> None:
    """Inside '...' nginx rewrites backslash-quote and double backslashes; none may occur."""
    for key, text in plugin.llm_model_patterns(16).items():
        assert "'" not in text, key
        assert not re.search(r"\\[\\'\"]", text), f"{key}: a sequence nginx's parser would rewrite"
        assert set(re.findall(r"\\(.)", text)) <= set("xAzu{}[]tnr"), key
        assert text.startswith("(?x)"), "extended mode: laid out on lines, with comments"
        assert "#" not in re.sub(r"#[^\n]*", "", text.replace("\\#", "")), key


def test_no_model_name_is_in_the_patterns() -> None:
    """The patterns are the same for every registry: the names live in the name table."""
    assert plugin.llm_model_patterns(8) == plugin.llm_model_patterns(8)
    for key, text in plugin.llm_model_patterns(8).items():
        assert text.count("(?<llm_name>") == 1, key


def test_first_is_anchored_and_the_others_search_for_the_key() -> None:
    patterns = plugin.llm_model_patterns(4)
    assert "\\A" in patterns["first"].split("\n")[1]
    for key in ("tail", "guard"):
        body = patterns[key].split("\n)\n", 1)[1]
        # The literal key first after the definitions: PCRE's vectorised search starts there.
        assert body.startswith('"model" (?<='), key
        assert "\\A" not in body


def test_nesting_is_bounded_without_recursion() -> None:
    """Group k+1 calls only group k: PCRE's stack stays small whatever the body."""
    definitions = plugin.llm_model_patterns(6)["tail"].split("\n)\n", 1)[0]
    for number, line in enumerate(definitions.splitlines()[1:], start=1):
        calls = {int(n) for n in re.findall(r"\(\?(\d+)\)", line)}
        assert all(call < number for call in calls), (number, line)


@pytest.mark.parametrize("depth", [0, plugin.MAX_DEPTH + 1, "16", True])
def test_depth_is_checked(depth: object) -> None:
    with pytest.raises(AnsibleFilterError, match="max_depth must be an integer from 1 to"):
        plugin.llm_model_patterns(depth)  # type: ignore[arg-type]


def routes() -> dict[str, object]:
    registry = llm_registry.llm_registry_normalize([
        {"name": "chat", "aliases": ["gpt-4o-mini"], "engine": "vllm", "source": "org/chat",
         "endpoints": ["chat", "tokenize"], "hosts": ["gpu"], "port": 8001},
        {"name": "embed", "engine": "infinity", "source": "org/embed", "hosts": ["gpu"], "port": 8002},
    ], {"all": ["gpu"]})
    return llm_registry.llm_gateway_routes(registry)


def test_route_table_has_one_row_per_path_and_name() -> None:
    table = plugin.llm_route_table(routes(), ENDPOINTS)
    assert table["rows"] == [
        ("/v1/chat/completions chat", "chat chat /_llm/llm_chat/v1/chat/completions"),
        ("/tokenize chat", "chat chat /_llm/llm_chat/tokenize"),
        ("/v1/chat/completions gpt-4o-mini", "gpt-4o-mini chat /_llm/llm_chat/v1/chat/completions"),
        ("/tokenize gpt-4o-mini", "gpt-4o-mini chat /_llm/llm_chat/tokenize"),
        ("/v1/embeddings embed", "embed embed /_llm/llm_embed/embeddings"),
        ("/v1/rerank embed", "embed embed /_llm/llm_embed/rerank"),
    ]


def test_route_table_hash_sizes_hold_long_keys_and_many_rows() -> None:
    many = {f"org-{i}/a-rather-long-model-name-{i:05d}": {"id": "m", "upstream": "llm_m", "endpoints": ["chat"],
                                                           "paths": {"chat": "/v1/chat/completions"}}
            for i in range(3000)}
    table = plugin.llm_route_table(many, ENDPOINTS)
    longest = max(len(key) for key, _ in table["rows"])
    assert table["hash_bucket_size"] % 64 == 0 and table["hash_bucket_size"] >= longest + 18
    assert table["hash_max_size"] >= 3000

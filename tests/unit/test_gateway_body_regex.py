"""The gateway's regex builder (roles/gateway/filter_plugins/gateway_body_regex.py).

What the regexes match is tested through a real nginx in test_gateway_router.py; here: the
text nginx gets, and the names nginx may route by itself.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from ansible.errors import AnsibleFilterError
from test_gateway_router import gateway_regex_plugin

plugin = gateway_regex_plugin()


@pytest.mark.parametrize("part", ["whole", "tail"])
@pytest.mark.parametrize("depth", [1, 16, plugin.MAX_DEPTH])
def test_regex_fits_one_nginx_config_word(part: str, depth: int) -> None:
    """nginx reads no config word over 4 KB (NGX_CONF_BUFFER); the line around it needs a little more."""
    assert len(plugin.llm_body_regex(part, depth)) < 4000


@pytest.mark.parametrize("part", ["whole", "tail"])
def test_regex_survives_nginx_quoting(part: str) -> None:
    """Inside '...' nginx rewrites backslash-quote and double backslashes; none may occur."""
    text = plugin.llm_body_regex(part, 16)
    assert "'" not in text
    assert not re.search(r"\\[\\'\"]", text), "a sequence nginx's parser would rewrite"
    assert set(re.findall(r"\\(.)", text)) <= set("xAzsu{}[].tnr"), "only escapes PCRE and nginx agree on"
    assert "(?<llm_top_model>" in text and text.count("(?<llm_top_model>") == 1


def test_whole_is_anchored_and_tail_is_a_search() -> None:
    assert plugin.llm_body_regex("whole", 4).startswith(r"\A")
    tail = plugin.llm_body_regex("tail", 4)
    assert r"\A" not in tail and tail.endswith(r"\z")
    # The literal key comes first after the definitions: PCRE's SIMD search starts there.
    assert re.search(r'\(\?\(DEFINE\).*\)"model"\(\?<=', tail)


@pytest.mark.parametrize(("args", "message"), [
    (("both", 16), "part must be 'whole' or 'tail'"),
    (("whole", 0), "max_depth must be an integer from 1 to 17"),
    (("tail", 18), "max_depth must be an integer from 1 to 17"),
    (("tail", "16"), "max_depth must be an integer from 1 to 17"),
])
def test_bad_arguments_are_named(args: tuple[Any, Any], message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=re.escape(message)):
        plugin.llm_body_regex(*args)


def test_regex_grows_with_depth_only() -> None:
    """The registry does not change the regex: names are checked by the maps and locations."""
    assert len(plugin.llm_body_regex("whole", 9)) - len(plugin.llm_body_regex("whole", 8)) < 250


ROUTES = {
    "chat-small": {"upstream": "llm_chat_small"},
    "gpt-4o-mini": {"upstream": "llm_chat_small"},
    "Mixed-Case": {"upstream": "llm_a"},
    "mixed-case": {"upstream": "llm_b"},
    "embed": {"upstream": "llm_embed"},
}


def test_fast_names_leave_case_only_twins_to_njs() -> None:
    assert plugin.llm_fast_route_names(ROUTES) == ["chat-small", "embed", "gpt-4o-mini"]


def test_fast_names_of_one_upstream() -> None:
    assert plugin.llm_fast_route_names(ROUTES, "llm_chat_small") == ["chat-small", "gpt-4o-mini"]
    assert plugin.llm_fast_route_names(ROUTES, "llm_a") == []

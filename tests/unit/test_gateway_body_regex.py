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


NAMES = ["chat-small", "Qwen/Qwen2.5-7B-Instruct", "qwen:7b.v1"]


@pytest.mark.parametrize("part", ["whole", "tail"])
@pytest.mark.parametrize("depth", [1, 16, plugin.MAX_DEPTH])
def test_regex_fits_one_nginx_config_word(part: str, depth: int) -> None:
    """nginx reads no quoted parameter over 4094 characters (its 4 KB buffer holds the quotes)."""
    assert len(plugin.llm_body_regex(part, depth, NAMES)) <= plugin.NGINX_PARAMETER_MAX


@pytest.mark.parametrize("part", ["whole", "tail"])
def test_regex_survives_nginx_quoting(part: str) -> None:
    """Inside '...' nginx rewrites backslash-quote and double backslashes; none may occur."""
    text = plugin.llm_body_regex(part, 16, NAMES)
    assert "'" not in text
    assert not re.search(r"\\[\\'\"]", text), "a sequence nginx's parser would rewrite"
    assert set(re.findall(r"\\(.)", text)) <= set("xAzsu{}[].tnr"), "only escapes PCRE and nginx agree on"
    assert "(?<llm_top_model>" in text and text.count("(?<llm_top_model>") == 1


@pytest.mark.parametrize("part", ["whole", "tail"])
def test_regex_accepts_exactly_the_names_given(part: str) -> None:
    """The names are the model's only choices, dots taken literally; case is PCRE's default, exact."""
    text = plugin.llm_body_regex(part, 16, NAMES)
    assert r'"(?<llm_top_model>chat-small|Qwen/Qwen2\.5-7B-Instruct|qwen:7b\.v1)"' in text


def test_whole_is_anchored_and_tail_is_a_search() -> None:
    assert plugin.llm_body_regex("whole", 4, NAMES).startswith(r"\A")
    tail = plugin.llm_body_regex("tail", 4, NAMES)
    assert r"\A" not in tail and tail.endswith(r"\z")
    # The literal key comes first after the definitions: PCRE's SIMD search starts there.
    assert re.search(r'\(\?\(DEFINE\).*\)"model"\(\?<=', tail)


@pytest.mark.parametrize(("args", "message"), [
    (("both", 16, NAMES), "part must be 'whole' or 'tail'"),
    (("whole", 0, NAMES), "max_depth must be an integer from 1 to 17"),
    (("tail", 18, NAMES), "max_depth must be an integer from 1 to 17"),
    (("tail", "16", NAMES), "max_depth must be an integer from 1 to 17"),
    (("tail", 16, []), "names must be a non-empty list of model names"),
    (("whole", 16, [""]), "names must be a non-empty list of model names"),
    (("whole", 16), "names must be a non-empty list of model names"),
])
def test_bad_arguments_are_named(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=re.escape(message)):
        plugin.llm_body_regex(*args)


def test_regex_grows_with_depth_and_names_only() -> None:
    assert len(plugin.llm_body_regex("whole", 9, NAMES)) - len(plugin.llm_body_regex("whole", 8, NAMES)) < 250
    one, two = (len(plugin.llm_body_regex("tail", 16, names)) for names in (["a"], ["a", "bc"]))
    assert two - one == len("|bc")


def _routes(**endpoints_by_name: list[str]) -> dict[str, Any]:
    return {name: {"endpoints": endpoints} for name, endpoints in endpoints_by_name.items()}


def test_fast_routes_per_endpoint_in_registry_order() -> None:
    routes = {"chat-small": {"endpoints": ["chat", "completions"]}, "Mixed-Case": {"endpoints": ["chat"]},
              "mixed-case": {"endpoints": ["chat"]}, "embed": {"endpoints": ["embeddings", "rerank"]}}
    assert plugin.llm_fast_routes(routes) == {
        # Names that differ only in case are told apart by the regex, so both are fast.
        "chat": {"nginx": ["chat-small", "Mixed-Case", "mixed-case"], "njs": []},
        "completions": {"nginx": ["chat-small"], "njs": []},
        "embeddings": {"nginx": ["embed"], "njs": []},
        "rerank": {"nginx": ["embed"], "njs": []},
    }


@pytest.fixture
def warnings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The warnings the plugin shows through Ansible's display."""
    shown: list[str] = []
    monkeypatch.setattr(plugin.display, "warning", shown.append)
    return shown


@pytest.mark.parametrize("depth", [4, 16, plugin.MAX_DEPTH])
def test_fast_routes_fill_the_regex_and_leave_the_rest_to_njs(depth: int, warnings: list[str]) -> None:
    names = [f"org-{i:03d}/model-{i:03d}.instruct" for i in range(200)]
    routes = {name: {"endpoints": ["chat"]} for name in names}
    plan = plugin.llm_fast_routes(routes, depth)["chat"]
    assert plan["nginx"] + plan["njs"] == names and plan["njs"], "registry order, every name once"
    longest = max(len(plugin.llm_body_regex(part, depth, plan["nginx"])) for part in plugin.PARTS)
    assert plugin.NGINX_PARAMETER_MAX - len("|" + names[0]) - 1 < longest <= plugin.NGINX_PARAMETER_MAX
    assert warnings == [f"gateway: {len(plan['njs'])} model names that serve 'chat' do not fit in nginx's "
                        "routing regex and are routed by njs (same route, slower); each level less of "
                        "gateway_fast_route_max_depth makes room for about 200 characters of names: "
                        f"{', '.join(plan['njs'][:5])}, ..."]


def test_fast_routes_that_fit_warn_of_nothing(warnings: list[str]) -> None:
    plugin.llm_fast_routes({"chat-small": {"endpoints": ["chat", "completions"]}})
    assert warnings == []


def test_fast_routes_skip_a_long_name_and_take_the_next_that_fits() -> None:
    long = "x" * 500
    routes = _routes(**{"a": ["chat"], long: ["chat"], "b": ["chat"]})
    assert plugin.llm_fast_routes(routes)["chat"] == {"nginx": ["a", "b"], "njs": [long]}

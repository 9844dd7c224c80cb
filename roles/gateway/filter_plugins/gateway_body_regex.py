"""PCRE patterns that find the top-level "model" of a JSON request body inside nginx.

The gateway routes most requests without njs: nginx matches the body against one of two
regexes, and the name captured is the named location to jump to. Each API path has its own
pair of regexes that accept, as the model, exactly (in case too) the names that serve it.
Any other name (unknown, in another case, with an escape, or beyond what fits in the
regex), or any body the regex cannot vouch for, falls through to the njs router, which
answers it.

- "whole" (small bodies): the whole body against the JSON grammar of RFC 8259, strings
  checked for escapes and raw control characters. Top-level members are walked one by one
  and nested values skipped whole, so only a top-level "model" is captured (the last, if
  repeated, as in the backends' parsers). About 25 instructions per byte.
- "tail" (big bodies): an unanchored search for `"model": "<name>"` whose rest, up to the
  end of the body, is valid JSON for the members that follow it and then the top-level
  object's closing brace. PCRE finds candidates with a vectorised search for the quote, so
  the prompt before the key costs about one instruction per byte. In a valid body such a
  key is top-level: its opening quote follows `{`, `,` or whitespace, so it is a real
  string delimiter; were it a closing one, the letters `model` would stand outside any
  string. Anything before the key is left to the backend's parser.

Nesting is bounded, without recursion: group k+1 matches a value nested at most k levels
deep and calls only group k, so PCRE's stack stays small whatever the body (an unbounded
recursion runs out after a few hundred levels, and nginx then logs the body in an alert).
Everything is possessive: PCRE never backtracks into what it matched.

The text goes into nginx.conf between single quotes: it holds no quote of that kind, a
backslash is written `\\x5c`, and `\\t`, `\\n`, `\\r` become those characters in nginx's
parser, which PCRE takes literally. nginx refuses a parameter over 4 KB, so strings are
called as a group, not repeated, and the names that do not fit are left to njs.
"""

from __future__ import annotations

from typing import Any, Callable

from ansible.errors import AnsibleFilterError
from ansible.utils.display import Display

display = Display()

BACKSLASH = r"\x5c"
WS = r"[ \t\n\r]*+"
# Every JSON escape checked; no raw control characters.
STRICT_STRING = (rf'"[^"{BACKSLASH}\x00-\x1f]*+'
                 rf'(?:{BACKSLASH}(?:["{BACKSLASH}/bfnrt]|u[0-9A-Fa-f]{{4}})[^"{BACKSLASH}\x00-\x1f]*+)*+"')
# Only where the string ends: a quote not preceded by a backslash ends it at once (the
# one-character class runs about twice as fast as the strict one); otherwise the
# escapes are walked one by one.
BOUNDARY_STRING = rf'"(?:[^"]*+(?<!{BACKSLASH})"|(?:[^"{BACKSLASH}]++|{BACKSLASH}[\x00-\xff])*+")'
NUMBER = r"-?+(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][-+]?+[0-9]++)?+"
# A top-level key the regex may skip: plain text only, so that "mod\u0065l" goes to njs.
OTHER_PLAIN_KEY = rf'"(?!model")[^"{BACKSLASH}\x00-\x1f]*+"'
# nginx reads a quoted parameter of at most 4094 characters: its 4096-byte buffer holds
# the quotes too (checked with nginx -t).
NGINX_PARAMETER_MAX = 4094
# At 17 levels the regex alone is 3.9 KB.
MAX_DEPTH = 17
PARTS = ("whole", "tail")


def _value_groups(string: str, max_depth: int) -> tuple[str, str]:
    """DEFINE groups for JSON values nested at most max_depth levels; returns (groups, call).

    Group 1 is a string (keys call it), group 2 a scalar value, group k+2 a value at most k
    levels deep. Keys call the string group rather than repeat it: nginx refuses a
    parameter over 4 KB. A container is tried before the scalar call: its first character
    fails fast, a call does not.
    """
    groups = "(" + string + ")(" + string + "|" + NUMBER + "|true|false|null)"
    for depth in range(1, max_depth + 1):
        inner = f"(?{depth + 1})"
        member = "(?1)" + WS + ":" + WS + inner
        groups += ("(" + r"\{" + WS + "(?:" + member + "(?:" + WS + "," + WS + member + ")*+)?+" + WS + r"\}"
                   + r"|\[" + WS + "(?:" + inner + "(?:" + WS + "," + WS + inner + ")*+)?+" + WS + r"\]"
                   + "|(?2))")
    return groups, f"(?{max_depth + 2})"


def _name_choice(names: list[str]) -> str:
    """The model's value: one of `names`, exactly, captured as (?<llm_top_model>).

    Registry names hold letters, digits and `._:/-`; only the dot means something to PCRE.
    """
    return '"(?<llm_top_model>' + "|".join(name.replace(".", r"\.") for name in names) + ')"'


def llm_body_regex(part: str, max_depth: int = 16, names: list[str] | None = None) -> str:
    """The regex for `part` ("whole" or "tail") that accepts one of `names` as the top-level model."""
    if not isinstance(max_depth, int) or not 1 <= max_depth <= MAX_DEPTH:
        raise AnsibleFilterError(f"llm_body_regex: max_depth must be an integer from 1 to {MAX_DEPTH}")
    if not names or not all(isinstance(name, str) and name for name in names):
        raise AnsibleFilterError("llm_body_regex: names must be a non-empty list of model names")
    model = r'"model"' + WS + ":" + WS + _name_choice(names)
    if part == "whole":
        groups, value = _value_groups(STRICT_STRING, max_depth)
        member = "(?:" + model + "|" + OTHER_PLAIN_KEY + WS + ":" + WS + value + ")"
        # The member loop checks the comma by lookahead so that the named group appears once;
        # a body without a model then fails at the end (njs names what is missing).
        return (r"\A(?(DEFINE)" + groups + ")" + WS + r"\{" + WS
                + "(?:" + member + WS + '(?:,' + WS + '(?=")|(?=\\})))*+'
                + "(?(<llm_top_model>)|(?!))" + r"\}" + WS + r"\z")
    if part == "tail":
        groups, value = _value_groups(BOUNDARY_STRING, max_depth)
        rest = "(?:" + WS + "," + WS + OTHER_PLAIN_KEY + WS + ":" + WS + value + ")*+"
        # The key first, its left neighbour checked after: PCRE then searches for the
        # two-character start '"m' with SIMD instead of trying every quote.
        model = r'"model"(?<=[{,\s]"model")' + WS + ":" + WS + _name_choice(names)
        return "(?(DEFINE)" + groups + ")" + model + rest + WS + r"\}" + WS + r"\z"
    raise AnsibleFilterError(f"llm_body_regex: part must be 'whole' or 'tail', not {part!r}")


def llm_fast_routes(routes: dict[str, Any], max_depth: int = 16) -> dict[str, dict[str, list[str]]]:
    """Per endpoint, the names nginx routes by itself ("nginx") and those left to njs ("njs").

    Names are taken in registry order while both regexes of the endpoint still fit in one
    nginx parameter; the rest are routed by njs, to the same place, only slower.
    """
    longest_without_names = max(len(llm_body_regex(part, max_depth, ["x"])) for part in PARTS) - 1
    plan: dict[str, dict[str, list[str]]] = {}
    room: dict[str, int] = {}
    for name, route in routes.items():
        for endpoint in route["endpoints"]:
            entry = plan.setdefault(endpoint, {"nginx": [], "njs": []})
            left = room.setdefault(endpoint, NGINX_PARAMETER_MAX - longest_without_names)
            # The name as the regex spells it, and a "|" before all but the first.
            cost = len(_name_choice([name])) - len(_name_choice([""])) + (1 if entry["nginx"] else 0)
            if cost <= left:
                entry["nginx"].append(name)
                room[endpoint] = left - cost
            else:
                entry["njs"].append(name)
    for endpoint, entry in plan.items():
        if entry["njs"]:
            # Ansible shows a warning once however often the variable is templated.
            shown = ", ".join(entry["njs"][:5]) + (", ..." if len(entry["njs"]) > 5 else "")
            display.warning(f"gateway: {len(entry['njs'])} model names that serve '{endpoint}' do not fit in "
                            "nginx's routing regex and are routed by njs (same route, slower); each level less "
                            "of gateway_fast_route_max_depth makes room for about 200 characters of names: "
                            f"{shown}")
    return dict(sorted(plan.items()))


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        """Map filter names to functions."""
        return {"llm_body_regex": llm_body_regex, "llm_fast_routes": llm_fast_routes}

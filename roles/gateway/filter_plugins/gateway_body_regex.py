"""PCRE patterns that find the top-level "model" of a JSON request body inside nginx.

The gateway routes most requests without njs: nginx matches the body against one of two
regexes and a map turns the captured name into a route. A name with an escape, or
any body the regex cannot vouch for, falls through to the njs router, which answers it;
so do names the gateway's maps do not list (unknown ones, or not in their exact case).

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
called as a group, not repeated.
"""

from __future__ import annotations

from typing import Any, Callable

from ansible.errors import AnsibleFilterError

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
# The model's name as sent: plain text only; the maps then check it exactly.
PLAIN_NAME = rf'"(?<llm_top_model>[^"{BACKSLASH}\x00-\x1f]++)"'
# nginx refuses a parameter over 4 KB: at 17 levels the regex is 3.9 KB.
MAX_DEPTH = 17


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


def llm_body_regex(part: str, max_depth: int = 16) -> str:
    """The regex for `part` ("whole" or "tail"); captures the model in (?<llm_top_model>)."""
    if not isinstance(max_depth, int) or not 1 <= max_depth <= MAX_DEPTH:
        raise AnsibleFilterError(f"llm_body_regex: max_depth must be an integer from 1 to {MAX_DEPTH}")
    model = r'"model"' + WS + ":" + WS + PLAIN_NAME
    if part == "whole":
        groups, value = _value_groups(STRICT_STRING, max_depth)
        member = "(?:" + model + "|" + OTHER_PLAIN_KEY + WS + ":" + WS + value + ")"
        # The member loop checks the comma by lookahead so that the named group appears once.
        return (r"\A(?(DEFINE)" + groups + ")" + WS + r"\{" + WS
                + "(?:" + member + WS + '(?:,' + WS + '(?=")|(?=\\})))*+' + r"\}" + WS + r"\z")
    if part == "tail":
        groups, value = _value_groups(BOUNDARY_STRING, max_depth)
        rest = "(?:" + WS + "," + WS + OTHER_PLAIN_KEY + WS + ":" + WS + value + ")*+"
        # The key first, its left neighbour checked after: PCRE then searches for the
        # two-character start '"m' with SIMD instead of trying every quote.
        model = r'"model"(?<=[{,\s]"model")' + WS + ":" + WS + PLAIN_NAME
        return "(?(DEFINE)" + groups + ")" + model + rest + WS + r"\}" + WS + r"\z"
    raise AnsibleFilterError(f"llm_body_regex: part must be 'whole' or 'tail', not {part!r}")


def llm_fast_route_names(routes: dict[str, Any], upstream: str | None = None) -> list[str]:
    """Names nginx may route by itself (of one upstream, if given).

    nginx maps compare case-insensitively, so names that differ from another only in case
    are left to njs, which compares exactly.
    """
    folded: dict[str, int] = {}
    for name in routes:
        folded[name.lower()] = folded.get(name.lower(), 0) + 1
    return sorted(name for name, route in routes.items()
                  if folded[name.lower()] == 1 and upstream in (None, route["upstream"]))


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        """Map filter names to functions."""
        return {"llm_body_regex": llm_body_regex, "llm_fast_route_names": llm_fast_route_names}

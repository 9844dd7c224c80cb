"""How nginx finds a request's top-level "model": its body patterns and its name table.

The rule these implement, and why it is sound, is written once in roles/gateway/README.md
("How a request is routed"). This module only builds what nginx needs for it:

- `llm_model_patterns(max_depth)`: four PCRE patterns, the same for every registry (no
  model name is in them). Each captures the model it vouches for as `llm_name`:
  - first:  the body's first member is "model" (and the body ends with "}");
  - tail:   a "model" member followed, to the end of the body, only by members that are
            not "model" and the closing brace of the top-level object;
  - guard:  for bodies that `first` matched: the first later "model" member that is not
            provably nested; it captures its name when `tail` would vouch for it, else
            nothing (empty: njs decides);
  - escape: a "\\u00.." escape of one of the letters of "model" anywhere (empty: njs decides).
- `llm_route_table(routes, endpoints)`: nginx's name table, one row per (API path, served name).

The patterns go into nginx.conf between single quotes, in PCRE's extended mode so that they
can be laid out on several lines with comments. They hold no single quote; a backslash is
written as the escape x5c and nginx turns the escapes t, n and r into those characters
(inside a character class extended mode keeps them). nginx refuses a quoted parameter over
4094 characters, which bounds the nesting the patterns follow.
"""

from __future__ import annotations

from typing import Any, Callable

from ansible.errors import AnsibleFilterError

# nginx reads a quoted parameter of at most 4094 characters: its 4096-byte buffer holds the
# quotes too (checked with nginx -t).
NGINX_PARAMETER_MAX = 4094
MAX_DEPTH = 32
# JSON's whitespace only: \s would also take \v and \f.
WS = r"[ \t\n\r]*+"
# The characters the registry allows in a name (llm_registry.NAME_RE).
NAME = r"[A-Za-z0-9][A-Za-z0-9._:/-]*+"
# A "model" key right after "{" (with up to this much whitespace) is its object's first
# key: never a later top-level member. Bounded because PCRE 10.42 (Debian 12) takes only
# lookbehinds of fixed lengths.
FIRST_KEY_SPACE = 8
# In njs terms the same bound is router.js's FIRST_KEY_SPACE.


def _definitions(max_depth: int) -> tuple[str, str]:
    """The groups that skip one value, and the call that skips a member's value.

    Group 1 reads a string to its closing quote; group 2 a number or literal; group k+2 an
    array or object nested at most k levels, by its brackets and strings only (what is
    inside is the backend's to check). Group k+2 calls group k+1 and no group calls itself,
    so PCRE's stack stays small whatever the body.
    """
    lines = [
        "(?(DEFINE)",
        # A quote not preceded by a backslash ends a string at once; otherwise walk the escapes.
        r'  ("(?:[^"]*+(?<!\x5c)"|(?:[^"\x5c]++|\x5c[\x00-\xff])*+"))   # 1: string',
        r'  ([^ \t\n\r,:\[\]{}"]++)   # 2: number or literal',
        r'  ([\[{](?:[^"\[\]{}]++|(?1))*+[\]}])   # 3: array or object, 1 level',
    ]
    for depth in range(2, max_depth + 1):
        lines.append(rf'  ([\[{{](?:[^"\[\]{{}}]++|(?1)|(?{depth + 1}))*+[\]}}])')
    value_group = max_depth + 3
    lines.append(f"  ((?1)|(?{max_depth + 2})|(?2))   # {value_group}: a value")
    lines.append(")")
    return "\n".join(lines), f"(?{value_group})"


def _later_model_key() -> str:
    """A "model" key that is not the first key of its object, then its colon.

    The literal comes first so that PCRE looks for it with a vectorised search; its left
    neighbour is checked after. In valid JSON a quote after "," or whitespace opens a string
    (were it a closing one, the letters of model would stand outside any string).
    """
    first_key = [r'\{[ \t\n\r]' + (f"{{{n}}}" if n > 1 else "") + '"model"' for n in range(1, FIRST_KEY_SPACE + 1)]
    half = FIRST_KEY_SPACE // 2
    return "\n".join([
        r'"model" (?<=[, \t\n\r]"model")',
        "(?<!" + "|".join(first_key[:half]) + "\n  |" + "|".join(first_key[half:]) + ")",
        f"{WS} : {WS}",
    ])


def _rest(value: str) -> str:
    """What may follow the top-level model's value: other members, then the body's end."""
    return f'(?: {WS} , {WS} "(?!model")[^"\\x5c]*+" {WS} : {WS} {value} )*+ {WS} \\}} {WS} \\z'


def llm_model_patterns(max_depth: int = 16) -> dict[str, str]:
    """The four patterns, keyed first, tail, guard and escape; see the module docstring."""
    if not isinstance(max_depth, int) or isinstance(max_depth, bool) or not 1 <= max_depth <= MAX_DEPTH:
        raise AnsibleFilterError(f"llm_model_patterns: max_depth must be an integer from 1 to {MAX_DEPTH}")
    definitions, value = _definitions(max_depth)
    name = f'"(?<llm_name>{NAME})"'
    patterns = {
        "first": "\n".join([
            "(?x)",
            f"\\A {WS} \\{{ {WS} \"model\" {WS} : {WS} {name} {WS} [,}}]",
            "# and the body ends with the closing brace",
            f"(?= (?s:.*) \\}} {WS} \\z )",
        ]),
        "tail": "\n".join(["(?x)", definitions, _later_model_key(), name, _rest(value)]),
        "guard": "\n".join([
            "(?x)", definitions, _later_model_key(),
            "# skip a key whose object closes after its value, with more after it: nested",
            f"(?! {value} {WS} \\}} {WS} [^ \\t\\n\\r] )",
            "# the name if nothing but members and the end follow, else empty",
            f"(?: {name} {_rest(value)} )?+",
        ]),
        "escape": r"(?x) \x5cu00(?:6[cdfCDF]|6[45]) (?<llm_name>)",
    }
    for key, text in patterns.items():
        if len(text) > NGINX_PARAMETER_MAX:
            raise AnsibleFilterError(f"llm_model_patterns: the {key} pattern takes {len(text)} characters at "
                                     f"depth {max_depth}; nginx reads at most {NGINX_PARAMETER_MAX}: lower the depth")
    return patterns


def llm_route_table(routes: dict[str, Any], endpoints: list[dict[str, str]]) -> dict[str, Any]:
    """The rows of nginx's name table and the hash sizes that hold them.

    Each row maps "<API path> <name>" to "<name> <model> <target>", for every name and alias
    of every model that serves the path. nginx's string maps compare without case; the name
    in the value lets the next map check it exactly. The target is the model's location
    plus the path its engine serves the endpoint at.
    """
    path_of = {endpoint["name"]: endpoint["path"] for endpoint in endpoints}
    rows = []
    for name, route in routes.items():
        for endpoint in route["endpoints"]:
            target = f"/_llm/{route['upstream']}{route['paths'][endpoint]}"
            rows.append((f"{path_of[endpoint]} {name}", f"{name} {route['id']} {target}"))
    # nginx keeps a key in a bucket with a pointer before it and a pointer-aligned length
    # after it; the bucket is rounded up to a cache line. The size is a ceiling it searches up to.
    longest = max((len(key) for key, _ in rows), default=0)
    bucket = max(64, -(-(longest + 2 + 16) // 64) * 64)
    return {"rows": rows, "hash_max_size": max(2048, 4 * len(rows)), "hash_bucket_size": bucket}


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        """Map filter names to functions."""
        return {"llm_model_patterns": llm_model_patterns, "llm_route_table": llm_route_table}

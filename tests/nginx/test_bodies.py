"""Which model a body names: the rule of roles/gateway/README.md, "How a request is routed".

The tricky-body matrix: every case is sent with the top-level "model" first, in the middle
and last, padded to 1 KB, 100 KB and 1 MB, to the gateway and to the same gateway with
every body routed by njs. Each row (case and position) has one expected outcome, the same
at every size and through both halves of the gateway.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import assert_no_pcre_error
from gateway_lab import Gateway, Reply, assert_error, post_json

SIZES = {"1 KB": 1024, "100 KB": 100 * 1024, "1 MB": 1024 * 1024}
POSITIONS = ("first", "middle", "last")
BACKEND_OF = {"chat-small": ("small-a", "small-b"), "chat-large": ("large",)}


@dataclass(frozen=True)
class Routed:
    """The body reaches, unchanged, a server of this model."""

    model: str


@dataclass(frozen=True)
class Refused:
    """The gateway answers this error itself; no backend sees the body."""

    status: int
    code: str


Outcome = Routed | Refused


@dataclass
class Case:
    """A body: `before` and `after` members around the padding, `model` placed by position.

    first:  {model, before, pad, after}
    middle: {before, pad, model, after}
    last:   {before, pad, after, model}
    """

    name: str
    expect: Outcome | Callable[[str], Outcome]
    model: str | None = '"model": "chat-small"'
    before: list[str] = field(default_factory=lambda: ['"messages": [{"role": "user", "content": "hi"}]'])
    after: list[str] = field(default_factory=lambda: ['"stream": false'])
    separator: str = ", "
    prefix: str = "{"
    suffix: str = "}"

    def outcome(self, position: str) -> Outcome:
        return self.expect(position) if callable(self.expect) else self.expect

    def body(self, position: str, size: int) -> bytes:
        """The body at about `size` bytes (the pad is a top-level string)."""
        def assemble(pad: str) -> bytes:
            pad_member = [f'"pad": "{pad}"']
            model = [self.model] if self.model else []
            members = {"first": model + self.before + pad_member + self.after,
                       "middle": self.before + pad_member + model + self.after,
                       "last": self.before + pad_member + self.after + model}[position]
            return (self.prefix + self.separator.join(members) + self.suffix).encode()
        return assemble("p" * max(0, size - len(assemble(""))))


TOOL_SCHEMA = ('"tools": [{"type": "function", "function": {"name": "pick", "parameters": {"type": "object", '
               '"properties": {"model": {"type": "string"}}}, "model": "chat-large"}}]')


def last_model_wins(first: str, later: str) -> Callable[[str], Outcome]:
    """Two top-level "model" members: the one that comes last in the body counts."""
    return lambda position: Routed(first if position == "last" else later)


def refused_in_the_middle(position: str) -> Outcome:
    """A top-level defect after the model: read (and refused) only when the model is in the middle."""
    return Refused(400, "invalid_body") if position == "middle" else Routed("chat-small")


CASES = [
    Case("plain", Routed("chat-small")),
    Case("alias", Routed("chat-small"), model='"model": "gpt-4o-mini"'),
    Case("nested model in a tool schema", Routed("chat-small"), before=[TOOL_SCHEMA]),
    Case("nested model followed by more keys", Routed("chat-small"),
         after=['"metadata": {"run": 1, "model": "chat-large", "user": "u"}']),
    Case("nested model only", Refused(400, "missing_model"), model=None,
         before=[TOOL_SCHEMA, '"messages": [{"role": "user", "content": "hi", "model": "chat-large"}]']),
    Case('"model" inside strings', Routed("chat-small"),
         before=['"messages": [{"role": "user", "content": "say \\"model\\": \\"chat-large\\" or '
                 '{\\"model\\":\\"chat-large\\"} ünïcødé ✓"}]'],
         after=['"x": "\\\\", "y": "\\\\\\"model\\\\\\":", "z": "\\"}"']),
    Case("duplicate top-level model, the other one after", last_model_wins("chat-small", "chat-large"),
         after=['"stream": false', '"model": "chat-large"']),
    Case("duplicate spelled with an escape, after", last_model_wins("chat-small", "chat-large"),
         after=['"mod\\u0065l": "chat-large"']),
    Case("model key spelled with an escape", Routed("chat-small"), model='"m\\u006fdel": "chat-small"'),
    Case("model name with an escape", Routed("chat-large"), model='"model": "chat\\u002dlarge"'),
    Case("whitespace everywhere", Routed("chat-small"), model='"model" \t:\n   "chat-small"',
         separator=" \r\n  ,\t", prefix=" \n\t{\n   ", suffix="\n }\r\n"),
    Case("pretty-printed", Routed("chat-small"), separator=",\n  ", prefix="{\n  ", suffix="\n}\n"),
    Case("deep nesting", Routed("chat-small"),
         before=['"a": ' + "[" * 40 + '{"model": "chat-large"}' + "]" * 40,
                 '"b": ' + '{"c": ' * 40 + '"model"' + "}" * 40]),
    Case("invalid JSON inside a nested value", Routed("chat-small"), after=['"messages": [1,, 2}']),
    Case("invalid scalars", Routed("chat-small"), after=['"a": tru', '"b": 01', '"c": NaN']),
    Case("missing comma before the model", Routed("chat-small"),
         before=['"messages": [] "stream": false']),
    Case("missing comma after the model", refused_in_the_middle, after=['"stream": false "n": 1']),
    Case("unterminated string after the model", refused_in_the_middle, after=['"stream": "oops']),
    Case("trailing data", Refused(400, "invalid_body"), suffix="} xyz"),
    Case("a second object after the body", lambda p: Routed("chat-small") if p == "first"
         else Refused(400, "invalid_body"), suffix='}{"model": "chat-large"}'),
    Case("model is a number", Refused(400, "invalid_body"), model='"model": 7'),
    Case("model is null", Refused(400, "invalid_body"), model='"model": null'),
    Case("model is a list", Refused(400, "invalid_body"), model='"model": ["chat-small"]'),
    Case("model is an object", Refused(400, "invalid_body"), model='"model": {"name": "chat-small"}'),
    Case("model is empty", Refused(400, "missing_model"), model='"model": ""'),
    Case("no model", Refused(400, "missing_model"), model=None),
    Case("unknown model", Refused(404, "model_not_found"), model='"model": "no-such-model"'),
    Case("model in another case", Refused(404, "model_not_found"), model='"model": "CHAT-SMALL"'),
    Case("alias in another case", Refused(404, "model_not_found"), model='"model": "chat-large-v1"'),
    Case("prototype names", Refused(404, "model_not_found"), model='"model": "__proto__"'),
]

# Rows whose outcome does not depend on where the model is: sent once.
POSITIONLESS = {"no model", "nested model only"}


def matrix() -> list[Any]:
    params = []
    for case in CASES:
        for position in (("last",) if case.name in POSITIONLESS else POSITIONS):
            params.append(pytest.param(case, position, id=f"{case.name}-{position}"))
    return params


def check(gw: Gateway, raw: bytes, expected: Outcome, path: str = "/v1/chat/completions") -> Reply:
    """Send `raw` and check where it went."""
    reply = post_json(gw.http_port, raw, path, timeout=30)
    served = gw.served()
    received = [(name, r["body_sha256"]) for name, rs in served.items() for r in rs]
    if isinstance(expected, Routed):
        # The backend may refuse an odd body itself; what matters is where it went, unchanged.
        assert len(received) == 1, (reply.status, reply.body[:300])
        assert received[0][0] in BACKEND_OF[expected.model], (received, reply.body[:300])
        assert received[0][1] == hashlib.sha256(raw).hexdigest()
    else:
        assert_error(reply, expected.status, expected.code)
        assert received == []
    for backend in gw.backends.values():
        backend.clear()
    return reply


@pytest.mark.parametrize(("case", "position"), matrix())
def test_tricky_body(gateway: Gateway, njs_gateway: Gateway, case: Case, position: str) -> None:
    expected = case.outcome(position)
    for size in SIZES.values():
        raw = case.body(position, size)
        assert abs(len(raw) - size) < 600 or len(raw) < size, len(raw)
        check(gateway, raw, expected)
        check(njs_gateway, raw, expected)
    assert_no_pcre_error(gateway)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b'[{"model": "chat-small"}]', b'"chat-small"', b"{",
                                 b'{"model": "chat-small"', b"null", b"  "])
def test_bodies_that_are_no_object(gateway: Gateway, njs_gateway: Gateway, raw: bytes) -> None:
    for gw in (gateway, njs_gateway):
        check(gw, raw, Refused(400, "invalid_body"))


@pytest.mark.parametrize(("depth", "nested"), [(20, "["), (20, '{"a":'), (200, "["), (200, '{"a":'),
                                              (5000, "["), (5000, '{"a":')])
def test_valid_json_nested_deep_is_routed(gateway: Gateway, njs_gateway: Gateway, depth: int, nested: str) -> None:
    """Deeper than nginx's patterns follow, njs routes it: never refused, never the nested decoy."""
    close = "]" if nested == "[" else "}"
    nest = nested * depth + '{"model":"chat-large"}' + close * depth
    for raw in (f'{{"model":"chat-small","a":{nest}}}', f'{{"a":{nest},"model":"chat-small"}}'):
        for gw in (gateway, njs_gateway):
            check(gw, raw.encode(), Routed("chat-small"))
    assert_no_pcre_error(gateway)


@pytest.mark.parametrize("where", ["after", "inside"])
def test_hundreds_of_nested_models(gateway: Gateway, where: str) -> None:
    """Hundreds of nested "model" keys, each a candidate for the patterns: only the top-level one routes."""
    tools = [{"type": "function", "function": {"name": f"f{i}", "model": "chat-large", "description": "d",
                                               "parameters": {"properties": {"model": {"type": "string"}}}}}
             for i in range(400)]
    body: dict[str, Any] = {"model": "chat-small", "tools": tools} if where == "after" else {
        "tools": tools, "messages": [{"role": "user", "content": "hi", "model": "chat-large"}], "model": "chat-small"}
    check(gateway, json.dumps(body).encode(), Routed("chat-small"))
    assert_no_pcre_error(gateway)


def test_big_dense_body_after_the_model(gateway: Gateway) -> None:
    """An embeddings request of 200,000 token ids after "model": one long walk, within PCRE's stack."""
    raw = json.dumps({"input": list(range(200_000)), "model": "embed-small", "encoding_format": "float"}).encode()
    reply = post_json(gateway.http_port, raw, "/v1/embeddings", timeout=30)
    assert reply.status == 200, reply.body[:300]
    assert gateway.backends["embed"].requests()[-1]["body_sha256"] == hashlib.sha256(raw).hexdigest()
    assert_no_pcre_error(gateway)


def test_sixteen_megabytes(gateway: Gateway, njs_gateway: Gateway) -> None:
    """The largest body allowed, model first and last, through both halves."""
    pad = "lorem ipsum " * (16 * 1024 * 1024 // 12 - 20)
    for raw in (json.dumps({"model": "chat-small", "messages": [{"role": "user", "content": pad}]}).encode(),
                json.dumps({"messages": [{"role": "user", "content": pad}], "model": "chat-small"}).encode()):
        assert 15_000_000 < len(raw) <= 16 * 1024 * 1024
        for gw in (gateway, njs_gateway):
            check(gw, raw, Routed("chat-small"))


def test_chunked_body_is_routed_by_nginx(gateway: Gateway) -> None:
    """No Content-Length: nginx reads the chunks into one body and routes it the same way."""
    conn = gateway.connect()
    raw = json.dumps(chat_body("chat-large", tools=[{"model": "chat-small"}])).encode()
    conn.request("POST", "/v1/chat/completions", body=iter([raw[:10], raw[10:]]),
                 headers={"Content-Type": "application/json", "X-Request-ID": "chunked-1"}, encode_chunked=True)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200
    assert resp.headers["X-Backend-Model"] == "chat-large"
    assert gateway.backends["large"].requests()[-1]["body_sha256"] == hashlib.sha256(raw).hexdigest()
    assert gateway.logged({"chunked-1"})["chunked-1"]["router"] == "nginx"


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(("raw", "router"), [
    (b'{"model": "chat-small", "messages": []}', "nginx"),
    (b'{"messages": [], "model": "chat-small", "stream": false}', "nginx"),
    (b'{\n  "model": "chat-small",\n  "tools": [{"function": {"name": "f", "model": "chat-large"}}]\n}', "nginx"),
    (('{"tools": [' + TOOL_SCHEMA[10:] + ', "model": "chat-small"}').encode(), "nginx"),
    (b'{"model": "chat-small", "tools": [{"function": {"model": "x", "name": "f"}}], "metadata": {"a": 1, '
     b'"model": "chat-large", "b": 2}}', "njs"),
    (b'{"model": "chat\\u002dsmall"}', "njs"),
])
def test_which_half_routes(gateway: Gateway, raw: bytes, router: str) -> None:
    """Common shapes are routed by nginx alone; what its patterns cannot vouch for, by njs (the log says)."""
    request_id = "which-half-" + hashlib.sha256(raw).hexdigest()[:12]
    reply = post_json(gateway.http_port, raw, headers={"X-Request-ID": request_id})
    assert reply.headers["X-Backend-Model"] == "chat-small", reply.body[:200]
    assert gateway.logged({request_id})[request_id]["router"] == router

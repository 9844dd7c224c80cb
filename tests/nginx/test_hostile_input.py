"""A hostile-input battery: hundreds of generated requests against a gateway with keys and TLS.

One gateway rendered by the role and run by this host's nginx on 127.0.0.1, two models on
127.0.0.9, each backend with its own key. The battery's client key may use ONE of them
(open-model, alias open-alias), so "reached a backend it should not" is checkable: the other
model's backend (closed-model) must never receive anything. Requests are written byte for
byte on TLS sockets (tests/support/hostile.py). After every request:

- each answer is the gateway's own OpenAI-shaped JSON 4xx or the allowed backend's answer
  (its X-Backend-* headers); a close without any answer passes only for the kinds listed in
  MAY_CLOSE (a slow sender cut off by the client timeouts, garbage after a request);
- the forbidden backend has received nothing; every request the allowed backend received
  carries a body this battery sent, whose top-level model (read independently,
  hostile.top_level_model) is one of the allowed names, on an API path, with the backend's
  own key and not the client's;
- where the README's rule decides (a body that is JSON or one readable object, framed
  normally), the outcome is exactly the rule's: the backend for an allowed name, else the
  gateway.

After every kind, the error log shows no crash, no alert and no njs exception. The timeouts
are rendered short (2 s) so the slow senders stay fast. Hypothesis runs derandomized with
no database, so every run sends the same requests.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import os
import re
import secrets
import tempfile
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from gateway_lab import Backend, Gateway, free_port, model, nginx_missing, render_gateway, start_backend, start_nginx
from hostile import Exchange, RawReply, classify, client_context, exchange_raw, may_reach, top_level_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis caches Unicode tables and constants even without a database: not in the repository.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "llm-gateway-hypothesis"))

ALLOWED, ALIAS, FORBIDDEN = "open-model", "open-alias", "closed-model"
ALLOWED_NAMES = (ALLOWED, ALIAS)
HOSTS = {"gpu-h": "127.0.0.9"}
KEY = "sk-" + secrets.token_urlsafe(32)
BACKEND_KEYS = {ALLOWED: secrets.token_urlsafe(24), FORBIDDEN: secrets.token_urlsafe(24)}
MAX_BODY = 256 * 1024
CLIENT_TIMEOUT = 2.0
API_PATHS = (b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings")
ENGINE_PATHS = {path.decode() for path in API_PATHS}
MESSAGES = b'[{"role": "user", "content": "hi"}]'

# Kinds whose requests HTTP itself cannot always answer, so a close without an answer passes.
MAY_CLOSE = {
    "slow sender": "the head or body arrives slower than the client timeouts: 408 or a close",
    "garbage after the request": "after the answer, bytes that are no request: a 400 or a close",
}


def battery_settings(examples: int) -> settings:
    """Bounded and reproducible: no deadline (a request takes what it takes), no .hypothesis dir."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def js(value: Any) -> bytes:
    """A JSON token."""
    return json.dumps(value).encode()


def obj(members: Sequence[tuple[bytes, bytes]], separator: bytes = b", ") -> bytes:
    """An object from (key token, value token) pairs, as written, duplicates kept."""
    return b"{" + separator.join(key + b": " + value for key, value in members) + b"}"


def chat(name: str) -> bytes:
    return obj([(b'"model"', js(name)), (b'"messages"', MESSAGES), (b'"max_tokens"', b"4")])


def request(body: bytes | None, *, method: bytes = b"POST", path: bytes = b"/v1/chat/completions",
            version: bytes = b"HTTP/1.1", headers: Sequence[bytes] = (), auth: bool = True,
            length: bool = True) -> bytes:
    """A request with the battery's key, written as given; `headers` go in before the body's own."""
    lines = [method + b" " + path + b" " + version, b"Host: gateway.test"]
    if auth:
        lines.append(b"Authorization: Bearer " + KEY.encode())
    lines += headers
    if body is not None:
        lines.append(b"Content-Type: application/json")
        if length:
            lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def chunked(body: bytes, sizes: Sequence[int]) -> bytes:
    """`body` as chunks of the given sizes (the last one takes the rest), then the last chunk."""
    out, at = b"", 0
    for size in [*sizes, len(body)]:
        piece = body[at:at + size]
        if piece:
            out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        at += len(piece)
    return out + b"0\r\n\r\n"


def routed_by_rule(body: bytes) -> bool | None:
    """What the README's rule says for a normally framed body: True (the backend), False (the gateway), None."""
    if len(body) > MAX_BODY:
        return False
    how, name = top_level_model(body)
    if how in ("json", "object"):
        return isinstance(name, str) and name in ALLOWED_NAMES
    return None  # the README leaves it to the backend or the gateway, by where the fault is


@dataclass
class Case:
    """One request of the battery and what it may get."""

    kind: str
    pieces: list[bytes]
    # What a backend may receive from it: the bodies, as the gateway forwards them (unchunked).
    bodies: list[bytes]
    # True: the allowed backend must answer; False: the gateway must; None: either.
    routed: bool | None = None
    # The gateway's statuses this case may get (empty: any 4xx).
    statuses: frozenset[int] = frozenset()
    pause: float = 0.0
    timeout: float = 10.0
    target: bytes = b""
    version: bytes = b"HTTP/1.1"
    method: bytes = b"POST"

    def __repr__(self) -> str:
        data = b"".join(self.pieces)
        shown = data if len(data) <= 600 else data[:400] + b"...<%d bytes>..." % (len(data) - 600) + data[-200:]
        paced = f", {len(self.pieces)} pieces {self.pause:.2f}s apart" if self.pause else ""
        return f"Case({self.kind!r}, {len(data)} bytes{paced}: {shown!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints a failing case with this: the request bytes, long ones cut."""
        printer.text(repr(self))

    def known_bug(self, reply: RawReply) -> str | None:
        """The signature of a bug this module reports in its own failing test, or None."""
        content_type = reply.header("content-type") or ""
        if (reply.status == 404 and content_type.startswith("text/html")
                and b"/_llm/" in urllib.parse.unquote_to_bytes(self.target).lower().replace(b"//", b"/")):
            return "HTML 404 under /_llm/ (test_paths_under_the_internal_prefix_get_a_json_404)"
        if reply.status == 505 and not self.version.startswith(b"HTTP/1."):
            return "HTML 505 for HTTP/2+ (test_a_request_line_of_http_2_or_later_gets_a_json_4xx)"
        if (reply.status == 500 and self.method != b"POST" and self.target in API_PATHS
                and b'"internal_error"' in reply.body):
            return "JSON 500 for other methods on API paths (test_other_methods_on_api_paths_get_a_json_405)"
        return None


@dataclass
class Battery:
    """The gateway under attack, and what was sent and seen."""

    gw: Gateway
    allowed: Backend
    forbidden: Backend
    context: Any = field(default_factory=client_context)
    bodies: dict[str, bytes] = field(default_factory=dict)
    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    closed: list[str] = field(default_factory=list)
    known_bugs: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def backend_ports(self) -> dict[int, str]:
        return {self.allowed.port: ALLOWED, self.forbidden.port: FORBIDDEN}

    def fire(self, case: Case) -> list[tuple[str, RawReply]]:
        """Send one case, judge every answer and the backends' records."""
        self.remember(case)
        answers = self.judge(case, exchange_raw(self.gw.https_port, case.pieces, context=self.context,
                                                pause=case.pause, timeout=case.timeout))
        self.check_backends()
        return answers

    def fire_together(self, cases: Sequence[Case]) -> list[tuple[Case, Exchange]]:
        """Slow cases at once (each waits on the gateway's timeouts), judged one by one afterwards."""
        for case in cases:
            self.remember(case)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(cases)) as pool:
            exchanges = list(pool.map(lambda case: exchange_raw(
                self.gw.https_port, case.pieces, context=self.context, pause=case.pause, timeout=case.timeout),
                cases))
        for case, exchange in zip(cases, exchanges):
            self.judge(case, exchange)
        self.check_backends()
        return list(zip(cases, exchanges))

    def remember(self, case: Case) -> None:
        for body in case.bodies:
            self.bodies[hashlib.sha256(body).hexdigest()] = body

    def judge(self, case: Case, exchange: Exchange) -> list[tuple[str, RawReply]]:
        self.sent[case.kind] += 1
        tally = self.outcomes[case.kind]
        if not exchange.replies:
            assert case.kind in MAY_CLOSE, (f"closed without an answer (after {exchange.elapsed:.1f}s, "
                                            f"left {exchange.rest[:200]!r}): {case!r}")
            tally["closed"] += 1
            self.closed.append(f"{case.kind}: {exchange.elapsed:.1f}s")
        answers: list[tuple[str, RawReply]] = []
        for reply in exchange.replies:
            bug = case.known_bug(reply)
            if bug:
                tally["known bug"] += 1
                self.known_bugs[bug] += 1
                continue
            try:
                who = classify(reply, self.backend_ports)
            except (AssertionError, ValueError, KeyError) as exc:
                raise AssertionError(f"not an acceptable answer ({exc}): {reply.status} {reply.headers} "
                                     f"{reply.body[:300]!r} to {case!r}") from None
            assert who in ("gateway", ALLOWED), f"{who}'s backend answered {case!r}"
            tally[f"{'gateway' if who == 'gateway' else 'backend'} {reply.status}"] += 1
            answers.append((who, reply))
        assert not exchange.rest or case.kind in MAY_CLOSE, (f"a cut or non-HTTP answer {exchange.rest[:300]!r}: "
                                                             f"{case!r}")
        if answers and case.routed is not None:
            who = answers[0][0]
            assert (who == ALLOWED) == case.routed, (f"expected the {'backend' if case.routed else 'gateway'}, "
                                                     f"got {answers[0][1].status} {answers[0][1].body[:300]!r}: "
                                                     f"{case!r}")
        if answers and case.statuses and answers[0][0] == "gateway":
            assert answers[0][1].status in case.statuses, (answers[0][1].status, answers[0][1].body[:300], case)
        return answers

    def check_backends(self) -> None:
        """Nothing at the forbidden backend; only allowed bodies at the allowed one. Then forget them."""
        leaked, received = self.forbidden.requests(), self.allowed.requests()
        # Forgotten first: one failure must not be reported again by every later case.
        self.allowed.control("DELETE", "/_test/requests")
        self.forbidden.control("DELETE", "/_test/requests")
        assert leaked == [], f"the forbidden model's backend received {leaked[:3]}"
        for record in received:
            body = self.bodies.get(record["body_sha256"])
            assert body is not None, f"the backend received a body the battery never sent: {record}"
            assert may_reach(body, ALLOWED_NAMES), f"{top_level_model(body)} reached {ALLOWED}: {body[:300]!r}"
            assert record["model"] in (None, *ALLOWED_NAMES), record
            assert record["path"] in ENGINE_PATHS, f"the backend was asked for {record['path']}"
            assert record["headers"].get("authorization") == [f"Bearer {BACKEND_KEYS[ALLOWED]}"], record["headers"]
            assert KEY not in json.dumps(record), "the client's key reached the backend"

    def check_error_log(self) -> None:
        """No worker crash, no alert, no njs exception, no PCRE trouble."""
        bad = [line for line in self.gw.error_log().splitlines()
               if re.search(r"signal|exited|\[alert\]|\[emerg\]|js exception|pcre", line, re.I)]
        assert bad == [], bad[:5]

    def summary(self) -> str:
        lines = [f"{'kind':<28}{'sent':>6}  outcomes", "-" * 100]
        for kind, count in self.sent.items():
            outcomes = ", ".join(f"{label} x{n}" for label, n in sorted(self.outcomes[kind].items()))
            lines.append(f"{kind:<28}{count:>6}  {outcomes}")
        lines.append("-" * 100)
        lines.append(f"{'total':<28}{sum(self.sent.values()):>6}")
        lines.append("closed without an answer (allowed only for: " + "; ".join(
            f"{kind}: {why}" for kind, why in MAY_CLOSE.items()) + f"): {len(self.closed)}")
        for bug, count in self.known_bugs.items():
            lines.append(f"known bug, {count} answers: {bug}")
        return "\n".join(lines)


@pytest.fixture(scope="module")
def battery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Battery]:
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    host = HOSTS["gpu-h"]
    ports = {name: free_port(host) for name in BACKEND_KEYS}
    allowed = start_backend([ALLOWED, ALIAS], host, ports[ALLOWED], api_key=BACKEND_KEYS[ALLOWED])
    forbidden = start_backend([FORBIDDEN], host, ports[FORBIDDEN], api_key=BACKEND_KEYS[FORBIDDEN])
    endpoints = ["chat", "completions", "embeddings"]
    root = tmp_path_factory.mktemp("hostile-gateway")
    https_port = free_port()
    conf = render_gateway(
        root, [model(ALLOWED, ["gpu-h"], ports[ALLOWED], aliases=[ALIAS], endpoints=endpoints),
               model(FORBIDDEN, ["gpu-h"], ports[FORBIDDEN], endpoints=endpoints)], HOSTS,
        gateway_http_port=0, gateway_https_port=https_port, gateway_api_keys_required=True,
        # No limits: a 429 would hide what the battery is after.
        llm_api_keys=[{"id": "battery", "key": KEY, "models": [ALLOWED], "rate_per_minute": 0, "burst": 0,
                       "concurrency": 0}],
        llm_backend_api_keys=BACKEND_KEYS, gateway_address_rate_per_minute=0, gateway_address_concurrency=0,
        gateway_client_max_body_size="256k", gateway_client_header_timeout="2s",
        gateway_client_body_timeout="2s", gateway_client_keepalive_timeout="3s", gateway_proxy_read_timeout="5s")
    gw = Gateway(root, 0, https_port, {ALLOWED: allowed, FORBIDDEN: forbidden})
    try:
        gw.procs.append(start_nginx(conf, https_port))
        hostile = Battery(gw, allowed, forbidden)
        yield hostile
        print("\n\nhostile-input battery\n" + hostile.summary())
    finally:
        gw.stop()


def run(battery: Battery, strategy: st.SearchStrategy[Case], examples: int,
        explicit: Sequence[Case] = ()) -> None:
    """`examples` generated cases (and the explicit ones first), each fired and judged, then the error log."""
    for case in explicit:
        battery.fire(case)

    @battery_settings(examples)
    @given(strategy)
    def fire(case: Case) -> None:
        battery.fire(case)

    fire()
    battery.check_error_log()


# ---------------------------------------------------------------- the control: the key works, and only for its model


def test_the_battery_key_reaches_its_model_and_only_it(battery: Battery) -> None:
    for name, routed in ((ALLOWED, True), (ALIAS, True), (FORBIDDEN, False)):
        body = chat(name)
        [(who, reply)] = battery.fire(Case("control", [request(body)], [body], routed=routed))
        assert reply.status == (200 if routed else 404), reply.body
    assert battery.outcomes["control"] == {"backend 200": 2, "gateway 404": 1}


# ---------------------------------------------------------------- bodies

NAMES = st.sampled_from([ALLOWED, ALIAS, FORBIDDEN])
NOISE = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b" ", b"\x00", b"\n", b"/*", b"'", b"\xff", b"e", b"-",
         b'"model": "closed-model"', b',"model":"closed-model"']
WRAPS = [b"", b"[", b"]", b"{", b"}", b",", b" ", b"x", b'{"model": "closed-model"}', b"\x00", b"\xef\xbb\xbf",
         b"null", b', "model": "closed-model"}']
NOT_OBJECTS = [b"", b" ", b"[]", b"{}", b'["model", "open-model"]', b'"open-model"', b"null", b"42",
               b"model=open-model", b"{'model': 'open-model'}", b'{"model": "open-model" /* c */}',
               b'{model: "open-model"}', b'{"model" "open-model"}', b'{"model": "open-model",}',
               b'{"model": "open-model"}{"model": "closed-model"}',
               b'{"model": "open-model"} {"model": "closed-model"}',
               b'{"model": "open-model"', b'{"model": "open-model}',
               b'{"model": "open-model\\"}', b'{"model": "closed-model", "model" "open-model"}']


@st.composite
def malformed_json(draw: st.DrawFn) -> Case:
    members = draw(st.permutations([(b'"model"', js(draw(NAMES))), (b'"messages"', MESSAGES),
                                    (b'"max_tokens"', b"4")]))
    body = obj(members)
    how = draw(st.sampled_from(["truncate", "delete", "insert", "replace", "wrap", "not an object"]))
    at = draw(st.integers(0, len(body) - 1))
    if how == "truncate":
        body = body[:at]
    elif how == "delete":
        body = body[:at] + body[at + 1:]
    elif how == "insert":
        body = body[:at] + draw(st.sampled_from(NOISE)) + body[at:]
    elif how == "replace":
        body = body[:at] + draw(st.sampled_from(NOISE)) + body[at + 1:]
    elif how == "wrap":
        body = draw(st.sampled_from(WRAPS)) + body + draw(st.sampled_from(WRAPS))
    else:
        body = draw(st.sampled_from(NOT_OBJECTS))
    return Case("malformed JSON", [request(body)], [body], routed=routed_by_rule(body))


def test_malformed_and_truncated_json(battery: Battery) -> None:
    explicit = [Case("malformed JSON", [request(body)], [body], routed=routed_by_rule(body)) for body in NOT_OBJECTS]
    run(battery, malformed_json(), 30, explicit)


WRONG_TYPES = st.one_of(
    st.integers(-2**70, 2**70).map(js), st.floats().map(js), st.booleans().map(js), st.none().map(js),
    st.lists(st.sampled_from([ALLOWED, FORBIDDEN, 1, None]), max_size=3).map(js),
    st.dictionaries(st.sampled_from(["name", "model", "id"]), st.sampled_from([ALLOWED, FORBIDDEN]),
                    max_size=2).map(js),
    st.sampled_from([b"NaN", b"-Infinity", b"1e999", b"0x10", b"01", b"tru", b"nul", b"open-model", b"'open-model'",
                     b"-", b'["open-model"]', b'{"model": "open-model"}', b"[[[[]]]]"]))


@st.composite
def wrong_model_types(draw: st.DrawFn) -> Case:
    wrong = (b'"model"', draw(WRONG_TYPES))
    members = [wrong, (b'"messages"', MESSAGES)]
    if draw(st.booleans()):
        members.insert(0, (b'"model"', js(ALLOWED)))  # the wrong one is the last and counts
    members = members if draw(st.booleans()) else list(reversed(members))
    body = obj(members)
    routed = routed_by_rule(body)
    return Case("wrong type for model", [request(body)], [body], routed=routed,
                statuses=frozenset() if routed else frozenset({400}))


def test_wrong_types_for_model(battery: Battery) -> None:
    run(battery, wrong_model_types(), 40)


SIZES = st.one_of(st.sampled_from([1024, 65536, MAX_BODY - 64, MAX_BODY, MAX_BODY + 1, 2 * MAX_BODY, 4 * MAX_BODY]),
                  st.integers(MAX_BODY - 256, MAX_BODY + 256))


def sized_body(name: str, size: int, filler: str = "string", where: str = "first") -> bytes:
    """A chat body of exactly `size` bytes: most of it `filler`, the rest a padding string."""
    room = max(0, int(size * 0.9) - 100)
    bulk = {"string": (b'"text"', js("x" * room)),
            "messages": (b'"messages"', b"[" + b", ".join([MESSAGES[1:-1]] * max(1, room // 36)) + b"]"),
            "keys": (b'"tools"', obj([(js(f"k{number}"), b"1") for number in range(max(1, room // 14))])),
            "numbers": (b'"input"', b"[" + b",".join([b"12345"] * max(1, room // 6)) + b"]")}[filler]
    members = [bulk, (b'"pad"', b'""')]
    members.insert({"first": 0, "middle": 1, "last": 2}[where], (b'"model"', js(name)))
    body = obj(members)
    body = body.replace(b'"pad": ""', b'"pad": "' + b"p" * (size - len(body)) + b'"', 1)
    assert len(body) == size, (len(body), size)
    return body


@st.composite
def huge_bodies(draw: st.DrawFn) -> Case:
    body = sized_body(draw(NAMES), draw(SIZES), draw(st.sampled_from(["string", "messages", "keys", "numbers"])),
                      draw(st.sampled_from(["first", "middle", "last"])))
    if draw(st.booleans()):
        sizes = draw(st.lists(st.integers(1, 65536), max_size=8))
        pieces = [request(None, headers=[b"Content-Type: application/json", b"Transfer-Encoding: chunked"])
                  + chunked(body, sizes)]
    else:
        pieces = [request(body)]
    return Case("huge body", pieces, [body], routed=routed_by_rule(body),
                statuses=frozenset({413}) if len(body) > MAX_BODY else frozenset())


def test_huge_bodies_up_to_and_beyond_the_limit(battery: Battery) -> None:
    at_limit, over = sized_body(ALLOWED, MAX_BODY, "messages"), sized_body(ALLOWED, MAX_BODY + 1, "messages")
    run(battery, huge_bodies(), 25, [Case("huge body", [request(at_limit)], [at_limit], routed=True),
                                     Case("huge body", [request(over)], [over], routed=False,
                                          statuses=frozenset({413}))])


@st.composite
def deep_bodies(draw: st.DrawFn) -> Case:
    depth = draw(st.integers(1000, 30000))
    shape = draw(st.sampled_from(["arrays", "objects", "mixed"]))
    opener, closer = {"arrays": (b"[", b"]"), "objects": (b'{"a": ', b"}"), "mixed": (b'[{"a": ', b"}]")}[shape]
    inner = b'{"model": "closed-model"}' if draw(st.booleans()) else b"1"
    levels = depth if shape != "mixed" else depth // 2
    nest = opener * levels + inner + closer * levels
    damage = draw(st.sampled_from(["none", "none", "one closer less", "one closer more", "cut in the middle"]))
    if damage == "one closer less":
        nest = nest[:-1]
    elif damage == "one closer more":
        nest += closer
    elif damage == "cut in the middle":
        nest = nest[:len(nest) // 2]
    members = [(b'"nest"', nest), (b'"messages"', MESSAGES)]
    if draw(st.booleans()):
        members.insert(draw(st.sampled_from([0, 1, 2])), (b'"model"', js(draw(NAMES))))
    body = obj(members)
    return Case("deep nesting", [request(body)], [body], routed=routed_by_rule(body))


def test_deeply_nested_json(battery: Battery) -> None:
    run(battery, deep_bodies(), 25)


RAW_ODDITIES = [b"\x00", "\u200f".encode(), "\u202e".encode(), "\u2066".encode(), "\u0301".encode(),
                "\u200b".encode(), "\ufeff".encode(), "\u0430".encode(), b"\xc0\xaf", b"\xe0\x80\xaf", b"\xc1\x81",
                b"\xf0\x80\x80\xaf", b"\xff", b"\xfe", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x7f", b"\x1b"]
ESCAPED_ODDITIES = [b"\\u0000", b"\\ud800", b"\\udfff", b"\\udc00\\ud800", b"\\ud83d\\ude00", b"\\u200f",
                    b"\\u202e", b"\\u0301", b"\\uFEFF", b"\\/", b"\\n", b"\\t", b"\\u0430"]


def escape_all(text: str) -> bytes:
    return b"".join(b"\\u%04x" % ord(char) for char in text)


@st.composite
def unusual_names(draw: st.DrawFn) -> Case:
    name = draw(NAMES)
    how = draw(st.sampled_from(["insert raw", "insert escape", "replace with raw", "escaped whole", "case",
                                "key"]))
    token, key = name.encode(), b"model"
    at = draw(st.integers(0, len(token)))
    if how == "insert raw":
        token = token[:at] + draw(st.sampled_from(RAW_ODDITIES)) + token[at:]
    elif how == "insert escape":
        token = token[:at] + draw(st.sampled_from(ESCAPED_ODDITIES)) + token[at:]
    elif how == "replace with raw":
        token = token[:at] + draw(st.sampled_from(RAW_ODDITIES)) + token[at + 1:]
    elif how == "escaped whole":
        token = escape_all(name) if draw(st.booleans()) else token[:at] + escape_all(name[at:at + 1]) + token[at + 1:]
    elif how == "case":
        token = draw(st.sampled_from([name.upper(), name.title(), name.swapcase(),
                                      name[:1].upper() + name[1:]])).encode()
    else:
        key = draw(st.sampled_from([b"mod\\u0065l", b"\\u006dodel", b"MODEL", b"model\\u0000", b"model\x00",
                                    b"mod\xc3\xa9l", b"model\xe2\x80\x8f", b"m\\u006fdel"]))
    members = [(b'"' + key + b'"', b'"' + token + b'"'), (b'"messages"', MESSAGES)]
    body = obj(members if draw(st.booleans()) else members[::-1])
    return Case("unusual unicode in names", [request(body)], [body], routed=routed_by_rule(body))


def test_nul_bytes_and_unusual_unicode_in_names(battery: Battery) -> None:
    explicit = []
    for oddity in [*RAW_ODDITIES, *ESCAPED_ODDITIES]:
        body = obj([(b'"model"', b'"' + ALLOWED.encode() + oddity + b'"'), (b'"messages"', MESSAGES)])
        explicit.append(Case("unusual unicode in names", [request(body)], [body], routed=routed_by_rule(body)))
    run(battery, unusual_names(), 30, explicit)


@st.composite
def duplicate_models(draw: st.DrawFn) -> Case:
    fillers = st.sampled_from([(b'"messages"', MESSAGES), (b'"x"', b'{"model": "open-model"}'),
                               (b'"tools"', b'[{"model": "closed-model"}]'), (b'"s"', js('"model": "open-model"')),
                               (b'"pad"', js("p" * 3000)), (b'"deep"', b"[" * 40 + b"]" * 40)])
    members: list[tuple[bytes, bytes]] = []
    for earlier in draw(st.lists(st.sampled_from([ALLOWED, ALIAS]), min_size=1, max_size=3)):
        members += draw(st.lists(fillers, max_size=2))
        members.append((b'"model"', js(earlier)))
    members += draw(st.lists(fillers, max_size=2))
    last = draw(st.sampled_from([FORBIDDEN, FORBIDDEN, FORBIDDEN, ALLOWED]))
    key = draw(st.sampled_from([b'"model"', b'"model"', b'"mod\\u0065l"', b'"\\u006dodel"']))
    escaped = b'"' + last[:2].encode() + escape_all(last[2:3]) + last[3:].encode() + b'"'
    value = js(last) if draw(st.booleans()) else escaped
    members.append((key, value))
    members += draw(st.lists(st.sampled_from([(b'"messages"', MESSAGES), (b'"n"', b"1")]), max_size=2))
    body = obj(members, draw(st.sampled_from([b", ", b",", b",\n", b",\t", b" ,  ", b",\r\n  "])))
    routed = routed_by_rule(body)
    return Case("duplicate model keys", [request(body)], [body], routed=routed,
                statuses=frozenset() if routed else frozenset({404}))


def test_duplicate_model_keys_where_the_last_is_forbidden(battery: Battery) -> None:
    run(battery, duplicate_models(), 30)


# ---------------------------------------------------------------- framing: headers, lengths, chunks

INJECTED = [b"Authorization: Bearer sk-bogus", b"Content-Length: 0", b"Content-Length: 5",
            b"Transfer-Encoding: chunked", b"Host: evil.example", b"X-Backend-Host: evil", b"Connection: keep-alive",
            b"X-Forwarded-For: 10.0.0.1", b"", b"Authorization: Bearer " + KEY.encode()]


@st.composite
def header_injection(draw: st.DrawFn) -> Case:
    name = draw(NAMES)
    body = chat(name)
    bodies = [body]
    how = draw(st.sampled_from(["line break in a value", "control byte in a value", "bad name", "huge header",
                                "many headers", "duplicate Authorization", "duplicate Content-Length",
                                "smuggled request"]))
    headers: list[bytes] = []
    auth, length = True, True
    if how == "line break in a value":
        breaks = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n "]))
        headers = [b"X-Note: a" + breaks + draw(st.sampled_from(INJECTED))]
    elif how == "control byte in a value":
        headers = [b"X-Note: a" + draw(st.sampled_from([b"\x00", b"\x7f", b"\x0b", b"\x1b", b"\x08", b"\xff"])) + b"b"]
    elif how == "bad name":
        headers = [draw(st.sampled_from([b"X A: b", b": b", b"X-A : b", b"X\x00A: b", b"\xffX: b", b"X-A",
                                         b" X-A: b", b"X-A:: b", b"(X): b", b"X-\xc3\xa9: b"]))]
    elif how == "huge header":
        headers = [b"X-Big: " + b"h" * draw(st.integers(1000, 40000))]
    elif how == "many headers":
        headers = [b"X-H-%d: v" % number for number in range(draw(st.integers(10, 4000)))]
    elif how == "duplicate Authorization":
        values = draw(st.lists(st.sampled_from([b"Bearer " + KEY.encode(), b"Bearer sk-bogus", b"",
                                                b"Basic Zm9vOmJhcg==", b"bearer " + KEY.encode()]),
                               min_size=2, max_size=3))
        headers, auth = [b"Authorization: " + value for value in values], False
    elif how == "duplicate Content-Length":
        size = len(body)
        values = draw(st.lists(st.sampled_from([b"%d" % size, b"%d" % (size + 1), b"0", b"%d, %d" % (size, size),
                                                b"+%d" % size, b"-%d" % size, b"%d" % (size - 1)]),
                               min_size=2, max_size=3))
        headers, length = [b"Content-Length: " + value for value in values], False
    else:
        # The head ends inside a value; a whole second request follows, then the first one's rest.
        second = chat(draw(NAMES))
        bodies.append(second)
        headers = [b"X-Note: a\r\n\r\n" + request(second)]
    return Case("header injection", [request(body, headers=headers, auth=auth, length=length)], bodies)


def test_header_injection_and_oversized_heads(battery: Battery) -> None:
    run(battery, header_injection(), 45)


TRANSFER_ENCODINGS = [b"chunked", b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"chunked, chunked",
                      b"gzip, chunked", b"chunked, identity", b"identity", b"x-chunked", b"chunked\x0b",
                      b"\tchunked", b"chunked;q=1"]
BAD_SIZES = [b"zz", b"-1", b"0x10", b"+10", b" 10", b"10 ", b"1" * 30, b"ffffffffffffffff", b"7fffffffffffffff",
             b"10;ext=1", b"10;", b"", b"1_0", b"\xff"]


@st.composite
def chunked_conflicts(draw: st.DrawFn) -> Case:
    body = chat(draw(NAMES))
    encoding = draw(st.sampled_from(TRANSFER_ENCODINGS))
    headers = [b"Transfer-Encoding: " + encoding]
    how = draw(st.sampled_from(["with Content-Length", "transfer encodings", "bad chunk size", "short chunk",
                                "no CRLF after data", "LF line ends", "valid chunks"]))
    split = draw(st.lists(st.integers(1, 40), max_size=4))
    payload = chunked(body, split)
    if how == "with Content-Length":
        size = draw(st.sampled_from([len(payload), len(body), 0, 5]))
        headers.insert(draw(st.sampled_from([0, 1])), b"Content-Length: %d" % size)
    elif how == "bad chunk size":
        payload = draw(st.sampled_from(BAD_SIZES)) + b"\r\n" + body + b"\r\n0\r\n\r\n"
    elif how == "short chunk":
        payload = b"%x\r\n" % (len(body) - draw(st.integers(1, 10))) + body + b"\r\n0\r\n\r\n"
    elif how == "no CRLF after data":
        payload = b"%x\r\n" % len(body) + body + b"0\r\n\r\n"
    elif how == "LF line ends":
        payload = payload.replace(b"\r\n", b"\n")
    elif how == "valid chunks":
        headers = [b"Transfer-Encoding: chunked"]
    data = request(None, headers=[b"Content-Type: application/json", *headers]) + payload
    return Case("chunked and lengths", [data], [body], routed=routed_by_rule(body) if how == "valid chunks" else None)


def test_conflicting_lengths_and_bad_chunks(battery: Battery) -> None:
    over = obj([(b'"model"', js(ALLOWED)), (b'"pad"', js("p" * MAX_BODY))])
    explicit = [Case("chunked and lengths", [request(None, headers=[b"Transfer-Encoding: chunked"])
                                            + chunked(over, [65536] * 4)], [over], statuses=frozenset({413}))]
    run(battery, chunked_conflicts(), 35, explicit)


# ---------------------------------------------------------------- where and how: paths, methods

DANGEROUS = [b"/collective_rpc", b"/sleep", b"/wake_up", b"/pause", b"/update_weights", b"/server_info", b"/metrics",
             b"/reset_prefix_cache", b"/v1/collective_rpc", b"/tokenize", b"/health/../metrics"]
INTERNAL = [b"/_llm/router", b"/_llm/body", b"/_llm/error", b"/_llm/error/501"]
TARGETS = [*API_PATHS, *DANGEROUS, *INTERNAL, b"/v1/models", b"/ready"]
TRAVERSALS = [b"", b"/v1/..", b"/v1/chat/../..", b"/v1/%2e%2e", b"/v1/%2E%2E", b"/v1/.%2e", b"/v1/%252e%252e",
              b"/v1/..%2f..", b"/v1/..%5c..", b"/v1\\..", b"/.", b"//", b"/v1/./..", b"/%2e/v1/.."]
SUFFIXES = [b"", b"/", b"/x", b"%00", b"%2f", b"/..", b"/.", b";", b";x=1", b"?x=1", b"?../../_llm/router", b"#x",
            b"%20", b"/../completions", b"%2fx", b"/%2e%2e/%2e%2e/metrics", b"//"]


def percent_encode_some(path: bytes, picks: Sequence[int]) -> bytes:
    out = bytearray()
    for index, byte in enumerate(path):
        out += b"%%%02X" % byte if index in picks and byte != 0x2F else bytes([byte])
    return bytes(out)


@st.composite
def odd_paths(draw: st.DrawFn) -> Case:
    target = draw(st.sampled_from(TARGETS))
    if draw(st.booleans()):
        target = percent_encode_some(target, draw(st.lists(st.integers(0, len(target)), max_size=3)))
    path = draw(st.sampled_from(TRAVERSALS)) + target + draw(st.sampled_from(SUFFIXES))
    if not path.startswith(b"/"):
        path = b"/" + path
    body = chat(draw(NAMES))
    return Case("paths", [request(body, path=path)], [body], target=path)


def test_path_traversal_encoded_and_dangerous_paths(battery: Battery) -> None:
    explicit = []
    for path in [b"/v1/../_llm/llm_open_model/v1/chat/completions", b"/v1/%2e%2e/_llm/router", b"//v1/chat/completions",
                 b"/v1/chat/completions%00", b"/_llm/router", b"/v1/chat/completions/", b"/v1/chat/completions/x",
                 b"/v1/chat/completions/../../../collective_rpc", *DANGEROUS]:
        for name in (ALLOWED, FORBIDDEN):
            body = chat(name)
            explicit.append(Case("paths", [request(body, path=path)], [body], target=path))
    run(battery, odd_paths(), 40, explicit)


METHODS = [b"GET", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT", b"PROPFIND", b"PATCH", b"MKCOL", b"COPY",
           b"MOVE", b"LOCK", b"PROPPATCH", b"SEARCH", b"BREW", b"post", b"Post", b"P0ST", b"POST\x00", b"\xffPOST",
           b"GET\x7f", b"A" * 5000, b"-", b"_"]
GARBAGE_METHODS = st.text(st.characters(codec="latin-1", exclude_characters=" \r\n"), min_size=1,
                          max_size=40).map(lambda text: text.encode("latin-1"))
# Not HTTP/2.0 and later: test_a_request_line_of_http_2_or_later_gets_a_json_4xx has them.
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"http/1.1", b"HTTPS/1.1", b"HTTP/1",
            b"HTTP/1.1 x", b"HTTP/01.1", b"HTTP/1.10"]


@st.composite
def odd_methods(draw: st.DrawFn) -> Case:
    method = draw(st.one_of(st.sampled_from(METHODS), GARBAGE_METHODS).filter(lambda m: m != b"POST"))
    path = draw(st.sampled_from([*API_PATHS, b"/v1/models", b"/v1/models/open-model", b"/v1/models/closed-model",
                                 *DANGEROUS[:4]]))
    if method == b"GET" and path.startswith(b"/v1/models"):
        method = b"PUT"  # listing the models is the API itself
    if method == b"HEAD":
        method = b"HEADS"  # an answer to HEAD has no body to check
    version = draw(st.sampled_from(VERSIONS))
    body = chat(draw(NAMES)) if draw(st.booleans()) else None
    return Case("methods", [request(body, method=method, path=path, version=version)], [] if body is None else [body],
                routed=False, version=version, target=path, method=method)


def test_unexpected_methods_and_garbage_request_lines(battery: Battery) -> None:
    explicit = [Case("methods", [request(chat(ALLOWED), method=method, path=path)], [chat(ALLOWED)], routed=False,
                     target=path, method=method)
                for method in METHODS[:7] for path in API_PATHS]
    run(battery, odd_methods(), 35, explicit)


# ---------------------------------------------------------------- slow senders and garbage after a request


SLOW_WAYS = ["dribbled head", "stalled head", "dribbled body", "short body", "unfinished chunks", "nothing at all"]


@st.composite
def slow_senders(draw: st.DrawFn, how: str) -> Case:
    body = chat(draw(NAMES))
    head = request(body).partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
    pause = 0.0
    if how == "dribbled head":
        step = draw(st.integers(1, 8))
        pieces, pause = [head[at:at + step] for at in range(0, len(head), step)], draw(st.floats(0.3, 0.6))
    elif how == "stalled head":
        pieces = [head[:draw(st.integers(1, len(head) - 3))]]
    elif how == "dribbled body":
        pieces, pause = [head, body[:10], body[10:20], body[20:]], draw(st.floats(CLIENT_TIMEOUT + 0.5, 3.5))
    elif how == "short body":
        pieces = [head + body[:draw(st.integers(0, len(body) - 1))]]
    elif how == "unfinished chunks":
        pieces = [request(None, headers=[b"Transfer-Encoding: chunked"]) + b"%x\r\n" % len(body) + body + b"\r\n"]
    else:
        pieces = [b""]
    return Case("slow sender", pieces, [body], pause=pause, timeout=8.0)


@st.composite
def garbage_after(draw: st.DrawFn) -> Case:
    body = chat(draw(NAMES))
    data = request(body).replace(b"Connection: close", b"Connection: keep-alive")
    garbage = draw(st.sampled_from([b"GARBAGE", b"GARBAGE\r\n\r\n", b"\x00\x01\x02", b"\r\n",
                                    b'{"model": "closed-model"}',
                                    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 99\r\n\r\n{",
                                    b"\x16\x03\x01\x00\xa5", b"GET / HTTP/1.1\r\n"]))
    return Case("garbage after the request", [data + garbage], [body], timeout=8.0)


def test_slow_senders_and_garbage_after_a_request(battery: Battery) -> None:
    cases: list[Case] = []
    for strategy, examples in [*((slow_senders(how), 2) for how in SLOW_WAYS), (garbage_after(), 8)]:
        @battery_settings(examples)
        @given(strategy)
        def collect(case: Case) -> None:
            cases.append(case)

        collect()
    # Each waits on the gateway's timeouts, so all of them go at once.
    for case, exchange in battery.fire_together(cases):
        assert exchange.closed, f"still open after {exchange.elapsed:.1f}s: {case!r}"
        if case.kind == "slow sender":
            assert exchange.elapsed < CLIENT_TIMEOUT + 2.5, f"cut only after {exchange.elapsed:.1f}s: {case!r}"
            assert all(reply.status == 408 for reply in exchange.replies), (exchange.replies, case)
        else:
            assert exchange.replies, f"no answer to the request before the garbage: {case!r}"
            assert exchange.elapsed < CLIENT_TIMEOUT + 3.5, f"closed only after {exchange.elapsed:.1f}s: {case!r}"
    assert {case.kind for case in cases} == set(MAY_CLOSE)
    battery.check_error_log()


# ---------------------------------------------------------------- bugs the battery found (failing until fixed)


@pytest.mark.parametrize("path", [b"/_llm/llm_closed_model/v1/chat/completions", b"/_llm/",
                                  b"/v1/../_llm/llm_open_model/v1/chat/completions", b"/_llm/x"])
def test_paths_under_the_internal_prefix_get_a_json_404(battery: Battery, path: bytes) -> None:
    """location /_llm/ sets error_page of its own, so the server's JSON error pages are not inherited there."""
    body = chat(ALLOWED)
    exchange = exchange_raw(battery.gw.https_port, request(body, path=path), context=battery.context)
    [reply] = exchange.replies
    assert classify(reply, battery.backend_ports) == "gateway"
    assert reply.status == 404


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0", b"HTTP/9.9"])
def test_a_request_line_of_http_2_or_later_gets_a_json_4xx(battery: Battery, version: bytes) -> None:
    """nginx answers 505, which is not among the statuses the gateway writes as JSON: an HTML 5xx."""
    exchange = exchange_raw(battery.gw.https_port, request(chat(ALLOWED), version=version), context=battery.context)
    [reply] = exchange.replies
    assert classify(reply, battery.backend_ports) == "gateway"


@pytest.mark.parametrize("method", [b"GET", b"PUT", b"DELETE", b"OPTIONS", b"PROPFIND"])
def test_other_methods_on_api_paths_get_a_json_405(battery: Battery, method: bytes) -> None:
    """With keys on, these get 500 ("js function router.route not found" in the error log)."""
    exchange = exchange_raw(battery.gw.https_port, request(None, method=method), context=battery.context)
    [reply] = exchange.replies
    assert classify(reply, battery.backend_ports) == "gateway"
    assert reply.status == 405


# ---------------------------------------------------------------- the whole battery


BATTERY_KINDS = {"malformed JSON", "wrong type for model", "huge body", "deep nesting", "unusual unicode in names",
                 "duplicate model keys", "header injection", "chunked and lengths", "paths", "methods",
                 "slow sender", "garbage after the request"}


def test_the_whole_battery_was_sent(battery: Battery) -> None:
    """At least 300 requests of every kind (when the whole module ran), nothing leaked, no crash."""
    if not BATTERY_KINDS <= set(battery.sent):
        pytest.skip("only part of the battery ran")
    assert sum(count for kind, count in battery.sent.items() if kind in BATTERY_KINDS) >= 300, battery.sent
    reached = sum(count for counter in battery.outcomes.values() for label, count in counter.items()
                  if label.startswith("backend"))
    assert reached >= 30, "too few requests reached the backend for the checks there to mean anything"
    battery.check_backends()
    battery.check_error_log()

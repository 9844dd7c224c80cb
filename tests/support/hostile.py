"""Raw requests for hostile-input tests, what came back, and the reference reading of a body.

http.client refuses to send much of what a hostile client sends (CR or LF in a header value,
two Content-Lengths, a garbage method, a chunk size that is no number) and reads at most one
answer. `exchange_raw` writes the bytes exactly as given, over TLS, optionally in paced pieces
(a slow sender), and parses every answer that came back before the server closed.
`classify` says whether an answer is the gateway's own OpenAI-shaped JSON 4xx or a test
backend's (its X-Backend-* headers), and fails on anything else. `top_level_model` reads the
top-level "model" of a body independently of the gateway, by the rule of
roles/gateway/README.md ("How a request is routed"), so a test can prove that a body that
reached a backend named that backend's model.
"""

from __future__ import annotations

import json
import re
import select
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Errors that mean the peer is gone: what was read so far is all there is.
_GONE = (ConnectionError, ssl.SSLError, ssl.SSLEOFError, OSError)


@dataclass
class RawReply:
    """One HTTP answer as parsed off the wire (1xx answers are skipped)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of a header, by case-insensitive name."""
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


@dataclass
class Exchange:
    """What one connection sent and got back."""

    replies: list[RawReply]
    # Bytes after the last complete answer (an answer cut off, or no HTTP at all).
    rest: bytes
    # The server closed the connection (rather than our deadline ending the wait).
    closed: bool
    elapsed: float
    send_error: str | None = None


def client_context() -> ssl.SSLContext:
    """TLS to the lab gateway's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _dechunk(data: bytes) -> tuple[bytes, int] | None:
    """A chunked body at the start of `data`: (body, bytes used), or None while incomplete."""
    body, at = b"", 0
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end == -1:
            return None
        size = int(data[at:line_end].split(b";")[0].strip() or b"0", 16)
        at = line_end + 2
        if size == 0:
            trailer_end = data.find(b"\r\n", at)
            while trailer_end != -1 and trailer_end != at:  # trailer fields, if any
                at = trailer_end + 2
                trailer_end = data.find(b"\r\n", at)
            return (body, trailer_end + 2) if trailer_end != -1 else None
        if len(data) < at + size + 2:
            return None
        body += data[at:at + size]
        at += size + 2


def parse_replies(data: bytes, closed: bool) -> tuple[list[RawReply], bytes]:
    """Every complete answer in `data`, and what is left after them.

    An answer without Content-Length or chunked framing runs to the close, so it is complete
    only once the server has `closed`. Anything that is not an HTTP/1.x answer stays in the rest.
    """
    replies: list[RawReply] = []
    while data:
        head_end = data.find(b"\r\n\r\n")
        if head_end == -1 or not data.startswith(b"HTTP/1."):
            break
        lines = data[:head_end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            break
        status = int(parts[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        reply = RawReply(status, headers, b"")
        rest = data[head_end + 4:]
        if 100 <= status < 200 or status in (204, 304):
            data = rest
            if status >= 200:
                replies.append(reply)
            continue
        if "chunked" in (reply.header("transfer-encoding") or "").lower():
            decoded = _dechunk(rest)
            if decoded is None:
                break
            reply.body, used = decoded
            data = rest[used:]
        elif reply.header("content-length") is not None:
            length = int(reply.header("content-length") or "0")
            if len(rest) < length:
                break
            reply.body, data = rest[:length], rest[length:]
        else:
            if not closed:
                break
            reply.body, data = rest, b""
        replies.append(reply)
    return replies, data


def _wait_readable(sock: ssl.SSLSocket, seconds: float) -> bytes | None:
    """What the server sends within `seconds` (b"" when it closed), or None if it stays silent."""
    if not sock.pending() and not select.select([sock], [], [], seconds)[0]:
        return None
    sock.settimeout(1.0)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None  # readable for a TLS record that held no application data
    except _GONE:
        return b""


def exchange_raw(port: int, pieces: bytes | Sequence[bytes], *, host: str = "127.0.0.1",
                 context: ssl.SSLContext | None = None, pause: float = 0.0, timeout: float = 10.0) -> Exchange:
    """Write `pieces` on one new TLS connection (`pause` seconds apart), then read until it closes.

    Writing stops at the first error (the server may answer and close early) and reading
    still takes what it sent. Reading stops when the server closes, when an answer says
    "Connection: close", or at `timeout` seconds after connecting, whichever is first.
    """
    if isinstance(pieces, bytes):
        pieces = [pieces]
    started = time.monotonic()
    deadline = started + timeout
    data, closed, send_error = b"", False, None
    raw = socket.create_connection((host, port), timeout=timeout)
    sock = (context or client_context()).wrap_socket(raw, server_hostname="localhost")
    try:
        for number, piece in enumerate(pieces):
            if number and pause:
                chunk = _wait_readable(sock, min(pause, max(0.0, deadline - time.monotonic())))
                if chunk is not None:
                    # The server answered or closed in the pause: a slow sender stops there.
                    data += chunk
                    closed = not chunk
                    send_error = "the server answered or closed while the client paused"
                    break
            if time.monotonic() >= deadline:
                send_error = "deadline reached while writing"
                break
            try:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                sock.sendall(piece)
            except (TimeoutError, *_GONE) as exc:
                send_error = f"{type(exc).__name__}: {exc}"
                break
        while not closed and time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except _GONE:
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
            replies, _ = parse_replies(data, closed=False)
            if replies and (replies[-1].header("connection") or "").lower() == "close":
                closed = True
                break
    finally:
        try:
            sock.close()
        except _GONE:
            pass
    replies, rest = parse_replies(data, closed)
    return Exchange(replies, rest, closed, time.monotonic() - started, send_error)


# ---------------------------------------------------------------- whose answer is it


ERROR_FIELDS = {"message", "type", "param", "code"}


def gateway_error(reply: RawReply) -> dict[str, Any]:
    """The gateway's own answer: a 4xx, JSON, OpenAI's error shape, valid UTF-8; else AssertionError."""
    assert 400 <= reply.status < 500, f"the gateway answered {reply.status}: {reply.body[:300]!r}"
    content_type = reply.header("content-type") or ""
    assert content_type.startswith("application/json"), f"{reply.status} with Content-Type {content_type!r}"
    error = json.loads(reply.body.decode("utf-8"))["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    return dict(error)


def classify(reply: RawReply, backend_ports: dict[int, str]) -> str:
    """"gateway" for a valid JSON 4xx of the gateway's own, else the name of the test backend that answered.

    A test backend says who it is in X-Backend-Port on every answer, errors too; an answer
    that claims a backend this test did not start fails.
    """
    port = reply.header("x-backend-port")
    if port is None:
        gateway_error(reply)
        return "gateway"
    assert port.isdigit() and int(port) in backend_ports, f"answer of an unknown backend: {reply.headers}"
    return backend_ports[int(port)]


# ---------------------------------------------------------------- the body's top-level model


class NoModel:
    """Marks a body in which no top-level "model" string can be read."""

    def __repr__(self) -> str:
        return "NO_MODEL"


NO_MODEL = NoModel()
_SPACE = b" \t\r\n"
_STOP = b' \t\r\n,:"{}[]'


def _skip(body: bytes, at: int) -> int:
    while at < len(body) and body[at] in _SPACE:
        at += 1
    return at


def _string_end(body: bytes, at: int) -> int:
    """After the string opening at `at` (a quote), or -1."""
    at += 1
    while at < len(body):
        if body[at] == 0x5C:  # a backslash takes the next byte with it
            at += 2
        elif body[at] == 0x22:
            return at + 1
        else:
            at += 1
    return -1


def _value_end(body: bytes, at: int) -> int:
    """After the value at `at`: a string, a bracketed value (strings inside skipped) or a scalar; or -1."""
    if at >= len(body):
        return -1
    if body[at] == 0x22:
        return _string_end(body, at)
    if body[at] in b"{[":
        depth = 0
        while at < len(body):
            if body[at] == 0x22:
                at = _string_end(body, at)
                if at == -1:
                    return -1
                continue
            if body[at] in b"{[":
                depth += 1
            elif body[at] in b"}]":
                depth -= 1
                if depth == 0:
                    return at + 1
            at += 1
        return -1
    start = at
    while at < len(body) and body[at] not in _STOP:
        at += 1
    return at if at > start else -1


def _text(token: bytes) -> str | None:
    """A JSON string token's text; None if it is no valid UTF-8 or no valid string."""
    try:
        value = json.loads(token.decode("utf-8"), strict=False)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _members(body: bytes) -> list[tuple[str | None, bytes]] | None:
    """The top-level object's (key, raw value) pairs, or None if the body is not one object."""
    at = _skip(body, 0)
    if at >= len(body) or body[at] != 0x7B:
        return None
    members: list[tuple[str | None, bytes]] = []
    at = _skip(body, at + 1)
    if at < len(body) and body[at] == 0x7D:
        return members if _skip(body, at + 1) == len(body) else None
    while True:
        if at >= len(body) or body[at] != 0x22:
            return None
        key_end = _string_end(body, at)
        if key_end == -1:
            return None
        key = _text(body[at:key_end])
        at = _skip(body, key_end)
        if at >= len(body) or body[at] != 0x3A:
            return None
        start = _skip(body, at + 1)
        end = _value_end(body, start)
        if end == -1:
            return None
        members.append((key, body[start:end]))
        at = _skip(body, end)
        if at < len(body) and body[at] == 0x7D:
            return members if _skip(body, at + 1) == len(body) else None
        if at >= len(body) or body[at] != 0x2C:
            return None
        at = _skip(body, at + 1)


def _model_of(raw_value: bytes) -> str | NoModel:
    if not raw_value.startswith(b'"'):
        return NO_MODEL
    text = _text(raw_value)
    return NO_MODEL if text is None else text


_LATER_MODEL = re.compile(rb'"model"\s*:\s*')
_ESCAPED_MODEL_LETTER = re.compile(rb"\\u00(?:6[cdf45])", re.I)


def top_level_model(body: bytes) -> tuple[str, str | NoModel]:
    """(how it was read, the top-level model's name or NO_MODEL), without the gateway's code.

    "json": the body is JSON (Python's parser, UTF-8; of repeated keys the last counts).
    "object": not JSON, but one object member by member, values skipped whole (the README's
    third case). "tail": neither, but a later "model" member (after "," or space, not the
    first key of its object) is followed only by other members and the closing brace (the
    README's first case). "first": none of these, but its first member is "model" with a string, the body
    ends with "}", no key is spelled with an escaped letter of "model", and every later
    `"model":` with another value opens its object or is provably nested (its object closes
    right after its value and more follows): the README's second case, where the rest is
    the backend's to refuse. Else NO_MODEL.
    """
    try:
        parsed = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        parsed = NO_MODEL
    if parsed is not NO_MODEL:
        value = parsed.get("model", NO_MODEL) if isinstance(parsed, dict) else NO_MODEL
        return "json", value if isinstance(value, str) else NO_MODEL
    members = _members(body)
    if members is not None:
        values = [raw for key, raw in members if key == "model"]
        return "object", _model_of(values[-1]) if values else NO_MODEL
    tail = _tail_model(body)
    if tail is not NO_MODEL:
        return "tail", tail
    return "first", _first_member_model(body)


def _tail_model(body: bytes) -> str | NoModel:
    """A later "model" member that only other members and the object's closing brace follow."""
    for later in _LATER_MODEL.finditer(body, 1):
        if body[later.start() - 1] not in b"," + _SPACE or _first_key(body, later.start()):
            continue
        value_end = _value_end(body, later.end())
        if value_end != -1 and _only_members_follow(body, value_end):
            return _model_of(body[later.end():value_end])
    return NO_MODEL


def _only_members_follow(body: bytes, at: int) -> bool:
    while True:
        at = _skip(body, at)
        if at < len(body) and body[at] == 0x7D:
            return _skip(body, at + 1) == len(body)
        if at >= len(body) or body[at] != 0x2C:
            return False
        at = _skip(body, at + 1)
        key_end = _string_end(body, at) if at < len(body) and body[at] == 0x22 else -1
        if key_end == -1 or _text(body[at:key_end]) == "model":
            return False
        at = _skip(body, key_end)
        if at >= len(body) or body[at] != 0x3A:
            return False
        at = _value_end(body, _skip(body, at + 1))
        if at == -1:
            return False


def _first_member_model(body: bytes) -> str | NoModel:
    at = _skip(body, 0)
    if at >= len(body) or body[at] != 0x7B or not body.rstrip(_SPACE).endswith(b"}"):
        return NO_MODEL
    at = _skip(body, at + 1)
    key_end = _string_end(body, at) if at < len(body) and body[at] == 0x22 else -1
    if key_end == -1 or _text(body[at:key_end]) != "model":
        return NO_MODEL
    at = _skip(body, key_end)
    if at >= len(body) or body[at] != 0x3A:
        return NO_MODEL
    start = _skip(body, at + 1)
    end = _value_end(body, start)
    if end == -1:
        return NO_MODEL
    name = _model_of(body[start:end])
    if isinstance(name, NoModel) or _ESCAPED_MODEL_LETTER.search(body):
        return NO_MODEL
    for later in _LATER_MODEL.finditer(body, end):
        if _first_key(body, later.start()):
            continue
        value_end = _value_end(body, later.end())
        after = _skip(body, value_end) if value_end != -1 else len(body)
        if after < len(body) and body[after] == 0x7D and _skip(body, after + 1) < len(body):
            continue  # its object closes right after it and more follows: nested
        if value_end == -1 or _model_of(body[later.end():value_end]) != name:
            return NO_MODEL
    return name


def _first_key(body: bytes, at: int) -> bool:
    """Whether the key at `at` opens its object: "{" and at most 8 bytes of space before it."""
    start = len(body[:at].rstrip(_SPACE))
    return at - start <= 8 and start > 0 and body[start - 1] == 0x7B


def may_reach(body: bytes, names: Iterable[str]) -> bool:
    """Whether a backend serving `names` may receive this body: its top-level model is one of them."""
    _, name = top_level_model(body)
    return isinstance(name, str) and name in set(names)

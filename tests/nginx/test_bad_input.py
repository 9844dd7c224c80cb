"""Whatever a client sends, the gateway's own answer is an OpenAI-style JSON error in valid UTF-8,
and a client's mistake is never a 5xx. Requests are written byte for byte on a socket.
"""

from __future__ import annotations

import json
import socket

import pytest
from conftest import assert_no_pcre_error
from gateway_lab import Gateway


def send_raw(port: int, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One request exactly as given; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return int(lines[0].split()[1]), headers, body


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def assert_json_client_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict[str, object]:
    assert status == expected, (status, body[:300])
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body.decode("utf-8"))["error"]  # valid UTF-8 and JSON, or this raises
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return dict(error)


BODY = b'{"model": "chat-small", "messages": [{"role": "user", "content": "hi"}]}'


def post(path: bytes, extra_headers: bytes = b"", body: bytes = BODY) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n" + extra_headers
            + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


@pytest.mark.parametrize(("request_bytes", "status"), [
    # Request lines nginx refuses: they used to reach a named error location without a URI (HTML 500).
    (post(b"/../v1/chat/completions"), 400),
    (post(b"/v1/../../chat/completions"), 400),
    (post(b"/v1/chat%00/completions"), 400),
    (post(b"/v1/" + b"a" * 9000), 414),
    (b"GET /" + b"x" * 9000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 414),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"h" * 40000 + b"\r\n\r\n", 400),
    (b"BREW /v1/chat/completions HTCPCP/1.0\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nBad Header\r\n\r\n", 400),
    # nginx knows only chunked: any other Transfer-Encoding used to be an HTML 501.
    (post(b"/v1/chat/completions", b"Transfer-Encoding: gzip\r\n"), 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Length: 5\r\n\r\n0\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n\r\n", 400),
])
def test_refused_requests_are_json(gateway: Gateway, request_bytes: bytes, status: int) -> None:
    assert_json_client_error(*send_raw(gateway.http_port, request_bytes), status)
    assert all(not requests for requests in gateway.served().values())


@pytest.mark.parametrize("name", [b"\xff\xfe-model", b"caf\xe9", b"\xed\xa0\x80", b"ok\xc3", "模型".encode()])
def test_unknown_name_in_any_bytes_is_echoed_as_valid_utf8(gateway: Gateway, name: bytes) -> None:
    """Invalid UTF-8 in the name used to be copied into the error, which then was no valid JSON."""
    body = b'{"model": "' + name + b'", "messages": []}'
    status, headers, answer = send_raw(gateway.http_port, post(b"/v1/chat/completions", body=body))
    error = assert_json_client_error(status, headers, answer, 404)
    assert error["code"] == "model_not_found"
    assert_no_pcre_error(gateway)


def test_escaped_lone_surrogate_in_the_name(gateway: Gateway) -> None:
    body = b'{"model": "x\\ud800y", "messages": []}'
    status, headers, answer = send_raw(gateway.http_port, post(b"/v1/chat/completions", body=body))
    assert_json_client_error(status, headers, answer, 404)


def test_valid_json_nested_fifty_levels_is_routed(gateway: Gateway) -> None:
    """njs 0.7.9's JSON.parse refused this as "not valid JSON"; the router reads it by its brackets."""
    nest = '{"a": ' * 50 + '"x"' + "}" * 50
    body = ('{"model": "chat-small", "messages": [{"role": "user", "content": "hi"}], "a": ' + nest + "}").encode()
    status, headers, answer = send_raw(gateway.http_port, post(b"/v1/chat/completions", body=body))
    assert status == 200, answer[:300]
    assert headers["x-backend-model"] == "chat-small"


def test_long_name_is_cut_in_the_message(gateway: Gateway) -> None:
    body = ('{"model": "' + "n" * 5000 + '"}').encode()
    status, headers, answer = send_raw(gateway.http_port, post(b"/v1/chat/completions", body=body))
    error = assert_json_client_error(status, headers, answer, 404)
    assert len(str(error["message"])) < 400

"""The njs multipart reader (roles/gateway/files/multipart.js), through a real nginx.

A one-location nginx runs the role's module behind tests/nginx/njs/multipart_probe.js,
which answers what the reader found for a part name. Bodies are built byte by byte
here, so every boundary spelling, line end and cut is exactly the one under test.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from gateway_lab import NJS_MODULE, ROLE, free_port, nginx_missing, start_nginx, stop, write_nginx_conf

PROBE = Path(__file__).resolve().parent / "njs" / "multipart_probe.js"


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of an nginx whose /parse runs the reader on the request body."""
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("multipart")
    shutil.copy(ROLE / "files" / "multipart.js", root / "multipart.js")
    shutil.copy(PROBE, root / "multipart_probe.js")
    port = free_port()
    conf = write_nginx_conf(root, f"""
    js_path "{root}/";
    js_import probe from multipart_probe.js;
    client_max_body_size 32m;
    client_body_buffer_size 32m;
    access_log off;
    server {{
        listen 127.0.0.1:{port};
        location = /parse {{ js_content probe.parse; }}
    }}""")
    conf.write_text(f"load_module {NJS_MODULE};\n" + conf.read_text())
    proc = start_nginx(conf, port)
    yield port
    stop(proc)


def parse(port: int, body: bytes, content_type: str, name: str, limit: int = 65536) -> dict[str, Any]:
    """What the reader finds of part `name` in `body`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", f"/parse?name={name}&limit={limit}", body=body, headers={"Content-Type": content_type})
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    assert reply.status == 200, data[:300]
    return dict(json.loads(data))


def form(boundary: str, parts: list[tuple[str, bytes]], eol: bytes = b"\r\n", extra: bytes = b"") -> bytes:
    """A form of (name, value) parts, each part's headers followed by `extra` header lines."""
    delim = b"--" + boundary.encode()
    out = b""
    for name, value in parts:
        out += delim + eol + b'Content-Disposition: form-data; name="' + name.encode() + b'"' + eol + extra + eol
        out += value + eol
    return out + delim + b"--" + eol


ENTRIES = b'{"clip":{"textual":{"modelName":"ViT-B-32__openai"}}}'
# The smart-search request Immich's server sent, as captured (seed document 003).
CAPTURED = (b"------formdata-undici-043847285935\r\n"
            b'Content-Disposition: form-data; name="entries"\r\n\r\n'
            + ENTRIES + b"\r\n"
            b"------formdata-undici-043847285935\r\n"
            b'Content-Disposition: form-data; name="text"\r\n\r\n'
            b"cat\r\n"
            b"------formdata-undici-043847285935--\r\n")
CAPTURED_TYPE = "multipart/form-data; boundary=----formdata-undici-043847285935"


def test_the_captured_immich_request(reader: int) -> None:
    found = parse(reader, CAPTURED, CAPTURED_TYPE, "entries")
    assert found == {"boundary": "----formdata-undici-043847285935", "found": True, "value": ENTRIES.decode(),
                     "length": len(ENTRIES)}
    assert parse(reader, CAPTURED, CAPTURED_TYPE, "text")["value"] == "cat"
    assert parse(reader, CAPTURED, CAPTURED_TYPE, "model") == {"boundary": "----formdata-undici-043847285935",
                                                                "found": False}


@pytest.mark.parametrize(("content_type", "boundary"), [
    ('multipart/form-data; boundary="a b:c?d=e"', "a b:c?d=e"),
    ("multipart/form-data; boundary=\"quoted\\\"\"", None),  # a quote is no boundary character
    ("Multipart/Form-Data;boundary=x'()+_,-./:=?", "x'()+_,-./:=?"),
    ('multipart/form-data; charset=utf-8; boundary="' + "z" * 70 + '"', "z" * 70),
    ("multipart/form-data; boundary=" + "z" * 71, None),
    ("multipart/form-data; boundary=\"ends with space \"", None),
    ("multipart/form-data", None),
    ("multipart/mixed; boundary=abc", None),
    ("application/json", None),
])
def test_boundaries_quoted_and_with_odd_characters(reader: int, content_type: str, boundary: str | None) -> None:
    body = form(boundary or "abc", [("model", b"whisper-1")])
    found = parse(reader, body, content_type, "model")
    assert found["boundary"] == boundary
    if boundary is not None:
        assert found["value"] == "whisper-1"


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
@pytest.mark.parametrize("order", ["first", "last"])
def test_line_ends_and_order_of_the_parts(reader: int, eol: bytes, order: str) -> None:
    image = os.urandom(256 * 1024) + b"\r\n--not-the-boundary\r\n"
    parts = [("entries", ENTRIES), ("image", image)]
    body = form("XyZ", parts if order == "first" else parts[::-1], eol)
    assert parse(reader, body, "multipart/form-data; boundary=XyZ", "entries")["value"] == ENTRIES.decode()
    assert parse(reader, body, "multipart/form-data; boundary=XyZ", "image", 1 << 20)["length"] == len(image)


def test_parts_with_extra_headers_folded_lines_and_a_preamble(reader: int) -> None:
    body = (b"a preamble, ignored\r\n--b1\r\n"
            b"Content-Type: application/json\r\n"
            b"content-disposition:form-data;\r\n\tname=\"entries\"; filename=\"e.json\"\r\n"
            b"X-Extra: 1\r\n\r\n" + ENTRIES + b"\r\n--b1  \r\n"
            b"Content-Disposition: form-data; filename=\"name=model\"; name=model\r\n\r\nwhisper-1\r\n--b1--")
    assert parse(reader, body, "multipart/form-data; boundary=b1", "entries")["value"] == ENTRIES.decode()
    # "filename" is not "name"; the unquoted name is.
    assert parse(reader, body, "multipart/form-data; boundary=b1", "model")["value"] == "whisper-1"


def test_the_first_part_of_a_name_counts_and_nothing_after_it_is_read(reader: int) -> None:
    body = form("b", [("model", b"first"), ("file", b"x" * 1000), ("model", b"second")])
    assert parse(reader, body, "multipart/form-data; boundary=b", "model")["value"] == "first"
    # What follows the part is the backend's to read: even a body cut short there.
    assert parse(reader, body[:-40], "multipart/form-data; boundary=b", "model")["value"] == "first"


def test_a_boundary_inside_content_that_is_not_a_delimiter_line(reader: int) -> None:
    tricky = b"--b is here\r\nand --b\r\nnot at a line start: x--b\r\n"
    body = form("b", [("file", b"abc--bdef"), ("model", b"m1")])
    assert parse(reader, body, "multipart/form-data; boundary=b", "model")["value"] == "m1"
    body = form("b", [("model", tricky.replace(b"\r\n--b\r\n", b"\r\n-b\r\n"))])
    assert parse(reader, body, "multipart/form-data; boundary=b", "model")["found"] is True


def test_an_empty_value(reader: int) -> None:
    body = form("b", [("model", b""), ("file", b"123")])
    assert parse(reader, body, "multipart/form-data; boundary=b", "model") == {"boundary": "b", "found": True,
                                                                              "value": "", "length": 0}


def test_a_part_larger_than_the_gateway_reads(reader: int) -> None:
    body = form("b", [("file", b"f" * 100), ("entries", b"e" * 70_000)])
    found = parse(reader, body, "multipart/form-data; boundary=b", "entries", limit=65536)
    assert found["error"] == "part_too_large", found
    assert "65536" in found["message"]
    # A big part of another name is skipped, whatever its size.
    body = form("b", [("file", os.urandom(20 * 1024 * 1024)), ("entries", ENTRIES)])
    assert parse(reader, body, "multipart/form-data; boundary=b", "entries")["value"] == ENTRIES.decode()


@pytest.mark.parametrize("cut", [
    pytest.param(lambda body: body[:-6], id="no-closing-delimiter"),
    pytest.param(lambda body: body[:body.index(b"whisper-1") + 9], id="right-after-the-wanted-value"),
    pytest.param(lambda body: body[:body.index(b"whisper") + 3], id="inside-the-wanted-part"),
    pytest.param(lambda body: body[:body.index(b"\r\n\r\n")], id="inside-headers"),
    pytest.param(lambda body: body[:body.index(b"\r\n\r\n", 60) + 2], id="inside-later-headers"),
])
def test_a_body_cut_short(reader: int, cut: Any) -> None:
    body = cut(form("b", [("file", b"x" * 50), ("model", b"whisper-1")]))
    found = parse(reader, body, "multipart/form-data; boundary=b", "model")
    assert found["error"] == "invalid_body", found


@pytest.mark.parametrize("body", [
    pytest.param(b"no boundary at all", id="no-delimiter"),
    pytest.param(b"--bXYZ\r\n\r\n", id="delimiter-runs-on"),
    pytest.param(b"--b junk\r\nContent-Disposition: form-data; name=model\r\n\r\nm\r\n--b--", id="junk-after-delimiter"),
    pytest.param(b"--b\r\n" + b"X-Long: " + b"h" * 9000 + b"\r\n\r\nv\r\n--b--", id="headers-too-long"),
])
def test_bodies_that_are_not_multipart_as_announced(reader: int, body: bytes) -> None:
    found = parse(reader, body, "multipart/form-data; boundary=b", "model")
    assert found.get("error") == "invalid_body" or found.get("found") is False, found
    assert "value" not in found


BOUNDARY_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'()+_,-./:=?"


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(boundary=st.text(BOUNDARY_CHARS, min_size=1, max_size=70),
       before=st.lists(st.tuples(st.sampled_from(["file", "text", "model2", "Model"]),
                                 st.binary(max_size=300)), max_size=3),
       value=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=80),
       after=st.lists(st.binary(max_size=300), max_size=2),
       eol=st.sampled_from([b"\r\n", b"\n"]))
def test_generated_forms_give_the_first_model_part(reader: int, boundary: str, before: list[tuple[str, bytes]],
                                                   value: str, after: list[bytes], eol: bytes) -> None:
    """Whatever the boundary, the line ends and the bytes around it, the first "model" part is found."""
    delim = b"--" + boundary.encode()
    def without_delimiter(data: bytes) -> bytes:
        # Content never holds the delimiter (a sender picks a boundary that is not in its parts).
        while delim in data:
            data = data.replace(delim, b"")
        return data

    parts = [(name, without_delimiter(data)) for name, data in before]
    parts.append(("model", value.encode()))
    parts += [("model", without_delimiter(data)) for data in after]
    body = form(boundary, parts, eol)
    found = parse(reader, body, f'multipart/form-data; boundary="{boundary}"', "model")
    assert (found["boundary"], found.get("value")) == (boundary, value), found

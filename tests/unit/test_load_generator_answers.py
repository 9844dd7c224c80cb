"""The load generator's reading of answers (tests/support/load_generator.py), over a fake socket.

http.client parses the bytes as it would a server's, chunked encoding included, so these
are the generator's verdicts on exactly what a gateway could send.
"""

from __future__ import annotations

import http.client
import io

import pytest
from load_generator import Counts, PhaseResult, Workload, error_of, read_sse

DONE = b"data: [DONE]\n\n"
EVENT = b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'


class FakeSocket:
    """What HTTPResponse reads from: the bytes given, then EOF (the peer closed)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, _mode: str, *_args: object, **_kwargs: object) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self.data))  # type: ignore[arg-type]


def chunked(*chunks: bytes, end: bool = True) -> bytes:
    body = b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks)
    return body + (b"0\r\n\r\n" if end else b"")


def response(body: bytes) -> http.client.HTTPResponse:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply = http.client.HTTPResponse(FakeSocket(head + body))  # type: ignore[arg-type]
    reply.begin()
    return reply


def test_a_whole_stream_is_done() -> None:
    result = read_sse(response(chunked(EVENT, EVENT, b": comment\n\n", DONE)))
    assert (result.done, result.events, result.error, result.cut) == (True, 2, None, False)


def test_events_split_across_chunks_are_read_whole() -> None:
    result = read_sse(response(chunked(EVENT[:10], EVENT[10:] + DONE[:4], DONE[4:])))
    assert (result.done, result.events) == (True, 1)


def test_a_stream_that_ends_without_done_is_cut() -> None:
    result = read_sse(response(chunked(EVENT, EVENT)))
    assert (result.done, result.cut, result.events) == (False, True, 2)
    assert result.error == "stream ended after 2 events without [DONE]"


def test_a_connection_lost_inside_a_chunk_is_cut() -> None:
    result = read_sse(response(chunked(EVENT, end=False) + b"40\r\ndata: {"))
    assert (result.done, result.cut, result.events) == (False, True, 1)
    assert result.error is not None and result.error.startswith("stream broke off after 1 events: IncompleteRead")


def test_an_event_that_is_not_json_or_is_an_error_fails_without_a_cut() -> None:
    garbled = read_sse(response(chunked(EVENT, b"data: {nope\n\n", DONE)))
    assert (garbled.done, garbled.cut) == (False, False)
    assert garbled.error == "event 2 is not JSON: b'{nope'"
    error = read_sse(response(chunked(b'data: {"error": {"message": "overloaded", "code": 503}}\n\n', DONE)))
    assert (error.done, error.cut) == (False, False)
    assert error.error is not None and "overloaded" in error.error


def test_error_bodies_give_their_code_or_their_start() -> None:
    assert error_of(b'{"error": {"message": "m", "code": "model_not_found"}}') == ("model_not_found", "m")
    assert error_of(b"<html>502</html>") == (None, "<html>502</html>")


def test_workloads_are_checked_and_their_bodies_are_json() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        Workload("rerank", "m")
    with pytest.raises(ValueError, match="concurrency"):
        Workload("chat", "m", concurrency=0)
    assert b'"stream": true' in Workload("stream", "m").body()
    assert b'"input"' in Workload("embeddings", "m").body()


def test_totals_sum_kinds_and_unfinished_is_what_has_no_outcome() -> None:
    phase = PhaseResult("p", 0.0, by_kind={"chat": Counts(sent=5, ok=3, failed=1), "stream": Counts(sent=2, ok=2)})
    assert phase.total() == Counts(sent=7, ok=5, failed=1)
    assert phase.total(["chat"]).unfinished == 1
    assert phase.kind("embeddings") == Counts()

"""Tests of the OpenAI-compatible test backend (tests/backend/llm_test_backend.py).

The backend runs as a real process on 127.0.0.1, as it does on lab hosts, and is
spoken to over HTTP: the gateway tests rely on its wire format, so that is what is
checked here. LLM_TEST_BACKEND_PYTHON picks another interpreter (e.g. python3.13).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from http_reply import Reply, exchange

BACKEND = Path(__file__).resolve().parents[2] / "tests" / "backend" / "llm_test_backend.py"
PYTHON = os.environ.get("LLM_TEST_BACKEND_PYTHON", sys.executable)


@dataclass
class Backend:
    """A running backend process and how to talk to it."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def connect(self, timeout: float = 10) -> http.client.HTTPConnection:
        """A fresh keep-alive connection."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None) -> Reply:
        """One request on its own connection; `body` is sent as JSON, `raw` as is."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        return exchange(self.connect(), method, path, data, headers or {})

    def behave(self, **behaviour: Any) -> None:
        """Set the injected fault."""
        assert self.request("POST", "/_test/behaviour", behaviour).status == 200

    def stop(self) -> int:
        """SIGTERM and wait: the exit code says whether shutdown was clean."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=5)


def start_backend(log: Path, *args: str, env: dict[str, str | None] | None = None) -> Backend:
    """Start on a free port (--port 0) and learn the port from the startup line, so no race.

    `env` changes this process's environment for the backend (which reads its key from there);
    a None value removes the variable.
    """
    environment = {**os.environ, **(env or {})}
    with log.open("wb") as stderr:
        proc = subprocess.Popen([PYTHON, str(BACKEND), "--host", "127.0.0.1", "--port", "0", *args],
                                stdout=subprocess.DEVNULL, stderr=stderr,
                                env={key: value for key, value in environment.items() if value is not None})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
        if match:
            return Backend(proc, int(match.group(1)), log)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"backend did not start:\n{log.read_text()}")


@pytest.fixture(name="backend", scope="module")
def fixture_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """One backend for the module; serving `chat-small` with alias `gpt-4o-mini`."""
    log = tmp_path_factory.mktemp("backend") / "stderr.log"
    backend = start_backend(log, "--model", "chat-small", "gpt-4o-mini", "--stream-interval", "0.05")
    yield backend
    if backend.proc.poll() is None:
        backend.proc.kill()


@pytest.fixture(autouse=True)
def fresh_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts with no recorded requests and no fault."""
    if "backend" not in request.fixturenames:
        yield
        return
    backend: Backend = request.getfixturevalue("backend")
    backend.request("DELETE", "/_test/requests")
    backend.behave(mode="ok")
    yield
    backend.behave(mode="ok")


def assert_backend_headers(reply: Reply, backend: Backend) -> None:
    """Every response names who served it."""
    assert reply.headers["X-Backend-Port"] == str(backend.port)
    assert reply.headers["X-Backend-Model"] == "chat-small"
    assert reply.headers["X-Backend-Host"]


def chat_body(**extra: Any) -> dict[str, Any]:
    """A minimal chat request."""
    return {"model": "chat-small", "messages": [{"role": "user", "content": "hello there"}], **extra}


# --- plain endpoints ------------------------------------------------------------------------


def test_health_is_empty_200(backend: Backend) -> None:
    reply = backend.request("GET", "/health")
    assert (reply.status, reply.body, reply.headers["Content-Length"]) == (200, b"", "0")
    assert_backend_headers(reply, backend)


def test_models_lists_every_served_name(backend: Backend) -> None:
    reply = backend.request("GET", "/v1/models")
    assert reply.status == 200
    body = reply.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["chat-small", "gpt-4o-mini"]
    assert all(m["object"] == "model" for m in body["data"])


def test_chat_completion(backend: Backend) -> None:
    reply = backend.request("POST", "/v1/chat/completions", chat_body(model="gpt-4o-mini", max_tokens=3),
                            headers={"X-Request-ID": "req-123", "Content-Type": "application/json"})
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.headers["X-Request-ID"] == "req-123"
    assert_backend_headers(reply, backend)
    body = reply.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-4o-mini", "the alias the client sent is echoed, as vLLM does"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].count("[") == 3
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert body["backend"] == {"host": reply.headers["X-Backend-Host"], "port": backend.port,
                               "model": "chat-small", "path": "/v1/chat/completions"}


def test_completion(backend: Backend) -> None:
    reply = backend.request("POST", "/v1/completions", {"model": "chat-small", "prompt": "once upon"})
    body = reply.json()
    assert reply.status == 200
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"].count("[") == 5, "5 pieces without max_tokens"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 2


def test_embeddings_are_deterministic_unit_vectors(backend: Backend) -> None:
    one = backend.request("POST", "/v1/embeddings", {"model": "chat-small", "input": "alpha"}).json()
    many = backend.request("POST", "/v1/embeddings", {"model": "chat-small", "input": ["beta", "alpha"]}).json()
    assert one["object"] == "list" and one["data"][0]["object"] == "embedding"
    vector = one["data"][0]["embedding"]
    assert len(vector) == 8
    assert math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-9)
    assert [d["index"] for d in many["data"]] == [0, 1]
    assert many["data"][1]["embedding"] == vector, "same input, same vector"
    assert many["data"][0]["embedding"] != vector
    assert many["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


def test_embeddings_base64_matches_floats(backend: Backend) -> None:
    floats = backend.request("POST", "/v1/embeddings", {"model": "chat-small", "input": "x"}).json()
    b64 = backend.request("POST", "/v1/embeddings",
                          {"model": "chat-small", "input": "x", "encoding_format": "base64"}).json()
    decoded = struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(decoded, floats["data"][0]["embedding"]))


def test_rerank_orders_by_relevance(backend: Backend) -> None:
    body = {"model": "chat-small", "query": "capital of france",
            "documents": ["bananas are yellow", "paris is the capital of france", "the capital of spain"],
            "top_n": 2, "return_documents": True}
    reply = backend.request("POST", "/v1/rerank", body)
    assert reply.status == 200
    results = reply.json()["results"]
    assert [r["index"] for r in results] == [1, 2]
    assert results[0]["relevance_score"] > results[1]["relevance_score"]
    assert results[0]["document"] == "paris is the capital of france"


# --- vLLM's other paths: responses and score under the prefix, the tokenizer at the root ------

# One valid request per new path, for the checks every path must pass alike.
VLLM_PATHS = {
    "/v1/responses": {"model": "chat-small", "input": "hello there"},
    "/v1/score": {"model": "chat-small", "text_1": "capital of france", "text_2": "paris"},
    "/tokenize": {"model": "chat-small", "prompt": "hello there"},
    "/detokenize": {"model": "chat-small", "tokens": [104, 105]},
}


def test_responses_answers_one_assistant_message(backend: Backend) -> None:
    body = {"model": "gpt-4o-mini", "input": "hello there", "instructions": "be brief", "max_output_tokens": 3}
    reply = backend.request("POST", "/v1/responses", body)
    assert reply.status == 200
    assert_backend_headers(reply, backend)
    answer = reply.json()
    assert answer["object"] == "response" and answer["id"].startswith("resp_")
    assert answer["model"] == "gpt-4o-mini", "the alias the client sent is echoed"
    assert isinstance(answer["created_at"], int)
    [message] = answer["output"]
    assert (message["type"], message["role"]) == ("message", "assistant")
    [content] = message["content"]
    assert content["type"] == "output_text" and content["text"].count("[") == 3
    assert (answer["status"], answer["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert answer["usage"]["input_tokens"] == 4 and answer["usage"]["output_tokens"] == 3
    assert answer["usage"]["total_tokens"] == 7
    assert answer["backend"]["path"] == "/v1/responses"


def test_responses_without_a_limit_is_complete_and_takes_input_items(backend: Backend) -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "one two three"}]}]
    answer = backend.request("POST", "/v1/responses", {"model": "chat-small", "input": items}).json()
    assert (answer["status"], answer["incomplete_details"]) == ("completed", None)
    assert answer["output"][0]["content"][0]["text"].count("[") == 5
    assert answer["usage"]["input_tokens"] == 3


def test_score_one_text_against_many_keeps_input_order(backend: Backend) -> None:
    body = {"model": "chat-small", "text_1": "capital of france",
            "text_2": ["bananas are yellow", "paris is the capital of france"]}
    reply = backend.request("POST", "/v1/score", body)
    assert reply.status == 200
    assert_backend_headers(reply, backend)
    answer = reply.json()
    assert answer["object"] == "list" and answer["model"] == "chat-small" and answer["id"].startswith("score-")
    assert [(d["index"], d["object"]) for d in answer["data"]] == [(0, "score"), (1, "score")]
    assert all(isinstance(d["score"], float) for d in answer["data"])
    assert answer["data"][1]["score"] > answer["data"][0]["score"], "the relevant text scores higher"
    tokens = 3 * 2 + 3 + 6  # text_1 once per pair, then each text_2, one token a word
    assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_score_pairs_lists_and_refuses_mismatched_lengths(backend: Backend) -> None:
    pairs = backend.request("POST", "/v1/score", {"model": "chat-small", "text_1": ["a b", "c"],
                                                  "text_2": ["a", "d"]}).json()
    assert [d["index"] for d in pairs["data"]] == [0, 1]
    assert pairs["data"][0]["score"] > pairs["data"][1]["score"], "pair by pair, not all against all"
    single = backend.request("POST", "/v1/score", {"model": "chat-small", "text_1": "a b", "text_2": "a"}).json()
    assert single["data"][0]["score"] == pairs["data"][0]["score"], "a string is a list of one"
    reply = backend.request("POST", "/v1/score", {"model": "chat-small", "text_1": ["a", "b"],
                                                  "text_2": ["a", "b", "c"]})
    assert reply.status == 400 and reply.json()["error"]["param"] == "text_1"


def test_tokenize_then_detokenize_gives_the_prompt_back(backend: Backend) -> None:
    prompt = "héllo  wörld ✓"
    reply = backend.request("POST", "/tokenize", {"model": "gpt-4o-mini", "prompt": prompt})
    assert reply.status == 200
    assert_backend_headers(reply, backend)
    answer = reply.json()
    assert answer["tokens"] and all(isinstance(t, int) for t in answer["tokens"])
    assert answer["count"] == len(answer["tokens"])
    assert isinstance(answer["max_model_len"], int) and answer["max_model_len"] > answer["count"]
    assert answer["token_strs"] is None, "only when return_token_strs is set, as in vLLM"
    again = backend.request("POST", "/tokenize", {"model": "chat-small", "prompt": prompt}).json()
    assert again["tokens"] == answer["tokens"], "deterministic"
    back = backend.request("POST", "/detokenize", {"model": "chat-small", "tokens": answer["tokens"]})
    assert back.status == 200
    assert_backend_headers(back, backend)
    assert back.json()["prompt"] == prompt


def test_tokenize_messages_goes_through_a_chat_template(backend: Backend) -> None:
    body = {"model": "chat-small", "messages": [{"role": "user", "content": "hi"}], "return_token_strs": True}
    answer = backend.request("POST", "/tokenize", body).json()
    text = backend.request("POST", "/detokenize", {"model": "chat-small", "tokens": answer["tokens"]}).json()
    assert text["prompt"] == "user: hi\nassistant: "
    assert "".join(answer["token_strs"]) == text["prompt"]
    bare = backend.request("POST", "/tokenize", {**body, "add_generation_prompt": False}).json()
    assert bare["count"] == len("user: hi\n")


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {"model": "chat-small"}, "prompt"),
    ("/tokenize", {"model": "chat-small", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ("/detokenize", {"model": "chat-small", "tokens": [104, 256]}, "tokens"),
    ("/detokenize", {"model": "chat-small", "tokens": "104"}, "tokens"),
    ("/v1/score", {"model": "chat-small", "text_1": "x", "text_2": []}, "text_2"),
    ("/v1/responses", {"model": "chat-small"}, "input"),
    ("/v1/responses", {"model": "chat-small", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ("/v1/responses", {"model": "chat-small", "input": "x", "stream": True}, "stream"),
], ids=["tokenize-nothing", "tokenize-both", "detokenize-out-of-vocabulary", "detokenize-not-a-list",
        "score-empty", "responses-no-input", "responses-zero-limit", "responses-stream"])
def test_invalid_vllm_requests_are_400(backend: Backend, path: str, body: dict[str, Any], param: str) -> None:
    reply = backend.request("POST", path, body)
    assert reply.status == 400
    assert reply.json()["error"]["param"] == param


@pytest.mark.parametrize("path", VLLM_PATHS)
def test_vllm_paths_answer_only_for_served_models(backend: Backend, path: str) -> None:
    reply = backend.request("POST", path, {**VLLM_PATHS[path], "model": "gpt-5"}, headers={"X-Request-ID": "v404"})
    assert reply.status == 404
    error = reply.json()["error"]
    assert (error["code"], error["param"], error["type"]) == ("model_not_found", "model", "NotFoundError")
    assert "gpt-5" in error["message"]
    assert reply.headers["X-Request-ID"] == "v404"
    assert_backend_headers(reply, backend)


@pytest.mark.parametrize(("wrong", "right"), [("/v1/tokenize", "/tokenize"), ("/v1/detokenize", "/detokenize"),
                                             ("/score", "/v1/score"), ("/responses", "/v1/responses")])
def test_tokenizer_is_at_the_root_and_the_rest_under_the_prefix(backend: Backend, wrong: str, right: str) -> None:
    reply = backend.request("POST", wrong, VLLM_PATHS[right])
    assert (reply.status, reply.json()["error"]["code"]) == (404, "not_found")
    assert backend.request("GET", right).status == 405, "the path exists, for POST only"


@pytest.mark.parametrize("path", VLLM_PATHS)
def test_vllm_paths_are_recorded_with_body_hash(backend: Backend, path: str) -> None:
    raw = json.dumps({**VLLM_PATHS[path], "model": "gpt-4o-mini"}).encode()
    reply = backend.request("POST", path, raw=raw, headers={"X-Request-ID": "vrec"})
    assert reply.status == 200
    assert reply.json()["backend"] == {"host": reply.headers["X-Backend-Host"], "port": backend.port,
                                       "model": "chat-small", "path": path}
    [record] = backend.request("GET", "/_test/requests").json()
    assert (record["method"], record["path"], record["model"], record["request_id"]) == \
        ("POST", path, "gpt-4o-mini", "vrec")
    assert (record["body_length"], record["body_sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())


@pytest.mark.parametrize("path", VLLM_PATHS)
def test_vllm_paths_obey_the_injected_behaviour(backend: Backend, path: str) -> None:
    backend.behave(mode="fail", status=503)
    reply = backend.request("POST", path, VLLM_PATHS[path])
    assert (reply.status, reply.json()["error"]["code"]) == (503, "injected_failure")
    assert_backend_headers(reply, backend)
    backend.behave(mode="slow", delay=0.3)
    started = time.monotonic()
    assert backend.request("POST", path, VLLM_PATHS[path]).status == 200
    assert time.monotonic() - started >= 0.3
    assert len(backend.request("GET", "/_test/requests").json()) == 2, "the failed attempt is recorded too"


# --- errors ---------------------------------------------------------------------------------


def test_unknown_model_is_404_model_not_found(backend: Backend) -> None:
    reply = backend.request("POST", "/v1/chat/completions", chat_body(model="gpt-5"),
                            headers={"X-Request-ID": "r404"})
    assert reply.status == 404
    error = reply.json()["error"]
    assert error["code"] == "model_not_found"
    assert "gpt-5" in error["message"] and error["type"] and "param" in error
    assert reply.headers["X-Request-ID"] == "r404"
    assert_backend_headers(reply, backend)


def test_invalid_json_is_400(backend: Backend) -> None:
    reply = backend.request("POST", "/v1/chat/completions", raw=b"{not json")
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "invalid_json"


def test_unknown_path_and_wrong_method(backend: Backend) -> None:
    assert backend.request("POST", "/v2/chat/completions", chat_body()).status == 404
    assert backend.request("POST", "/embeddings", chat_body()).status == 404, "prefix is /v1 here"
    assert backend.request("GET", "/v1/chat/completions").status == 405


def test_keep_alive_serves_several_requests_on_one_connection(backend: Backend) -> None:
    conn = backend.connect()
    try:
        sockets = []
        for _ in range(3):
            conn.request("POST", "/v1/embeddings", body=json.dumps({"model": "chat-small", "input": "k"}))
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("Content-Length")
            response.read()
            sockets.append(conn.sock)
        assert sockets[0] is not None and sockets.count(sockets[0]) == 3
    finally:
        conn.close()


# --- streaming ------------------------------------------------------------------------------


def read_sse(backend: Backend, path: str, body: dict[str, Any],
             headers: dict[str, str] | None = None) -> tuple[http.client.HTTPResponse, list[tuple[float, str]]]:
    """Read an SSE stream event by event, noting when each `data:` line arrived."""
    conn = backend.connect()
    started = time.monotonic()
    conn.request("POST", path, body=json.dumps(body), headers=headers or {})
    response = conn.getresponse()
    events = []
    while line := response.readline():
        if line.startswith(b"data: "):
            events.append((time.monotonic() - started, line[6:].decode().strip()))
    conn.close()
    return response, events


def test_chat_stream_is_paced_sse_like_vllm(backend: Backend) -> None:
    response, events = read_sse(backend, "/v1/chat/completions", chat_body(stream=True, max_tokens=4),
                                headers={"X-Test-Stream-Interval": "0.2", "X-Request-ID": "s1"})
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("X-Accel-Buffering") is None, "vLLM sends none; the gateway must cope"
    assert response.getheader("X-Request-ID") == "s1"
    assert response.getheader("X-Backend-Port") == str(backend.port)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    content = [(t, c) for (t, _), c in zip(events, chunks) if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == 4
    assert [c["choices"][0]["delta"]["content"].split()[0] for _, c in content] == ["[0", "[1", "[2", "[3"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    first, last = content[0][0], content[-1][0]
    assert first < 0.4, f"first chunk came after {first:.2f}s: the stream is buffered"
    assert last - first >= 0.55, f"3 gaps of 0.2s took only {last - first:.2f}s"


def test_completion_stream_uses_server_interval_and_include_usage(backend: Backend) -> None:
    response, events = read_sse(backend, "/v1/completions",
                                {"model": "gpt-4o-mini", "prompt": "hi", "stream": True,
                                 "stream_options": {"include_usage": True}})
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert response.status == 200 and events[-1][1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in chunks)
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["text"]) == 5
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert events[-2][0] - events[0][0] >= 4 * 0.05 * 0.9, "--stream-interval 0.05 between 5 pieces"


def test_bad_stream_interval_header_is_400(backend: Backend) -> None:
    reply = backend.request("POST", "/v1/chat/completions", chat_body(stream=True),
                            headers={"X-Test-Stream-Interval": "soon"})
    assert reply.status == 400


# --- recording and behaviour ----------------------------------------------------------------


def test_requests_are_recorded_with_body_hash(backend: Backend) -> None:
    raw = json.dumps(chat_body(model="gpt-4o-mini")).encode()
    backend.request("POST", "/v1/chat/completions", raw=raw, headers={"X-Request-ID": "rec-1"})
    backend.request("POST", "/v1/chat/completions", raw=b"garbage")
    backend.request("GET", "/health")
    records = backend.request("GET", "/_test/requests").json()
    assert [r["path"] for r in records] == ["/v1/chat/completions", "/v1/chat/completions", "/health"], \
        "/_test calls are not recorded"
    first = records[0]
    assert first["method"] == "POST"
    assert first["body_length"] == len(raw)
    assert first["body_sha256"] == hashlib.sha256(raw).hexdigest()
    assert first["model"] == "gpt-4o-mini"
    assert first["request_id"] == "rec-1"
    assert isinstance(first["timestamp"], float)
    assert records[1]["model"] is None and records[1]["body_sha256"] == hashlib.sha256(b"garbage").hexdigest()
    assert backend.request("DELETE", "/_test/requests").status == 200
    assert backend.request("GET", "/_test/requests").json() == []


def test_behaviour_fail_answers_error_but_records_the_request(backend: Backend) -> None:
    backend.behave(mode="fail", status=503)
    assert backend.request("GET", "/_test/behaviour").json() == {"mode": "fail", "status": 503, "delay": 2.0}
    reply = backend.request("POST", "/v1/chat/completions", chat_body())
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "injected_failure"
    assert_backend_headers(reply, backend)
    assert backend.request("GET", "/health").status == 503
    assert len(backend.request("GET", "/_test/requests").json()) == 2, "/_test paths still work"


def test_behaviour_fail_defaults_to_500(backend: Backend) -> None:
    backend.behave(mode="fail")
    assert backend.request("GET", "/health").status == 500


def test_behaviour_slow_delays_the_answer(backend: Backend) -> None:
    backend.behave(mode="slow", delay=0.3)
    started = time.monotonic()
    assert backend.request("GET", "/health").status == 200
    assert time.monotonic() - started >= 0.3


def test_behaviour_hang_holds_requests_until_mode_changes(backend: Backend) -> None:
    backend.behave(mode="hang")
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(backend.request("GET", "/health").status))
    worker.start()
    worker.join(0.4)
    assert worker.is_alive() and not result, "a hung backend must not answer"
    backend.behave(mode="ok")
    worker.join(2)
    assert result == [200]


@pytest.mark.parametrize("bad", [{"mode": "explode"}, {"mode": "fail", "status": 200}, {"mode": "slow", "delay": -1},
                                 ["fail"]])
def test_invalid_behaviour_is_refused(backend: Backend, bad: Any) -> None:
    assert backend.request("POST", "/_test/behaviour", bad).status == 400
    assert backend.request("GET", "/_test/behaviour").json()["mode"] == "ok"


# --- a second instance: no prefix, and shutdown ------------------------------------------------


def test_empty_prefix_and_clean_sigterm_even_while_hanging(tmp_path: Path) -> None:
    backend = start_backend(tmp_path / "stderr.log", "--model", "embed-small", "text-embedding-3-small",
                            "--api-prefix", "")
    try:
        reply = backend.request("POST", "/embeddings", {"model": "text-embedding-3-small", "input": "x"})
        assert reply.status == 200 and reply.headers["X-Backend-Model"] == "embed-small"
        assert backend.request("GET", "/models").status == 200
        assert backend.request("POST", "/v1/embeddings", {"model": "embed-small", "input": "x"}).status == 404
        score = {"model": "embed-small", "text_1": "x", "text_2": "x"}
        assert backend.request("POST", "/score", score).status == 200, "score follows the prefix"
        assert backend.request("POST", "/tokenize", {"model": "embed-small", "prompt": "x"}).status == 200
        backend.behave(mode="hang")

        def hanging_request() -> None:
            with contextlib.suppress(OSError):  # the stop may cut it: that is the point
                backend.request("GET", "/health")

        threading.Thread(target=hanging_request, daemon=True).start()
        time.sleep(0.2)
        assert backend.stop() == 0
        log = backend.log.read_text()
        assert "POST /embeddings 200" in log and "model=text-embedding-3-small" in log, "one line per request"
    finally:
        if backend.proc.poll() is None:
            backend.proc.kill()


# --- API key (--api-key-env) ------------------------------------------------------------------
# Like vLLM's --api-key: the API under the prefix needs `Authorization: Bearer <key>`, the root
# paths and the test API do not. The key comes from the environment variable the option names.

KEY = "Lw8Tq3Zr6Yn1Vb4Xc7Mk2Hj5Gf9Ds0Pa3Eu6Io8Qy1Rt4We7S"
BEARER = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(name="keyed", scope="module")
def fixture_keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """A backend that needs KEY, read from LLM_API_KEY as the lab's command models pass it."""
    log = tmp_path_factory.mktemp("keyed") / "stderr.log"
    backend = start_backend(log, "--model", "chat-small", "gpt-4o-mini", "--api-key-env", "LLM_API_KEY",
                            env={"LLM_API_KEY": KEY})
    yield backend
    if backend.proc.poll() is None:
        backend.proc.kill()


def assert_unauthorized(reply: Reply) -> None:
    """OpenAI's answer to a bad key: 401, error JSON the openai client raises AuthenticationError on."""
    assert reply.status == 401, reply.body[:300]
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    error = reply.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "AuthenticationError"
    assert KEY not in reply.body.decode()


PREFIX_REQUESTS = [
    ("POST", "/v1/chat/completions", chat_body()),
    ("POST", "/v1/completions", {"model": "chat-small", "prompt": "hi", "max_tokens": 1}),
    ("POST", "/v1/embeddings", {"model": "chat-small", "input": "hi"}),
    ("GET", "/v1/models", None),
    ("POST", "/v1/no-such-path", {}),
]


@pytest.mark.parametrize(("method", "path", "body"), PREFIX_REQUESTS, ids=[p for _, p, _ in PREFIX_REQUESTS])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key-of-the-right-shape", f"Basic {KEY}",
                                           f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer "],
                         ids=["none", "wrong", "basic", "longer", "shorter", "empty"])
def test_prefix_paths_refuse_a_missing_or_wrong_key(keyed: Backend, method: str, path: str, body: Any,
                                                    authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    assert_unauthorized(keyed.request(method, path, body, headers))


@pytest.mark.parametrize(("method", "path", "body"), PREFIX_REQUESTS[:4], ids=[p for _, p, _ in PREFIX_REQUESTS[:4]])
def test_prefix_paths_answer_with_the_key(keyed: Backend, method: str, path: str, body: Any) -> None:
    assert keyed.request(method, path, body, BEARER).status == 200


def test_the_scheme_is_case_insensitive_and_the_key_is_not(keyed: Backend) -> None:
    assert keyed.request("POST", "/v1/chat/completions", chat_body(), {"Authorization": f"bearer {KEY}"}).status == 200
    assert_unauthorized(keyed.request("POST", "/v1/chat/completions", chat_body(),
                                      {"Authorization": f"Bearer {KEY.lower()}"}))


def test_a_stream_needs_the_key_too(keyed: Backend) -> None:
    assert_unauthorized(keyed.request("POST", "/v1/chat/completions", chat_body(stream=True)))
    reply = keyed.request("POST", "/v1/chat/completions", chat_body(stream=True), BEARER)
    assert reply.status == 200 and b"data: [DONE]" in reply.body


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/health", None),
    ("POST", "/tokenize", {"model": "chat-small", "prompt": "hi"}),
    ("POST", "/detokenize", {"model": "chat-small", "tokens": [104, 105]}),
    ("GET", "/_test/requests", None),
    ("GET", "/_test/behaviour", None),
])
def test_root_paths_and_the_test_api_need_no_key(keyed: Backend, method: str, path: str, body: Any) -> None:
    assert keyed.request(method, path, body).status == 200


def send_raw_headers(backend: Backend, path: str, headers: list[tuple[str, str]], body: bytes) -> int:
    """A POST with headers as given, repeats included (http.client's dict form cannot repeat one)."""
    conn = backend.connect()
    try:
        conn.putrequest("POST", path)
        for name, value in [*headers, ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]:
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_two_authorization_headers_are_refused_even_if_one_is_right(keyed: Backend) -> None:
    body = json.dumps(chat_body()).encode()
    status = send_raw_headers(keyed, "/v1/chat/completions",
                              [("Authorization", "Bearer client-key"), ("Authorization", f"Bearer {KEY}")], body)
    assert status == 401


def test_records_hold_the_headers_received_repeats_kept_and_refused_requests_too(keyed: Backend) -> None:
    keyed.request("DELETE", "/_test/requests")
    body = json.dumps(chat_body()).encode()
    send_raw_headers(keyed, "/v1/chat/completions",
                     [("Authorization", f"Bearer {KEY}"), ("X-Forwarded-For", "10.0.0.1"),
                      ("x-forwarded-for", "10.0.0.2")], body)
    keyed.request("POST", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer client-key"})
    keyed.request("POST", "/v1/chat/completions", chat_body())
    first, wrong, missing = keyed.request("GET", "/_test/requests").json()
    assert first["headers"]["authorization"] == [f"Bearer {KEY}"]
    assert first["headers"]["x-forwarded-for"] == ["10.0.0.1", "10.0.0.2"], "every value, in order"
    assert first["headers"]["content-length"] == [str(len(body))]
    assert wrong["headers"]["authorization"] == ["Bearer client-key"], "what arrived, even when refused"
    assert "authorization" not in missing["headers"]


def test_records_of_an_open_backend_hold_headers_too(backend: Backend) -> None:
    backend.request("DELETE", "/_test/requests")
    backend.request("POST", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer anything", "X-A": "1"})
    [record] = backend.request("GET", "/_test/requests").json()
    assert record["headers"]["authorization"] == ["Bearer anything"] and record["headers"]["x-a"] == ["1"]


def test_the_key_is_not_in_the_log_and_the_startup_line_says_one_is_required(keyed: Backend) -> None:
    log = keyed.log.read_text()
    assert "api_key=required" in log
    assert KEY not in log


def test_empty_prefix_guards_every_api_path_like_infinity(tmp_path: Path) -> None:
    backend = start_backend(tmp_path / "stderr.log", "--model", "embed-small", "--api-prefix", "",
                            "--api-key-env", "INFINITY_API_KEY", env={"INFINITY_API_KEY": KEY})
    try:
        embed = {"model": "embed-small", "input": "x"}
        assert_unauthorized(backend.request("POST", "/embeddings", embed))
        assert_unauthorized(backend.request("GET", "/models"))
        assert backend.request("POST", "/embeddings", embed, BEARER).status == 200
        assert backend.request("GET", "/models", None, BEARER).status == 200
        assert backend.request("GET", "/health").status == 200
    finally:
        backend.proc.kill()


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_a_named_but_unset_or_empty_variable_serves_open(tmp_path: Path, value: str | None) -> None:
    backend = start_backend(tmp_path / "stderr.log", "--model", "m", "--api-key-env", "LLM_API_KEY",
                            env={"LLM_API_KEY": value})
    try:
        assert "api_key=none" in backend.log.read_text()
        assert backend.request("POST", "/v1/chat/completions", {**chat_body(), "model": "m"}).status == 200
    finally:
        backend.proc.kill()


def test_official_openai_client_raises_authentication_error_without_the_key(keyed: Backend) -> None:
    openai = pytest.importorskip("openai")
    base = f"http://127.0.0.1:{keyed.port}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    listed = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0).models.list()
    assert [m.id for m in listed] == ["chat-small", "gpt-4o-mini"]


# --- the official client ----------------------------------------------------------------------


def test_official_openai_client_parses_responses(backend: Backend) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{backend.port}/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2)
    assert chat.choices[0].message.content.count("[") == 2 and chat.usage.completion_tokens == 2
    stream = client.chat.completions.create(model="chat-small", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 3
    completion = client.completions.create(model="chat-small", prompt="x", max_tokens=2)
    assert completion.choices[0].text.count("[") == 2
    embedded = client.embeddings.create(model="chat-small", input=["a", "b"])  # base64 on the wire
    assert [len(d.embedding) for d in embedded.data] == [8, 8]
    assert [m.id for m in client.models.list()] == ["chat-small", "gpt-4o-mini"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    records = backend.request("GET", "/_test/requests").json()
    assert any(r["path"] == "/v1/embeddings" for r in records)


def test_official_openai_client_parses_a_response(backend: Backend) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{backend.port}/v1", api_key="unused", max_retries=0)
    response = client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=2)
    assert response.output_text.count("[") == 2
    assert response.usage.output_tokens == 2 and response.status == "incomplete"


# --- multipart bodies, audio, and the stand-ins for Qdrant and Immich ML -------------------------


def multipart(boundary: str, parts: list[tuple[str, bytes, str | None]], eol: bytes = b"\r\n") -> bytes:
    """A form of (name, value, filename) parts."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}".encode() + eol + f"Content-Disposition: {disposition}".encode() + eol + eol
        out += value + eol
    return out + f"--{boundary}--".encode() + eol


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_a_transcription_is_answered_and_recorded_part_by_part(backend: Backend, eol: bytes) -> None:
    audio = os.urandom(100_000) + b"\r\n--not-it\r\n"
    body = multipart("x-b", [("model", b"gpt-4o-mini", None), ("file", audio, "a.wav")], eol)
    reply = backend.request("POST", "/v1/audio/transcriptions?lang=de", raw=body,
                            headers={"Content-Type": 'multipart/form-data; boundary="x-b"'})
    assert reply.status == 200, reply.body[:300]
    answer = reply.json()
    assert answer["file_sha256"] == hashlib.sha256(audio).hexdigest()
    assert answer["text"].startswith("transcription of")
    [record] = backend.request("GET", "/_test/requests").json()
    assert (record["path"], record["query"], record["model"]) == ("/v1/audio/transcriptions", "lang=de", "gpt-4o-mini")
    assert [(p["name"], p["filename"], p["length"]) for p in record["parts"]] == [
        ("model", None, len(b"gpt-4o-mini")), ("file", "a.wav", len(audio))]


@pytest.mark.parametrize(("body", "content_type", "status"), [
    (multipart("b", [("model", b"unknown", None), ("file", b"x", "a.wav")]), "multipart/form-data; boundary=b", 404),
    (multipart("b", [("model", b"chat-small", None)]), "multipart/form-data; boundary=b", 400),
    (b'{"model": "chat-small"}', "application/json", 400),
    (multipart("b", [("model", b"chat-small", None)])[:-8], "multipart/form-data; boundary=b", 400),
])
def test_bad_audio_requests_are_refused_like_vllm(backend: Backend, body: bytes, content_type: str,
                                                  status: int) -> None:
    reply = backend.request("POST", "/v1/audio/translations", raw=body, headers={"Content-Type": content_type})
    assert reply.status == status, reply.body[:300]
    assert "error" in reply.json()


@contextlib.contextmanager
def stand_in(tmp_path: Path, service: str) -> Iterator[Backend]:
    """A backend standing in for a service beside the models."""
    backend = start_backend(tmp_path / "stderr.log", "--model", service, "--service", service)
    try:
        yield backend
    finally:
        backend.stop()


def test_the_qdrant_stand_in_answers_any_path_and_method(tmp_path: Path) -> None:
    with stand_in(tmp_path, "qdrant") as service:
        check_qdrant(service)


def check_qdrant(service: Backend) -> None:
    body = {"points": [{"id": 1, "vector": [0.5]}]}
    reply = service.request("PUT", "/collections/c/points?wait=true", body, headers={"api-key": "k"})
    assert reply.status == 200
    answer = reply.json()
    assert (answer["status"], answer["result"]["path"], answer["result"]["query"]) == (
        "ok", "/collections/c/points", "wait=true")
    assert answer["result"]["body"] == body
    assert service.request("GET", "/healthz").body == b"healthz check passed"
    [record, _health] = service.request("GET", "/_test/requests").json()
    assert (record["method"], record["headers"]["api-key"]) == ("PUT", ["k"])


def test_the_immich_stand_in_answers_by_its_entries(tmp_path: Path) -> None:
    with stand_in(tmp_path, "immich-ml") as service:
        check_immich(service)


def check_immich(service: Backend) -> None:
    assert service.request("GET", "/ping").body == b"pong"
    entries = {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}
    body = multipart("b", [("image", b"\xff\xd8jpeg", "blob"), ("entries", json.dumps(entries).encode(), None)])
    reply = service.request("POST", "/predict", raw=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert reply.status == 200
    assert reply.json()["entries"] == entries
    missing = multipart("b", [("image", b"x", "blob")])
    assert service.request("POST", "/predict", raw=missing,
                           headers={"Content-Type": "multipart/form-data; boundary=b"}).status == 422

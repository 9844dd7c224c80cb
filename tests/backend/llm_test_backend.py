#!/usr/bin/env python3
"""An OpenAI-compatible TEST backend: a fixture for the gateway's tests, never a product engine.

It speaks vLLM's wire format (paths, error JSON, SSE without X-Accel-Buffering) well
enough for the official `openai` client: chat, completions, embeddings, rerank, responses
and score under the prefix, and vLLM's /tokenize and /detokenize at the root (vLLM serves
those without /v1). It adds what tests need from a backend:
  - every response says which host, port and model served it (X-Backend-* headers,
    and a "backend" object in JSON bodies), so a test can check where the gateway routed;
  - every request is recorded (GET/DELETE /_test/requests), with a sha256 of the body,
    so a test can prove the body arrived unchanged and count retries;
  - every record also holds the request's headers, so a test can prove which
    Authorization (if any) reached the backend;
  - with --api-key-env NAME (and NAME set), the API paths under the prefix need
    `Authorization: Bearer $NAME`, as vLLM's --api-key guards /v1 (see `needs_key`);
    the key is read from the environment so it never shows in `ps` or a unit;
  - faults on demand (POST /_test/behaviour: fail, hang, slow) for retry/timeout tests,
    and a connection dropped without an answer for any request whose "user" is
    "_test_drop_connection" (what a client can make a crashing engine do);
  - multipart bodies are recorded part by part (name, filename, length, sha256), and
    vLLM's /v1/audio/transcriptions and /translations answer {"text"} by the form's model;
  - with --service qdrant or immich-ml it stands in for the services the gateway puts
    beside the models: Qdrant-like JSON ({"result", "status", "time"}) on any path and
    method, /healthz; Immich ML's /ping, / and POST /predict, which answers by its
    "entries" part (FastAPI's 422 without one). Every record keeps the query string.
  - GET /metrics, open like vLLM's and Infinity's: Prometheus text counting the requests
    received per served name, so a monitoring test can scrape a model server's own metrics.

Standard library only, one file, Python 3.11+, so it can be copied onto any lab host.

    llm_test_backend.py --host 0.0.0.0 --port 8101 --model chat-small gpt-4o-mini [--api-prefix ''] \
        [--api-key-env LLM_API_KEY]
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import hashlib
import json
import hmac
import math
import os
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

EMBEDDING_DIM = 8
DEFAULT_CHUNKS = 5
MAX_RECORDS = 10_000  # enough for any test; bounded so a soak test cannot exhaust memory
MAX_BODY = 64 * 1024 * 1024
HANG_LIMIT = 600.0
MODES = ("ok", "fail", "hang", "slow")
# A request with this "user" is dropped without an answer (a client-caused backend failure).
DROP_USER = "_test_drop_connection"
SERVICES = ("qdrant", "immich-ml")
MAX_MODEL_LEN = 4096  # what /tokenize reports; nothing here enforces a context length
CHAT_LIMITS = ("max_completion_tokens", "max_tokens")  # the newer name wins, as in vLLM
RESPONSES_LIMITS = ("max_output_tokens",)


class ClientError(Exception):
    """A request the backend refuses with an OpenAI-style error JSON."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


@dataclass
class Behaviour:
    """The injected fault, shared by all handler threads; a condition wakes hung requests on change."""

    mode: str = "ok"
    status: int = 500
    delay: float = 2.0
    changed: threading.Condition = field(default_factory=threading.Condition)

    def as_dict(self) -> dict[str, Any]:
        """The public view for GET /_test/behaviour."""
        with self.changed:
            return {"mode": self.mode, "status": self.status, "delay": self.delay}

    def update(self, body: Any) -> dict[str, Any]:
        """Validate and apply a new behaviour; invalid input changes nothing."""
        if not isinstance(body, dict):
            raise ClientError(400, "behaviour must be a JSON object", "invalid_request_error")
        mode = body.get("mode", "ok")
        status = body.get("status", 500)
        delay = body.get("delay", 2.0)
        if mode not in MODES:
            raise ClientError(400, f"mode must be one of {', '.join(MODES)}", "invalid_request_error", "mode")
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            raise ClientError(400, "status must be an integer from 400 to 599", "invalid_request_error", "status")
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not 0 <= delay <= HANG_LIMIT:
            raise ClientError(400, f"delay must be a number of seconds from 0 to {HANG_LIMIT:g}",
                              "invalid_request_error", "delay")
        with self.changed:
            self.mode, self.status, self.delay = mode, status, float(delay)
            self.changed.notify_all()
        return self.as_dict()

    def apply(self) -> int | None:
        """Delay as told; return an error status to send instead of the answer, or None."""
        with self.changed:
            mode, status, delay = self.mode, self.status, self.delay
            if mode == "hang":
                # Until someone changes the mode (or shutdown), like a backend stuck on a GPU.
                self.changed.wait_for(lambda: self.mode != "hang", timeout=HANG_LIMIT)
                return None
        if mode == "slow":
            time.sleep(delay)
        return status if mode == "fail" else None

    def release(self) -> None:
        """Wake hung requests on shutdown so the process can exit promptly."""
        with self.changed:
            self.mode = "ok"
            self.changed.notify_all()


class RequestLog:
    """What the backend received, for tests that check routing, retries and body integrity."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_RECORDS)

    def add(self, record: dict[str, Any]) -> None:
        """Remember one request."""
        with self._lock:
            self._records.append(record)

    def all(self) -> list[dict[str, Any]]:
        """A snapshot, oldest first."""
        with self._lock:
            return list(self._records)

    def clear(self) -> None:
        """Forget everything (between test cases)."""
        with self._lock:
            self._records.clear()


@dataclass
class Config:
    """Command-line settings every handler thread reads."""

    host: str
    port: int
    models: list[str]
    api_prefix: str
    stream_interval: float
    keepalive_timeout: float
    hostname: str = field(default_factory=socket.gethostname)
    # The Bearer key the API paths need; None serves them open (no --api-key-env, or its variable unset).
    api_key: str | None = None
    # None: the OpenAI API; else the service it stands in for (SERVICES).
    service: str | None = None


# --- response bodies, as pure functions of the request ------------------------------------


def word_count(value: Any) -> int:
    """A stand-in for a tokenizer: deterministic and good enough for `usage` numbers."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(word_count(item) for item in value)
    if isinstance(value, dict):
        return word_count(value.get("content", "")) + word_count(value.get("text", ""))
    return 0


def token_limit(body: dict[str, Any], fields: tuple[str, ...] = CHAT_LIMITS) -> int | None:
    """The caller's limit on answer tokens, from the first of `fields` set (each API names it its own way)."""
    for name in fields:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ClientError(400, f"{name} must be a positive integer", "invalid_request_error", name)
        return value
    return None


def requested_tokens(body: dict[str, Any], fields: tuple[str, ...] = CHAT_LIMITS) -> int:
    """How many pieces to answer with: the caller's limit, else a default."""
    limit = token_limit(body, fields)
    return DEFAULT_CHUNKS if limit is None else limit


def finish_reason(body: dict[str, Any]) -> str:
    """vLLM says "length" when the answer stopped at the caller's token limit."""
    return "length" if token_limit(body) is not None else "stop"


def piece(index: int, config: Config) -> str:
    """One streamed piece: its index and time make pacing and ordering visible to tests."""
    return f"[{index} {config.hostname}:{config.port} t={time.time():.3f}] "


def usage(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def prompt_usage(tokens: int) -> dict[str, int]:
    """The usage object of APIs that generate nothing (embeddings, rerank, score)."""
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def embedding(value: Any) -> list[float]:
    """A deterministic unit vector from the input's hash: equal inputs give equal vectors."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [int.from_bytes(digest[i * 4:(i + 1) * 4], "big") / 2**31 - 1.0 for i in range(EMBEDDING_DIM)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """The openai client asks for base64 (little-endian float32) unless told otherwise."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def embeddings_inputs(body: dict[str, Any]) -> list[Any]:
    """`input` is a string, a list of strings, a token list or a list of token lists."""
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, int) for item in value):
            return [value]
        return value
    raise ClientError(400, "input must be a string or a non-empty list", "invalid_request_error", "input")


def rerank_score(query: str, document: str) -> float:
    """Share of query words found in the document, plus a tiny hash tiebreak so order is total."""
    query_words = set(query.lower().split())
    doc_words = set(document.lower().split())
    overlap = len(query_words & doc_words) / len(query_words) if query_words else 0.0
    tiebreak = int.from_bytes(hashlib.sha256(document.encode("utf-8")).digest()[:2], "big") / 65536 / 1000
    return round(overlap * 0.99 + tiebreak, 6)


def document_text(document: Any) -> str:
    """Cohere/Infinity accept plain strings; some clients send {"text": ...}."""
    if isinstance(document, str):
        return document
    if isinstance(document, dict) and isinstance(document.get("text"), str):
        return document["text"]
    raise ClientError(400, "documents must be strings or objects with a text field", "invalid_request_error",
                      "documents")


def new_id(prefix: str, separator: str = "-") -> str:
    """Ids shaped like vLLM's (its Responses API uses OpenAI's resp_/msg_ style, hence the separator)."""
    return f"{prefix}{separator}{uuid.uuid4().hex}"


def chat_response(body: dict[str, Any], model: str, config: Config) -> dict[str, Any]:
    """A non-streamed chat.completion."""
    n = requested_tokens(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ClientError(400, "messages must be a non-empty list", "invalid_request_error", "messages")
    content = "".join(piece(i, config) for i in range(n)).strip()
    return {
        "id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "tool_calls": []},
                     "logprobs": None, "finish_reason": finish_reason(body)}],
        "usage": usage(word_count(messages), n),
    }


def completion_response(body: dict[str, Any], model: str, config: Config) -> dict[str, Any]:
    """A non-streamed text_completion."""
    n = requested_tokens(body)
    text = "".join(piece(i, config) for i in range(n))
    return {
        "id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None,
                     "finish_reason": finish_reason(body)}],
        "usage": usage(word_count(body.get("prompt", "")), n),
    }


def embeddings_response(body: dict[str, Any], model: str, _config: Config) -> dict[str, Any]:
    """An OpenAI embeddings list."""
    inputs = embeddings_inputs(body)
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise ClientError(400, "encoding_format must be float or base64", "invalid_request_error", "encoding_format")
    data = [{"object": "embedding", "index": i, "embedding": encode_embedding(embedding(item), encoding_format)}
            for i, item in enumerate(inputs)]
    tokens = sum(word_count(item) if isinstance(item, str) else len(item) for item in inputs)
    return {"id": new_id("embd"), "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": prompt_usage(tokens)}


def rerank_response(body: dict[str, Any], model: str, _config: Config) -> dict[str, Any]:
    """Infinity-style rerank results (document as a plain string when asked for), best first."""
    query = body.get("query")
    documents = body.get("documents")
    if not isinstance(query, str) or not isinstance(documents, list) or not documents:
        raise ClientError(400, "query (string) and documents (non-empty list) are required", "invalid_request_error")
    texts = [document_text(d) for d in documents]
    top_n = body.get("top_n") or len(texts)
    return_documents = bool(body.get("return_documents", False))
    results = sorted(
        ({"index": i, "relevance_score": rerank_score(query, text),
          "document": text if return_documents else None} for i, text in enumerate(texts)),
        key=lambda result: -result["relevance_score"],
    )[:top_n]
    tokens = word_count(query) + word_count(texts)
    return {"id": new_id("rerank"), "object": "rerank", "created": int(time.time()), "model": model,
            "results": results, "usage": prompt_usage(tokens)}


def responses_response(body: dict[str, Any], model: str, config: Config) -> dict[str, Any]:
    """A non-streamed Responses API object, as vLLM's /v1/responses returns it: one assistant message."""
    source = body.get("input")
    if not isinstance(source, (str, list)) or not source:
        raise ClientError(400, "input must be a string or a non-empty list", "invalid_request_error", "input")
    limit, n = token_limit(body, RESPONSES_LIMITS), requested_tokens(body, RESPONSES_LIMITS)
    text = "".join(piece(i, config) for i in range(n)).strip()
    prompt = word_count(source) + word_count(body.get("instructions") or "")
    message = {"id": new_id("msg", "_"), "type": "message", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": None}]}
    return {
        "id": new_id("resp", "_"), "object": "response", "created_at": int(time.time()), "model": model,
        # Like finish_reason "length": the answer stopped at the caller's limit.
        "status": "completed" if limit is None else "incomplete",
        "incomplete_details": None if limit is None else {"reason": "max_output_tokens"},
        "instructions": body.get("instructions"), "max_output_tokens": limit,
        "output": [message], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": n, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": prompt + n},
    }


def score_texts(body: dict[str, Any], name: str) -> list[str]:
    """text_1 and text_2 are each a string or a non-empty list of strings."""
    value = body.get(name)
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
        raise ClientError(400, f"{name} must be a string or a non-empty list of strings", "invalid_request_error",
                          name)
    return texts


def score_response(body: dict[str, Any], model: str, _config: Config) -> dict[str, Any]:
    """vLLM's /v1/score: one score per (text_1, text_2) pair, in input order; a single text_1 meets every text_2."""
    first, second = score_texts(body, "text_1"), score_texts(body, "text_2")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise ClientError(400, "Input lengths must be either 1:1, 1:N or N:N", "invalid_request_error", "text_1")
    data = [{"index": i, "object": "score", "score": rerank_score(a, b)} for i, (a, b) in enumerate(zip(first, second))]
    return {"id": new_id("score"), "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": prompt_usage(word_count(first) + word_count(second))}


def content_text(content: Any) -> str:
    """A message's content as text: a string, or the text of its parts (the OpenAI content-part list)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def chat_template(messages: list[Any], add_generation_prompt: bool) -> str:
    """A stand-in for the model's chat template: "role: content" lines, then the assistant's turn."""
    lines = [f"{m.get('role', '')}: {content_text(m.get('content'))}\n" for m in messages if isinstance(m, dict)]
    return "".join(lines) + ("assistant: " if add_generation_prompt else "")


def tokenize_text(text: str) -> list[int]:
    """The fake tokenizer: one token per UTF-8 byte, so /detokenize gives back exactly what was tokenized."""
    return list(text.encode("utf-8"))


def tokenize_response(body: dict[str, Any], _model: str, _config: Config) -> dict[str, Any]:
    """vLLM's /tokenize: a completion prompt, or chat messages rendered through the (fake) chat template."""
    prompt, messages = body.get("prompt"), body.get("messages")
    if isinstance(prompt, str) and messages is None:
        text = prompt
    elif isinstance(messages, list) and messages and prompt is None:
        text = chat_template(messages, bool(body.get("add_generation_prompt", True)))
    else:
        raise ClientError(400, "send either prompt (a string) or messages (a non-empty list)",
                          "invalid_request_error", "prompt")
    tokens = tokenize_text(text)
    strings = [bytes([token]).decode("utf-8", "replace") for token in tokens]
    return {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens,
            "token_strs": strings if body.get("return_token_strs") else None}


def detokenize_response(body: dict[str, Any], _model: str, _config: Config) -> dict[str, Any]:
    """vLLM's /detokenize; an id outside the fake vocabulary (bytes) is refused as vLLM refuses one."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(
            isinstance(token, int) and not isinstance(token, bool) and 0 <= token <= 255 for token in tokens):
        raise ClientError(400, "tokens must be a list of token ids from 0 to 255", "invalid_request_error", "tokens")
    return {"prompt": bytes(tokens).decode("utf-8", "replace")}


def chat_chunks(body: dict[str, Any], model: str, config: Config) -> list[Any]:
    """vLLM's stream: a role chunk, content chunks, a finish chunk (and usage if asked)."""
    n = requested_tokens(body)
    ident, created = new_id("chatcmpl"), int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    # Content is computed lazily so each chunk's timestamp is when it was sent.
    pieces: list[Any] = [chunk({"role": "assistant", "content": ""})]
    pieces += [lambda i=i: chunk({"content": piece(i, config)}) for i in range(n)]
    pieces.append(chunk({}, finish_reason(body)))
    if (body.get("stream_options") or {}).get("include_usage"):
        pieces.append({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage(word_count(body.get("messages")), n)})
    return pieces


def completion_chunks(body: dict[str, Any], model: str, config: Config) -> list[Any]:
    """Streamed text_completion objects, as vLLM sends them."""
    n = requested_tokens(body)
    ident, created = new_id("cmpl"), int(time.time())

    def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    pieces: list[Any] = [lambda i=i: chunk(piece(i, config)) for i in range(n)]
    pieces.append(chunk("", finish_reason(body)))
    if (body.get("stream_options") or {}).get("include_usage"):
        pieces.append({"id": ident, "object": "text_completion", "created": created, "model": model,
                       "choices": [], "usage": usage(word_count(body.get("prompt", "")), n)})
    return pieces


@dataclass
class Part:
    """One part of a multipart/form-data body."""

    name: str | None
    filename: str | None
    content_type: str | None
    data: bytes

    def summary(self) -> dict[str, Any]:
        """What a record keeps of it: enough to prove the upload arrived byte for byte."""
        return {"name": self.name, "filename": self.filename, "content_type": self.content_type,
                "length": len(self.data), "sha256": hashlib.sha256(self.data).hexdigest()}


def multipart_boundary(content_type: str) -> str | None:
    """The boundary parameter of a multipart/form-data Content-Type, quoted or not."""
    if not content_type.lower().startswith("multipart/form-data"):
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            value = value.strip()
            return value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value
    return None


def _disposition(value: str) -> dict[str, str]:
    params = {}
    for item in value.split(";")[1:]:
        key, _, raw = item.strip().partition("=")
        raw = raw.strip()
        params[key.strip().lower()] = raw[1:-1] if len(raw) > 1 and raw[0] == raw[-1] == '"' else raw
    return params


def parse_multipart(body: bytes, boundary: str) -> list[Part]:
    """The parts between the delimiter lines, as a form parser splits them; a body without its closing one is refused."""
    delimiter = b"--" + boundary.encode()
    chunks = body.split(b"\n" + delimiter)
    first = chunks[0]
    if not (first.startswith(delimiter)):
        raise ClientError(400, "multipart body does not start with its boundary", "invalid_request_error")
    chunks[0] = first[len(delimiter):]
    if not chunks[-1].startswith(b"--"):
        raise ClientError(400, "multipart body has no closing boundary", "invalid_request_error")
    parts = []
    for chunk in chunks[:-1]:
        chunk = chunk.split(b"\n", 1)[1] if b"\n" in chunk else b""
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            head, sep, data = chunk.partition(b"\n\n")
        data = data[:-1] if data.endswith(b"\r") else data
        headers = {}
        for line in head.decode("utf-8", "replace").splitlines():
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        params = _disposition(headers.get("content-disposition", ""))
        parts.append(Part(params.get("name"), params.get("filename"), headers.get("content-type"), data))
    return parts


def form_field(parts: list[Part], name: str) -> str | None:
    """A form field's text; the last part of that name counts, as in FastAPI's form parser."""
    values = [part.data for part in parts if part.name == name]
    return values[-1].decode("utf-8", "replace") if values else None


def audio_response(parts: list[Part], model: str, config: Config, task: str) -> dict[str, Any]:
    """vLLM's transcription or translation JSON, with what the tests check: the file's sha256."""
    files = [part for part in parts if part.name == "file"]
    if not files:
        raise ClientError(400, "the form has no file part", "invalid_request_error", "file")
    digest = hashlib.sha256(files[-1].data).hexdigest()
    return {"text": f"{task} of {len(files[-1].data)} bytes by {model}", "file_sha256": digest,
            "file_length": len(files[-1].data), "language": form_field(parts, "language")}


def immich_response(parts: list[Part]) -> dict[str, Any]:
    """Immich ML's /predict, by its entries: FastAPI answers 422 when the form lacks them."""
    entries = form_field(parts, "entries")
    if entries is None:
        raise ClientError(422, "Field required: entries", "unprocessable_entity", "entries")
    try:
        parsed = json.loads(entries)
    except ValueError:
        raise ClientError(422, "entries is not JSON", "unprocessable_entity", "entries") from None
    return {"entries": parsed, "inputs": sorted(part.name or "" for part in parts if part.name != "entries")}


Answer = Callable[[dict[str, Any], str, Config], dict[str, Any]]
Chunks = Callable[[dict[str, Any], str, Config], list[Any]]

# OpenAI path (after the prefix) -> (answer builder, stream builder or None)
ROUTES: dict[str, tuple[Answer, Chunks | None]] = {
    "/chat/completions": (chat_response, chat_chunks),
    "/completions": (completion_response, completion_chunks),
    "/embeddings": (embeddings_response, None),
    "/rerank": (rerank_response, None),
    "/responses": (responses_response, None),
    "/score": (score_response, None),
}
# vLLM serves its tokenizer at the root whatever the prefix: /tokenize, never /v1/tokenize.
ROOT_ROUTES: dict[str, tuple[Answer, Chunks | None]] = {
    "/tokenize": (tokenize_response, None),
    "/detokenize": (detokenize_response, None),
}


# Multipart routes under the prefix: vLLM's audio API (its task, for the answer).
AUDIO_ROUTES = {"/audio/transcriptions": "transcription", "/audio/translations": "translation"}


def find_route(path: str, prefix: str) -> tuple[str, tuple[Answer, Chunks | None]] | None:
    """The route a path names, with its name for messages; root routes are not looked for under the prefix."""
    if path in ROOT_ROUTES:
        return path, ROOT_ROUTES[path]
    route = path[len(prefix):] if path.startswith(prefix + "/") else None
    if route in ROUTES:
        return route, ROUTES[route]
    return None


def needs_key(path: str, prefix: str) -> bool:
    """Whether a path needs the key, like vLLM's --api-key: the API under the prefix, not /health.

    vLLM's root paths stay open (/health, /tokenize, /detokenize), and so does the test API. With
    an empty prefix (Infinity's way) every other path is "under the prefix", as Infinity guards
    /models and /embeddings but not /health.
    """
    if path in ("/health", "/metrics", *ROOT_ROUTES) or path.startswith("/_test/"):
        return False
    return not prefix or path == prefix or path.startswith(prefix + "/")


def bearer_matches(authorization: list[str], key: str) -> bool:
    """One Authorization header, `Bearer <key>` (scheme case-insensitive, as RFC 7235 says).

    Two headers are refused rather than guessed between; the comparison takes constant time.
    """
    if len(authorization) != 1:
        return False
    scheme, _, token = authorization[0].strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def request_headers(message: Any) -> dict[str, list[str]]:
    """The headers as received: lower-case names (HTTP's are case-insensitive), every value kept in order."""
    headers: dict[str, list[str]] = {}
    for name, value in message.items():
        headers.setdefault(name.lower(), []).append(value)
    return headers


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The error JSON vLLM and OpenAI return; the openai client raises on it by status."""
    error_type = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                  405: "MethodNotAllowed", 413: "RequestTooLarge"}.get(
                      status, "InternalServerError" if status >= 500 else "Error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# --- HTTP ---------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """One connection; HTTP/1.1 so the gateway's upstream keepalive is exercised."""

    protocol_version = "HTTP/1.1"
    server_version = "llm-test-backend/1"
    config: Config
    behaviour: Behaviour
    request_log: RequestLog

    # --- plumbing

    def setup(self) -> None:
        """Idle keep-alive connections close after the timeout, like vLLM/uvicorn (5 s)."""
        self.timeout = self.config.keepalive_timeout
        super().setup()
        self._status = 0
        self._started = time.monotonic()

    def end_headers(self) -> None:
        """Every response, errors and SSE included, says who answered."""
        self.send_header("X-Backend-Host", self.config.hostname)
        self.send_header("X-Backend-Port", str(self.config.port))
        self.send_header("X-Backend-Model", self.config.models[0])
        headers = getattr(self, "headers", None)
        request_id = headers.get("X-Request-ID") if headers is not None else None
        if request_id:
            self.send_header("X-Request-ID", request_id)
        super().end_headers()

    def send_response(self, code: int, message: str | None = None) -> None:
        """Remember the status for the access log line."""
        self._status = code
        super().send_response(code, message)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Replaced by one line per request in `finish_request_log`, with timing and model."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
        """stderr goes to journald on lab hosts; keep each entry on one line."""
        if args and isinstance(args[0], TimeoutError):
            return  # an idle keep-alive connection timing out is normal, not worth a journal line
        sys.stderr.write(f"{self.address_string()} {format % args}\n")
        sys.stderr.flush()

    def finish_request_log(self, model: str | None) -> None:
        """One access-log line per request."""
        elapsed = time.monotonic() - self._started
        request_id = self.headers.get("X-Request-ID", "-")
        sys.stderr.write(f"{self.client_address[0]} {self.command} {self.path} {self._status} "
                         f"{elapsed:.3f}s model={model or '-'} request_id={request_id}\n")
        sys.stderr.flush()

    def read_body(self) -> bytes:
        """Read the whole body (Content-Length or chunked) so the connection stays usable."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
                if sum(map(len, parts)) > MAX_BODY:
                    raise ClientError(413, "request body too large", "request_too_large")
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True  # the unread body would be parsed as the next request
            raise ClientError(413, "request body too large", "request_too_large")
        return self.rfile.read(length) if length else b""

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        """A JSON answer, always with Content-Length so keep-alive works."""
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, status: int, message: str, code: str, param: str | None = None,
                        headers: dict[str, str] | None = None) -> None:
        """An OpenAI-style error."""
        self.send_json(status, error_body(status, message, code, param), headers)

    def check_key(self, path: str) -> None:
        """401 like OpenAI's for a missing or wrong key; after `record`, so refused requests are seen too."""
        key = self.config.api_key
        if key is None or not needs_key(path, self.config.api_prefix):
            return
        if not bearer_matches(self.headers.get_all("Authorization") or [], key):
            raise ClientError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                              "invalid_api_key")

    def backend_info(self) -> dict[str, Any]:
        """Who answered, inside the JSON body, for clients that drop headers."""
        return {"host": self.config.hostname, "port": self.config.port, "model": self.config.models[0],
                "path": self.path}

    # --- dispatch

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        """GET requests."""
        self.dispatch()

    def do_POST(self) -> None:  # noqa: N802
        """POST requests."""
        self.dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        """DELETE requests."""
        self.dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        """PUT requests (Qdrant's upserts)."""
        self.dispatch()

    def do_PATCH(self) -> None:  # noqa: N802
        """PATCH requests."""
        self.dispatch()

    def dispatch(self) -> None:
        """Read, record, apply the injected behaviour, answer; errors become error JSON."""
        model = None
        try:
            body = self.read_body()
            path = self.path.split("?", 1)[0]
            if path.startswith("/_test/"):
                self.handle_test_api(path, body)
                return
            model = self.record(path, body)
            self.check_key(path)
            fault = self.behaviour.apply()
            if fault is not None:
                self.send_error_json(fault, f"injected failure (status {fault})", "injected_failure")
                return
            if self.config.service is not None:
                self.handle_service(path, body)
            else:
                self.handle_api(path, body)
        except ClientError as exc:
            extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
            self.send_error_json(exc.status, str(exc), exc.code, exc.param, extra)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away (e.g. cancelled a stream)
        finally:
            self.finish_request_log(model)

    def record(self, path: str, body: bytes) -> str | None:
        """Log the request for /_test/requests before any fault, so failed attempts are visible too."""
        model = None
        try:
            parsed = json.loads(body) if body else None
            if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
                model = parsed["model"]
        except (ValueError, RecursionError):
            pass
        boundary = multipart_boundary(self.headers.get("Content-Type", ""))
        parsed_parts = None
        if boundary:
            with contextlib.suppress(ClientError):
                parsed_parts = parse_multipart(body, boundary)
        if parsed_parts is not None and model is None:
            model = form_field(parsed_parts, "model")
        parts = None if parsed_parts is None else [part.summary() for part in parsed_parts]
        self.request_log.add({
            "method": self.command, "path": path, "query": self.path.partition("?")[2],
            "parts": parts, "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(), "model": model,
            "request_id": self.headers.get("X-Request-ID"), "client": self.client_address[0],
            "timestamp": time.time(), "headers": request_headers(self.headers),
        })
        return model

    def handle_test_api(self, path: str, body: bytes) -> None:
        """The control API for tests; deliberately outside the prefix and unaffected by faults."""
        if path == "/_test/requests" and self.command == "GET":
            self.send_json(200, self.request_log.all())
        elif path == "/_test/requests" and self.command == "DELETE":
            self.request_log.clear()
            self.send_json(200, {"cleared": True})
        elif path == "/_test/behaviour" and self.command == "GET":
            self.send_json(200, self.behaviour.as_dict())
        elif path == "/_test/behaviour" and self.command == "POST":
            self.send_json(200, self.behaviour.update(parse_json(body)))
        else:
            raise ClientError(404, f"no test endpoint {self.command} {path}", "not_found")

    def handle_api(self, path: str, body: bytes) -> None:
        """The OpenAI paths under the prefix, the tokenizer paths at the root, and /health."""
        prefix = self.config.api_prefix
        if path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path == prefix + "/models" and self.command == "GET":
            self.send_json(200, self.models_list())
            return
        if path == "/metrics" and self.command == "GET":
            self.send_text(200, self.metrics_text())
            return
        if path.startswith(prefix + "/") and path[len(prefix):] in AUDIO_ROUTES:
            self.handle_audio(AUDIO_ROUTES[path[len(prefix):]], body)
            return
        found = find_route(path, prefix)
        if found is None:
            raise ClientError(404, f"no route for {path}", "not_found")
        if self.command != "POST":
            raise ClientError(405, f"{self.command} is not allowed on {path}", "method_not_allowed")
        request = parse_json(body)
        if not isinstance(request, dict):
            raise ClientError(400, "request body must be a JSON object", "invalid_request_error")
        model = self.check_model(request)
        if request.get("user") == DROP_USER:
            # What a crashing engine does to a request it cannot take; any client can send it.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        route, (answer, stream) = found
        if request.get("stream") is True:
            if stream is None:
                raise ClientError(400, f"{route} does not support streaming", "invalid_request_error", "stream")
            self.send_stream(stream(request, model, self.config), self.stream_interval())
            return
        self.send_json(200, {**answer(request, model, self.config), "backend": self.backend_info()})

    def multipart(self, body: bytes) -> list[Part]:
        """The parts of a multipart/form-data body; another body is a 400, as FastAPI's form parsing."""
        boundary = multipart_boundary(self.headers.get("Content-Type", ""))
        if boundary is None:
            raise ClientError(400, "expected a multipart/form-data body", "invalid_request_error")
        return parse_multipart(body, boundary)

    def handle_audio(self, task: str, body: bytes) -> None:
        """vLLM's /v1/audio/transcriptions and /translations: a form with model and file."""
        if self.command != "POST":
            raise ClientError(405, f"{self.command} is not allowed", "method_not_allowed")
        parts = self.multipart(body)
        model = self.check_model({"model": form_field(parts, "model")})
        self.send_json(200, {**audio_response(parts, model, self.config, task), "backend": self.backend_info()})

    def handle_service(self, path: str, body: bytes) -> None:
        """Stand-in for Qdrant or Immich ML: answers in their wire format and says who answered."""
        if self.config.service == "immich-ml":
            if path == "/ping":
                self.send_text(200, "pong")
            elif path == "/" and self.command == "GET":
                self.send_json(200, {"message": "Immich ML"})
            elif path == "/predict" and self.command == "POST":
                self.send_json(200, {**immich_response(self.multipart(body)), "backend": self.backend_info()})
            else:
                raise ClientError(404, f"Not Found: {self.command} {path}", "not_found")
            return
        if path == "/healthz":
            self.send_text(200, "healthz check passed")
            return
        parsed = parse_json(body) if body else None
        self.send_json(200, {"result": {"method": self.command, "path": path, "query": self.path.partition("?")[2],
                                        "body": parsed},
                             "status": "ok", "time": 0.0, "backend": self.backend_info()})

    def metrics_text(self) -> str:
        """Prometheus text at /metrics, open like vLLM's and Infinity's: requests received per served name.

        Labels are the server's own names, never a client's text.
        """
        received = [entry["model"] for entry in self.request_log.all() if entry["path"] != "/metrics"]
        lines = ["# HELP llm_test_backend_requests_total Requests received, by the served name they asked for.",
                 "# TYPE llm_test_backend_requests_total counter"]
        lines += [f'llm_test_backend_requests_total{{model_name="{name}"}} {received.count(name)}'
                  for name in self.config.models]
        return "\n".join(lines) + "\n"

    def send_text(self, status: int, text: str) -> None:
        """A plain-text answer (Immich ML's /ping, Qdrant's /healthz)."""
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def check_model(self, request: dict[str, Any]) -> str:
        """Like vLLM: an unknown model is a 404; no model means the first served name."""
        model = request.get("model")
        if model is None:
            return self.config.models[0]
        if model not in self.config.models:
            raise ClientError(404, f"The model `{model}` does not exist.", "model_not_found", "model")
        return str(model)

    def models_list(self) -> dict[str, Any]:
        """GET {prefix}/models: every served name, as vLLM lists its served model names."""
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "llm-test-backend",
             "root": self.config.models[0], "parent": None} for name in self.config.models]}

    def stream_interval(self) -> float:
        """Seconds between chunks: the server default, or the request's X-Test-Stream-Interval."""
        header = self.headers.get("X-Test-Stream-Interval")
        if header is None:
            return self.config.stream_interval
        try:
            value = float(header)
        except ValueError:
            value = -1.0
        if not 0 <= value <= 60:
            raise ClientError(400, "X-Test-Stream-Interval must be seconds from 0 to 60", "invalid_request_error")
        return value

    def send_stream(self, pieces: list[Any], interval: float) -> None:
        """SSE over chunked encoding, paced, as vLLM sends it (and without X-Accel-Buffering)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        content_sent = False
        for item in pieces:
            if callable(item):  # a content piece: pace them, the framing chunks around them go at once
                if content_sent and interval:
                    time.sleep(interval)
                content_sent = True
                item = item()
            self.write_chunk(f"data: {json.dumps(item)}\n\n".encode("utf-8"))
        self.write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        """One HTTP chunk, flushed at once so pacing reaches the client."""
        self.wfile.write(f"{len(data):x}\r\n".encode("ascii") + data + b"\r\n")
        self.wfile.flush()


def parse_json(body: bytes) -> Any:
    """Parse a request body; bad JSON is the client's error (400), never a crash."""
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ClientError(400, f"invalid JSON body: {exc}", "invalid_json") from None
    except RecursionError:
        # Python's parser gives up a few hundred levels deep, where vLLM's refuses too.
        raise ClientError(400, "invalid JSON body: nested too deeply", "invalid_json") from None


class Server(ThreadingHTTPServer):
    """Threaded so a hung or streaming request never blocks others; daemon threads so exit is quick."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops connections under the gateway's load tests.
    request_queue_size = 128


def make_server(config: Config) -> Server:
    """Bind, choosing IPv6 when the address is one."""
    behaviour, request_log = Behaviour(), RequestLog()
    handler = type("BoundHandler", (Handler,), {"config": config, "behaviour": behaviour,
                                                "request_log": request_log})
    server_class = Server
    if ":" in config.host:
        server_class = type("Server6", (Server,), {"address_family": socket.AF_INET6})
    server = server_class((config.host, config.port), handler)
    config.port = server.server_address[1]  # --port 0 picks a free port; report the real one
    return server


def parse_args(argv: list[str] | None = None) -> Config:
    """Command line; --model takes several names because $LLM_SERVED_NAMES splits into words."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to bind; 0 picks a free one")
    parser.add_argument("--model", nargs="+", required=True, help="served names: the model name, then aliases")
    parser.add_argument("--api-prefix", default="/v1", help="path prefix of the OpenAI paths ('' like Infinity)")
    parser.add_argument("--stream-interval", type=float, default=0.2, help="seconds between streamed chunks")
    parser.add_argument("--keepalive-timeout", type=float, default=5.0,
                        help="close idle keep-alive connections after this many seconds (vLLM: 5)")
    parser.add_argument("--service", choices=SERVICES,
                        help="stand in for a service beside the models instead of the OpenAI API")
    parser.add_argument("--api-key-env", metavar="NAME",
                        help="environment variable holding the Bearer key the API paths need (none: open)")
    args = parser.parse_args(argv)
    prefix = args.api_prefix.rstrip("/")
    if prefix and not prefix.startswith("/"):
        parser.error("--api-prefix must be empty or start with /")
    # An empty variable counts as unset: an empty key would let any "Bearer " through.
    api_key = (os.environ.get(args.api_key_env) or None) if args.api_key_env else None
    return Config(host=args.host, port=args.port, models=args.model, api_prefix=prefix,
                  stream_interval=args.stream_interval, keepalive_timeout=args.keepalive_timeout, api_key=api_key,
                  service=args.service)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then stop cleanly (exit 0, so systemd sees a clean stop)."""
    config = parse_args(argv)
    server = make_server(config)

    def stop(signum: int, _frame: Any) -> None:
        sys.stderr.write(f"llm_test_backend: signal {signum}, shutting down\n")
        # shutdown() waits for serve_forever(), which runs in this thread: call it from another.
        threading.Thread(target=server.shutdown, daemon=True).start()
        server.RequestHandlerClass.behaviour.release()  # type: ignore[attr-defined]

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sys.stderr.write(f"llm_test_backend listening on {config.host}:{config.port} "
                     f"models={','.join(config.models)} prefix={config.api_prefix!r} "
                     f"api_key={'required' if config.api_key else 'none'} service={config.service or '-'}\n")
    sys.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

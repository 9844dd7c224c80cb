"""Steady client traffic through a gateway, counted per phase: the rolling-update tests' witness.

Each workload is `concurrency` threads sending one kind of request for one model, back to
back, each on its own persistent connection (HTTP/1.1 keep-alive, reconnecting when the
server closes it), as a real client does. A request belongs to the phase in which it
STARTED (`with load.phase("1 add model"):`), so a request sent just before a host is
drained and answered after it counts where the drain began.

An outcome is one of:
  - ok: 200 with a JSON body (for a stream: 200, then every event JSON, then `data: [DONE]`);
  - gone: 404 `model_not_found` for a workload flagged `may_vanish` (the clean answer
    for a model that was removed on purpose);
  - failed: anything else: a connection error, a timeout, any other status, a body that
    is not JSON, an error event in a stream. A stream that got its 200 and then broke off
    (connection error, or the end without `data: [DONE]`) is failed AND counted in
    `streams_cut`, so a test can tell a cut stream from a refused request.

One retry, counted as `retried` and never hidden: a request that fails on a *reused*
connection before any byte of an answer arrived (the server closed the idle connection
as it was sent: nginx's old workers do exactly that on a reload) is sent again once on a
new connection, as HTTP clients do for requests that never reached the server.

Standard library only. Traffic goes where base_url says: tests send it to 127.0.0.1 or
to the project's lab containers, bounded by the time they let it run.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("chat", "stream", "embeddings")
# Seconds a worker waits after an answer that is not ok (a removed model's 404s come at once).
GONE_PAUSE = 0.05
PATHS = {"chat": "/v1/chat/completions", "stream": "/v1/chat/completions", "embeddings": "/v1/embeddings"}
MAX_FAILURES = 20
NO_PHASE = "(no phase)"
# Errors that on a reused connection mean "closed while idle", before any answer.
STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


@dataclass(frozen=True)
class Workload:
    """One kind of request for one model, from `concurrency` threads."""

    kind: str
    model: str
    concurrency: int = 1
    may_vanish: bool = False
    max_tokens: int = 8
    # Extra request headers (the test backend's X-Test-Stream-Interval slows its streams).
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")

    def body(self) -> bytes:
        """The request body: small, so the load measures the gateway's routing, not the backend."""
        if self.kind == "embeddings":
            return json.dumps({"model": self.model, "input": "load generator"}).encode()
        return json.dumps({"model": self.model, "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": self.max_tokens, "stream": self.kind == "stream"}).encode()


@dataclass
class Counts:
    """What happened to the requests of one kind (or all) in one phase."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    gone: int = 0
    streams: int = 0
    streams_cut: int = 0
    retried: int = 0

    @property
    def unfinished(self) -> int:
        """Sent but not answered when the results were read (in flight, or given up on by stop())."""
        return self.sent - self.ok - self.failed - self.gone

    def add(self, other: Counts) -> None:
        for name in ("sent", "ok", "failed", "gone", "streams", "streams_cut", "retried"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class Failure:
    """One failed request, as the report describes it."""

    kind: str
    model: str
    after: float  # seconds from the start of its phase to the request's start
    status: int | None
    code: str | None
    message: str

    def __str__(self) -> str:
        status = f"HTTP {self.status}" if self.status is not None else "no answer"
        code = f" {self.code}" if self.code else ""
        return f"+{self.after:.2f}s {self.kind} {self.model}: {status}{code}: {self.message}"


@dataclass
class PhaseResult:
    """Every request that started in one phase."""

    name: str
    started: float
    ended: float | None = None
    by_kind: dict[str, Counts] = field(default_factory=dict)
    by_model: dict[str, Counts] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    more_failures: int = 0

    def total(self, kinds: Iterable[str] = KINDS) -> Counts:
        """The counts summed over `kinds` (default: all)."""
        total = Counts()
        for kind in kinds:
            total.add(self.by_kind.get(kind, Counts()))
        return total

    def kind(self, kind: str) -> Counts:
        return self.by_kind.get(kind, Counts())


@dataclass
class Outcome:
    """How one request ended."""

    result: str  # ok, failed or gone
    status: int | None = None
    code: str | None = None
    message: str = ""
    stream: bool = False  # a stream that got its 200
    cut: bool = False


@dataclass
class SseResult:
    """What reading a stream found."""

    done: bool = False
    events: int = 0
    error: str | None = None  # a broken connection, or an event that is not JSON or is an error
    cut: bool = False


def read_sse(lines: Iterable[bytes]) -> SseResult:
    """Read server-sent events to the end: complete only with `data: [DONE]`.

    `lines` is the body line by line (an http.client response iterates so). One `data:`
    line per event, as vLLM sends them; other fields and comments are ignored.
    """
    result = SseResult()
    try:
        for raw in lines:
            line = raw.rstrip(b"\r\n")
            if not line.startswith(b"data:"):
                continue
            data = line[5:].removeprefix(b" ")
            if data == b"[DONE]":
                result.done = True
                return result
            result.events += 1
            try:
                event = json.loads(data)
            except ValueError:
                result.error = f"event {result.events} is not JSON: {data[:80]!r}"
                return result
            if isinstance(event, dict) and "error" in event:
                result.error = f"error event: {json.dumps(event['error'])[:200]}"
                return result
    except (OSError, http.client.HTTPException) as exc:
        result.error = f"stream broke off after {result.events} events: {describe(exc)}"
        result.cut = True
        return result
    result.error = f"stream ended after {result.events} events without [DONE]"
    result.cut = True
    return result


def describe(exc: BaseException) -> str:
    """An exception as one short line (its type says timeout, reset, refused...)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def error_of(body: bytes) -> tuple[str | None, str]:
    """The OpenAI-shaped error's code and message, or what the body starts with."""
    try:
        error = json.loads(body)["error"]
        return error.get("code"), str(error.get("message"))[:200]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, body[:120].decode("utf-8", "replace")


class Client:
    """One thread's persistent connection, made again after the server closed it."""

    def __init__(self, url: urllib.parse.SplitResult, context: ssl.SSLContext | None, timeout: float,
                 on_connect: Any) -> None:
        self.url, self.context, self.timeout, self.on_connect = url, context, timeout, on_connect
        self.conn: http.client.HTTPConnection | None = None
        self.reused = False

    def connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            host, port = self.url.hostname or "127.0.0.1", self.url.port
            if self.url.scheme == "https":
                self.conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self.context)
            else:
                self.conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            self.reused = False
            self.on_connect()
        else:
            self.reused = True
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Worker(threading.Thread):
    """Sends one workload's requests back to back until told to stop."""

    def __init__(self, load: LoadGenerator, workload: Workload, index: int) -> None:
        super().__init__(name=f"load-{workload.kind}-{workload.model}-{index}", daemon=True)
        self.load, self.workload = load, workload
        self.stopping = threading.Event()
        self.client = Client(load.url, load.context, load.timeout, load.count_connection)

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                phase, started = self.load.begin(self.workload)
                outcome, retried = self.send()
                self.load.record(phase, started, self.workload, outcome, retried)
                # A refusal costs the gateway nothing: pace the loop so it does not flood the log.
                pause = max(self.load.pause, GONE_PAUSE if outcome.result != "ok" else 0.0)
                if pause:
                    self.stopping.wait(pause)
        finally:
            self.client.close()

    def send(self) -> tuple[Outcome, bool]:
        """One request, with the one retry of a request that never reached the server."""
        try:
            return self.exchange(), False
        except STALE_CONNECTION as exc:
            reused = self.client.reused
            self.client.close()
            if not reused:
                return Outcome("failed", message=describe(exc)), False
        except (OSError, http.client.HTTPException) as exc:
            self.client.close()
            return Outcome("failed", message=describe(exc)), False
        try:
            return self.exchange(), True
        except (OSError, http.client.HTTPException) as exc:
            self.client.close()
            return Outcome("failed", message=describe(exc)), True

    def exchange(self) -> Outcome:
        """Send the request; raises only before an answer's status line arrived."""
        conn = self.client.connection()
        headers = {"Content-Type": "application/json", **self.load.headers, **self.workload.headers}
        conn.request("POST", self.load.prefix + PATHS[self.workload.kind], self.workload.body(), headers)
        reply = conn.getresponse()
        try:
            return self.answer(reply)
        finally:
            if reply.will_close or not reply.isclosed():
                # The server closes it, or what is left of the body was not read: a new one next time.
                self.client.close()

    def answer(self, reply: http.client.HTTPResponse) -> Outcome:
        """The outcome of an answer whose status line arrived."""
        status = reply.status
        if status != 200 or self.workload.kind != "stream":
            try:
                body = reply.read()
            except (OSError, http.client.HTTPException) as exc:
                return Outcome("failed", status, message=f"body broke off: {describe(exc)}")
            if status == 200:
                try:
                    json.loads(body)
                except ValueError:
                    return Outcome("failed", status, message=f"body is not JSON: {body[:80]!r}")
                return Outcome("ok", status)
            code, message = error_of(body)
            if status == 404 and code == "model_not_found" and self.workload.may_vanish:
                return Outcome("gone", status, code, message)
            return Outcome("failed", status, code, message)
        sse = read_sse(reply)
        if sse.done:
            # The rest of the chunked body (its last chunk), so the connection can be used again.
            try:
                reply.read()
            except (OSError, http.client.HTTPException):
                self.client.close()
            return Outcome("ok", status, stream=True)
        return Outcome("failed", status, message=sse.error or "", stream=True, cut=sse.cut)


class LoadGenerator:
    """Workloads sent through a gateway until stop(), each request counted in its phase."""

    def __init__(self, base_url: str, api_key: str | None, workloads: Iterable[Workload],
                 verify: str | None = None, timeout: float = 30, pause: float = 0.0) -> None:
        """`verify` is a CA file for HTTPS (None: the system's); `pause` the seconds between two requests."""
        self.url = urllib.parse.urlsplit(base_url)
        if self.url.scheme not in ("http", "https"):
            raise ValueError(f"base_url must be http:// or https://, not {base_url!r}")
        self.prefix = self.url.path.rstrip("/")
        self.context = ssl.create_default_context(cafile=verify) if self.url.scheme == "https" else None
        self.timeout, self.pause = timeout, pause
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.lock = threading.Lock()
        self.workers: list[Worker] = []
        self.pending = list(workloads)
        self.running = False
        self.connections = 0
        self.current = NO_PHASE
        self.phases: dict[str, PhaseResult] = {NO_PHASE: PhaseResult(NO_PHASE, time.monotonic())}

    # ------------------------------------------------------------ running

    def start(self) -> LoadGenerator:
        with self.lock:
            self.running = True
            pending, self.pending = self.pending, []
        for workload in pending:
            self.add(workload)
        return self

    def add(self, workload: Workload) -> None:
        """Start a workload's threads (or queue it, before start())."""
        with self.lock:
            if not self.running:
                self.pending.append(workload)
                return
            workers = [Worker(self, workload, len(self.workers) + i) for i in range(workload.concurrency)]
            self.workers.extend(workers)
        for worker in workers:
            worker.start()

    def remove(self, model: str) -> int:
        """Stop every workload of `model` after its current request; how many threads were told."""
        with self.lock:
            told = [w for w in self.workers if w.workload.model == model and not w.stopping.is_set()]
            self.pending = [w for w in self.pending if w.model != model]
        for worker in told:
            worker.stopping.set()
        return len(told)

    def stop(self, timeout: float | None = None) -> None:
        """Stop every thread and wait for their current requests, at most `timeout` s (default: the request timeout + 5).

        A request still running after that stays `unfinished` in the counts.
        """
        with self.lock:
            self.running = False
            workers = list(self.workers)
        for worker in workers:
            worker.stopping.set()
        deadline = time.monotonic() + (self.timeout + 5 if timeout is None else timeout)
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhaseResult]:
        """Requests that start inside the block count for `name`; after it, for the phase before."""
        with self.lock:
            previous = self.current
            result = self.phases.setdefault(name, PhaseResult(name, time.monotonic()))
            self.current = name
        try:
            yield result
        finally:
            with self.lock:
                result.ended = time.monotonic()
                self.current = previous

    # ------------------------------------------------------------ counting

    def count_connection(self) -> None:
        with self.lock:
            self.connections += 1

    def begin(self, workload: Workload) -> tuple[str, float]:
        """The phase a request starting now belongs to; counts it as sent."""
        with self.lock:
            phase = self.phases[self.current]
            phase.by_kind.setdefault(workload.kind, Counts()).sent += 1
            phase.by_model.setdefault(workload.model, Counts()).sent += 1
            return self.current, time.monotonic()

    def record(self, phase: str, started: float, workload: Workload, outcome: Outcome, retried: bool) -> None:
        with self.lock:
            result = self.phases[phase]
            for counts in (result.by_kind[workload.kind], result.by_model[workload.model]):
                setattr(counts, outcome.result, getattr(counts, outcome.result) + 1)
                counts.streams += outcome.stream
                counts.streams_cut += outcome.cut
                counts.retried += retried
            if outcome.result == "failed":
                if len(result.failures) < MAX_FAILURES:
                    result.failures.append(Failure(workload.kind, workload.model, started - result.started,
                                                   outcome.status, outcome.code, outcome.message))
                else:
                    result.more_failures += 1

    def results(self) -> dict[str, PhaseResult]:
        """A copy of every phase's results so far (the no-phase one only if it has requests)."""
        with self.lock:
            return {name: PhaseResult(p.name, p.started, p.ended,
                                      {k: Counts(**vars(c)) for k, c in p.by_kind.items()},
                                      {m: Counts(**vars(c)) for m, c in p.by_model.items()},
                                      list(p.failures), p.more_failures)
                    for name, p in self.phases.items() if name != NO_PHASE or p.by_kind}

    def report(self) -> str:
        """A table per phase and kind, then each phase's failures."""
        columns = ("sent", "ok", "failed", "gone", "streams", "streams_cut", "retried", "unfinished")
        rows = [("phase", "kind", "seconds", *columns)]
        notes = []
        for phase in self.results().values():
            seconds = f"{(phase.ended or time.monotonic()) - phase.started:.1f}"
            for kind in [k for k in KINDS if k in phase.by_kind] + ["all"]:
                counts = phase.total() if kind == "all" else phase.by_kind[kind]
                rows.append((phase.name, kind, seconds, *(str(getattr(counts, c)) for c in columns)))
            notes += [f"{phase.name}: {failure}" for failure in phase.failures]
            if phase.more_failures:
                notes.append(f"{phase.name}: ... and {phase.more_failures} more failures")
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                 for row in rows]
        return "\n".join([*lines, f"connections opened: {self.connections}", *notes])

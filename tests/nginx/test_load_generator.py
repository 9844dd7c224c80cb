"""The load generator (tests/support/load_generator.py) through a real gateway and test backends.

The shared registry (conftest) behind a gateway of its own, with a client key and no
per-address limit (steady load would hit it), so the counts can be checked against what
the backends received. Every run is bounded to a second or two, on 127.0.0.1.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import start_gateway
from gateway_lab import NGINX, Gateway, nginx_missing, start_backend, stop
from load_generator import LoadGenerator, Workload

KEY = "sk-" + secrets.token_urlsafe(32)
SLOW_STREAM = {"X-Test-Stream-Interval": "0.3"}  # 20 tokens: about 6 s per stream


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    reason = nginx_missing()
    if reason:
        pytest.skip(reason)
    gateway = start_gateway(tmp_path_factory.mktemp("load-gateway"), gateway_api_keys_required=True,
                            llm_api_keys=[{"id": "load", "key": KEY, "models": "all", "rate_per_minute": 0}],
                            gateway_address_rate_per_minute=0, gateway_address_concurrency=0)
    yield gateway
    gateway.stop()


def load(gw: Gateway, *workloads: Workload, **options: object) -> LoadGenerator:
    return LoadGenerator(f"http://127.0.0.1:{gw.http_port}", KEY, workloads, **options)  # type: ignore[arg-type]


def received(gw: Gateway, *names: str, path: str | None = None) -> int:
    return sum(1 for name in names for r in gw.backends[name].requests() if path is None or r["path"] == path)


def test_every_request_is_counted_once_in_the_phase_it_started_in(gw: Gateway) -> None:
    for backend in gw.backends.values():
        backend.clear()
    generator = load(gw, Workload("chat", "chat-small", concurrency=2),
                     Workload("stream", "chat-small", max_tokens=4, headers={"X-Test-Stream-Interval": "0.05"}),
                     Workload("embeddings", "embed-small"), pause=0.01)
    started = time.monotonic()
    with generator.phase("one"):
        generator.start()
        time.sleep(1)
    with generator.phase("two"):
        generator.add(Workload("chat", "chat-large"))
        time.sleep(1)
    assert generator.remove("chat-large") == 1
    with generator.phase("three"):
        time.sleep(1)
        generator.stop()
    took = time.monotonic() - started
    print(f"\n{generator.report()}\n{took:.1f} s")
    results = generator.results()
    assert set(results) == {"one", "two", "three"}  # nothing was sent outside a phase
    for phase in results.values():
        total = phase.total()
        assert total.sent > 0 and total.failed == 0 and total.gone == 0 and total.unfinished == 0, generator.report()
        assert total.sent == total.ok
        stream = phase.kind("stream")
        assert stream.streams == stream.sent and stream.streams_cut == 0
    assert "chat-large" not in results["one"].by_model
    assert results["two"].by_model["chat-large"].ok > 0
    # Removed after two: a request of it that began in two and ended in three counts in two.
    assert results["three"].by_model.get("chat-large") is None
    # What the backends received is exactly what was counted ok: no request lost or sent twice.
    ok = {model: sum(p.by_model[model].ok for p in results.values() if model in p.by_model)
          for model in ("chat-small", "chat-large", "embed-small")}
    assert received(gw, "small-a", "small-b", path="/v1/chat/completions") == ok["chat-small"]
    assert received(gw, "large", path="/v1/chat/completions") == ok["chat-large"]
    assert received(gw, "embed", path="/embeddings") == ok["embed-small"]
    # One persistent connection per thread, reused for every request.
    assert generator.connections == 2 + 1 + 1 + 1
    assert took < 3 + 35


def test_a_model_that_may_vanish_is_gone_on_404_and_any_other_is_failed(gw: Gateway) -> None:
    generator = load(gw, Workload("chat", "retired-model", may_vanish=True),
                     Workload("embeddings", "never-there"), pause=0.02)
    with generator.phase("removed"), generator:
        time.sleep(0.5)
    phase = generator.results()["removed"]
    chat, embeddings = phase.kind("chat"), phase.kind("embeddings")
    assert chat.sent > 0 and chat.gone == chat.sent and chat.failed == 0
    assert embeddings.sent > 0 and embeddings.failed == embeddings.sent and embeddings.gone == 0
    failure = phase.failures[0]
    assert (failure.kind, failure.model, failure.status, failure.code) == ("embeddings", "never-there", 404,
                                                                           "model_not_found")
    assert len(phase.failures) == min(embeddings.failed, 20)
    assert phase.more_failures == max(0, embeddings.failed - 20)


def test_https_with_the_gateway_s_ca_and_refused_without_it(gw: Gateway) -> None:
    certificate = str(gw.root / "llm" / "gateway.crt")
    generator = LoadGenerator(f"https://localhost:{gw.https_port}", KEY, [Workload("chat", "chat-small")],
                              verify=certificate, pause=0.02)
    with generator.phase("tls"), generator:
        time.sleep(0.5)
    tls = generator.results()["tls"].total()
    assert tls.ok > 0 and tls.ok == tls.sent, generator.report()
    untrusted = LoadGenerator(f"https://localhost:{gw.https_port}", KEY, [Workload("chat", "chat-small")],
                              pause=0.1)
    with untrusted.phase("untrusted"), untrusted:
        time.sleep(0.3)
    phase = untrusted.results()["untrusted"]
    assert phase.total().ok == 0 and phase.total().failed == phase.total().sent > 0
    assert "SSLCertVerificationError" in phase.failures[0].message


def test_a_backend_killed_mid_stream_gives_cut_streams_and_spares_the_rest(gw: Gateway) -> None:
    large = gw.backends["large"]
    generator = load(gw, Workload("stream", "chat-large", concurrency=2, max_tokens=20, headers=SLOW_STREAM),
                     Workload("chat", "chat-small"), pause=0.02)
    try:
        with generator.phase("kill"), generator:
            time.sleep(1)  # both streams are a few events in
            # Told to stop first, so no new request follows the cut ones.
            generator.remove("chat-large")
            large.proc.kill()
            time.sleep(0.5)
    finally:
        stop(large.proc)
        gw.backends["large"] = start_backend(large.models, large.host, large.port)
    print(f"\n{generator.report()}")
    phase = generator.results()["kill"]
    stream = phase.kind("stream")
    assert (stream.sent, stream.streams, stream.streams_cut, stream.failed, stream.ok) == (2, 2, 2, 2, 0)
    cuts = [f for f in phase.failures if f.kind == "stream"]
    # nginx 1.22 ends the chunked answer cleanly when its upstream dies: only the missing [DONE] tells.
    assert len(cuts) == 2 and all(f.status == 200 and ("without [DONE]" in f.message or "broke off" in f.message)
                                  for f in cuts), cuts
    chat = phase.kind("chat")
    assert chat.ok > 0 and chat.failed == 0 and chat.unfinished == 0


def test_reloads_under_load_fail_nothing_and_connections_are_made_again(gw: Gateway) -> None:
    """nginx's old workers close idle keep-alive connections on a reload: the clients reconnect."""
    for backend in gw.backends.values():
        backend.clear()
    generator = load(gw, Workload("chat", "chat-small", concurrency=2), Workload("embeddings", "embed-small"))
    with generator.phase("reloads"), generator:
        for _ in range(3):
            time.sleep(0.4)
            subprocess.run([NGINX, "-p", str(gw.root), "-c", str(gw.root / "nginx.conf"), "-s", "reload"],
                           check=True, capture_output=True)
        time.sleep(0.4)
    print(f"\n{generator.report()}")
    total = generator.results()["reloads"].total()
    assert total.sent > 0 and total.failed == 0 and total.ok == total.sent, generator.report()
    # A retried request had not reached a backend: each was received once.
    assert received(gw, "small-a", "small-b", path="/v1/chat/completions") + received(gw, "embed", path="/embeddings") \
        == total.ok
    # Three threads; each reload closed their connections (once answered), so they made new ones.
    assert generator.connections > 3

"""The gateway's security end to end: TLS from the internal CA, API keys, limits, admin paths, backend keys.

Keys, admin password and model servers' keys were generated on the controller by the
converge (ansible.builtin.password lookups into the inventory's credentials/ directory).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import openai
import pytest
import requests
from lab_pytest import (GATEWAY_PATHS, api_key, assert_openai_error, bearer, credential, get, json_endpoints, landed,
                        post, run_playbook)
from sslyze import (Scanner, ScanCommand, ServerNetworkLocation, ServerScanRequest, ServerScanStatusEnum)

testinfra_hosts = ["llm_gateways"]

KEY_IDS = ("tests", "chat-small-only", "expired", "metered", "single-stream")
# Mozilla's intermediate profile for TLS 1.2: forward secrecy and an AEAD cipher.
STRONG_TLS12 = ("ECDHE", "GCM", "CHACHA20")


@pytest.fixture(scope="module")
def gateway_host(inventory) -> str:
    return inventory["llm_gateways"]["hosts"][0]


@pytest.fixture(scope="module")
def https_url(gateway_url) -> str:
    return gateway_url.replace("http://", "https://")


@pytest.fixture(scope="module")
def ca_file(host, tmp_path_factory) -> Path:
    """The internal CA's certificate, as a client would be given it."""
    path = tmp_path_factory.mktemp("ca") / "ca.crt"
    path.write_text(host.file("/etc/ssl/llm/ca.crt").content_string)
    return path


def body_for(model: str, endpoint: str) -> bytes:
    bodies = {"chat": {"messages": [{"role": "user", "content": "hi"}]}, "completions": {"prompt": "hi"},
              "embeddings": {"input": "hi"}, "rerank": {"query": "q", "documents": ["d"]},
              "responses": {"input": "hi"}, "score": {"text_1": "a", "text_2": "b"},
              "tokenize": {"prompt": "hi"}, "detokenize": {"tokens": [1, 2]}}
    return json.dumps({"model": model, **bodies[endpoint]}).encode()


# ---------------------------------------------------------------- TLS


def test_tls_scan_finds_nothing_below_tls12_and_no_weak_cipher(address_of, gateway_host):
    commands = {ScanCommand.SSL_2_0_CIPHER_SUITES, ScanCommand.SSL_3_0_CIPHER_SUITES,
                ScanCommand.TLS_1_0_CIPHER_SUITES, ScanCommand.TLS_1_1_CIPHER_SUITES,
                ScanCommand.TLS_1_2_CIPHER_SUITES, ScanCommand.TLS_1_3_CIPHER_SUITES}
    location = ServerNetworkLocation(hostname=address_of(gateway_host), port=443, ip_address=address_of(gateway_host))
    scanner = Scanner()
    scanner.queue_scans([ServerScanRequest(server_location=location, scan_commands=commands)])
    [result] = list(scanner.get_results())
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    scan = result.scan_result
    for old in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"):
        attempt = getattr(scan, old)
        assert attempt.result is not None, (old, attempt.error_trace)
        assert attempt.result.accepted_cipher_suites == [], old
    tls12 = [suite.cipher_suite.name for suite in scan.tls_1_2_cipher_suites.result.accepted_cipher_suites]
    tls13 = [suite.cipher_suite.name for suite in scan.tls_1_3_cipher_suites.result.accepted_cipher_suites]
    print(f"\nTLS 1.2 suites: {tls12}\nTLS 1.3 suites: {tls13}")
    assert tls12 and tls13
    weak = [name for name in tls12 if "ECDHE" not in name or not ("GCM" in name or "CHACHA20" in name)]
    assert weak == []


def test_the_openai_client_verifies_the_gateway_with_only_the_internal_ca(https_url, ca_file):
    with openai.DefaultHttpxClient(verify=str(ca_file), timeout=30) as http_client:
        client = openai.OpenAI(base_url=f"{https_url}/v1", api_key=api_key(), max_retries=0, http_client=http_client)
        reply = client.chat.completions.create(model="chat-small", messages=[{"role": "user", "content": "hi"}])
    assert reply.model == "chat-small"
    # And a client that trusts only the system's CAs refuses it.
    with openai.DefaultHttpxClient(timeout=10) as http_client:
        client = openai.OpenAI(base_url=f"{https_url}/v1", api_key=api_key(), max_retries=0, http_client=http_client)
        with pytest.raises(openai.APIConnectionError):
            client.models.list()


def test_answers_over_tls_carry_hsts_and_no_server_version(https_url, ca_file):
    response = requests.get(f"{https_url}/v1/models", headers=bearer(), verify=str(ca_file), timeout=10)
    assert response.status_code == 200
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    assert response.headers["Server"] == "nginx"


# ---------------------------------------------------------------- API keys


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-not-a-key-of-this-gateway-0000000"},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}], ids=["none", "wrong", "malformed"])
def test_without_a_valid_key_every_api_path_is_401(gateway_url, clean, headers):
    for endpoint in GATEWAY_PATHS:
        response = post(gateway_url, endpoint, body_for("chat-small", endpoint), headers=headers or {"Authorization": ""})
        assert_openai_error(response, 401, "invalid_api_key")
        if headers:
            assert headers["Authorization"].split()[1] not in response.text
    assert landed(clean) == {}


def test_an_expired_key_is_401_and_not_echoed(gateway_url, clean):
    response = post(gateway_url, "chat", body_for("chat-small", "chat"), headers=bearer("expired"))
    assert_openai_error(response, 401, "expired_api_key")
    assert api_key("expired") not in response.text
    assert landed(clean) == {}


def test_a_key_gets_the_unknown_model_answer_for_models_outside_its_list(gateway_url, registry, clean):
    only = bearer("chat-small-only")
    for entry in registry:
        for endpoint in json_endpoints(entry):
            response = post(gateway_url, endpoint, body_for(entry["name"], endpoint), headers=only)
            if entry["name"] == "chat-small":
                assert response.status_code == 200, response.text
                continue
            error = assert_openai_error(response, 404, "model_not_found")
            unknown = assert_openai_error(post(gateway_url, endpoint, body_for("no-such-model", endpoint),
                                               headers=only), 404, "model_not_found")
            assert error["message"].replace(entry["name"], "X") == unknown["message"].replace("no-such-model", "X")
    assert set(landed(clean)) <= {("chat-small", host) for host in ("mol-gpu1", "mol-gpu2", "mol-gpu3")}


def test_models_list_differs_per_key(gateway_url, registry):
    def listed(key_id):
        return sorted(model["id"] for model in get(gateway_url, "/v1/models", key_id).json()["data"])

    assert listed("tests") == sorted(entry["name"] for entry in registry)
    assert listed("chat-small-only") == ["chat-small"]
    assert_openai_error(get(gateway_url, "/v1/models/chat-large", "chat-small-only"), 404, "model_not_found")


@pytest.mark.parametrize("raw", [
    b'{"model": "chat-small", "messages": [], "model": "chat-large"}',
    b'{"model": "chat-large", "metadata": {"model": "chat-small"}, "messages": []}',
    b'{"mod\\u0065l": "chat-large", "messages": []}',
])
def test_duplicate_or_nested_model_keys_cannot_reach_a_model_the_key_may_not_use(gateway_url, clean, raw):
    assert_openai_error(post(gateway_url, "chat", raw, headers=bearer("chat-small-only")), 404, "model_not_found")
    assert landed(clean) == {}


def test_the_backend_gets_the_model_servers_key_and_never_the_clients(gateway_url, clean):
    assert post(gateway_url, "chat", body_for("chat-large", "chat")).status_code == 200
    [(where, [record])] = landed(clean).items()
    assert where == ("chat-large", "mol-gpu1")
    assert record["headers"]["authorization"] == [f"Bearer {credential('backend-keys/chat-large')}"]
    assert api_key() not in json.dumps(record)


# ---------------------------------------------------------------- limits


def test_past_its_rate_a_key_gets_429_with_retry_after(gateway_url):
    statuses = [post(gateway_url, "chat", body_for("chat-small", "chat"), headers=bearer("metered"))
                for _ in range(3)]
    assert [r.status_code for r in statuses[:1]] == [200]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited, [r.status_code for r in statuses]
    assert_openai_error(limited[0], 429, "rate_limit_exceeded")
    assert int(limited[0].headers["Retry-After"]) >= 1


def test_past_the_address_rate_requests_get_429(lab_host, address_of, gateway_host):
    """From another lab host, so that its address has a bucket of its own."""
    script = (
        "import http.client, os, collections\n"
        "statuses = collections.Counter()\n"
        "for _ in range(150):\n"
        f"    c = http.client.HTTPConnection('{address_of(gateway_host)}', 80, timeout=10)\n"
        "    c.request('GET', '/v1/models', headers={'Authorization': 'Bearer ' + os.environ['KEY']})\n"
        "    r = c.getresponse(); r.read()\n"
        "    statuses[(r.status, r.getheader('Retry-After'))] += 1\n"
        "print(dict(statuses))\n")
    out = lab_host("mol-gpu2").check_output(f"KEY={api_key()} python3 - <<'EOF'\n{script}EOF")
    statuses = eval(out)  # noqa: S307 - a dict literal printed by the script above
    assert statuses.get((200, None), 0) >= 1, statuses
    limited = {key: count for key, count in statuses.items() if key[0] == 429}
    assert limited and all(int(retry) >= 1 for _, retry in limited), statuses


def test_the_concurrency_cap_holds_with_parallel_streams(gateway_url):
    headers = {**bearer("single-stream"), "X-Test-Stream-Interval": "0.3"}
    body = json.dumps({"model": "chat-small", "stream": True, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "count"}]}).encode()
    first: list[int] = []
    stream = threading.Thread(target=lambda: first.append(post(gateway_url, "chat", body, headers).status_code))
    stream.start()
    time.sleep(0.8)
    second = post(gateway_url, "chat", body, headers)
    stream.join()
    assert first == [200]
    assert_openai_error(second, 429, "concurrency_limit_exceeded")
    assert post(gateway_url, "chat", body_for("chat-small", "chat"), headers=bearer("single-stream")).status_code == 200


# ---------------------------------------------------------------- admin paths


def test_admin_paths_need_the_htpasswd_user(gateway_url):
    assert_openai_error(requests.get(f"{gateway_url}/ready", timeout=10), 401, "admin_credentials_required")
    assert requests.get(f"{gateway_url}/ready", auth=("admin", "wrong"), timeout=10).status_code == 401
    assert requests.get(f"{gateway_url}/ready", headers=bearer(), timeout=10).status_code == 401
    ready = requests.get(f"{gateway_url}/ready", auth=("admin", credential("admin-password")), timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"


# ---------------------------------------------------------------- no key in the clear


def _every_secret() -> list[str]:
    return [api_key(key_id) for key_id in KEY_IDS]


def test_no_client_key_is_on_the_gateway_in_its_logs_or_journal(host):
    time.sleep(1.5)  # the access log is flushed every second
    patterns = " ".join(f"-e {key}" for key in _every_secret())
    found = host.run(f"grep -rIlF {patterns} / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev 2>/dev/null")
    assert found.stdout.strip() == "", found.stdout
    journal = host.run(f"journalctl --no-pager | grep -cF {patterns}")
    assert journal.stdout.strip() == "0", "a key is in the journal"


def test_a_verbose_run_prints_no_key(tmp_path):
    result = run_playbook("playbooks/gateways.yml", tmp_path, None, "-v")
    assert result.returncode == 0, result.stdout[-3000:]
    output = result.stdout + result.stderr
    for key in [*_every_secret(), credential("admin-password"), credential("backend-keys/chat-small")]:
        assert key not in output

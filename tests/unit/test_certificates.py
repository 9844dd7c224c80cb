"""The certificates role's decisions (roles/certificates/filter_plugins/certificates.py).

Certificates here are made with `cryptography` in memory, the way the role's CA
makes them, so each test can shape exactly the case it checks: a moved key, a
changed name, another CA, a certificate near its end, a chain out of order.
The ACME path cannot run in the lab (no ACME CA reaches it), so the certbot
command and the deploy hook it saves are checked here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shlex
import subprocess
from pathlib import Path

import certificates as plugin
import jinja2
import pytest
from ansible.errors import AnsibleFilterError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.timezone.utc)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        kind, _, value = name.partition(":")
        entries.append(x509.DNSName(value) if kind == "DNS" else x509.IPAddress(ipaddress.ip_address(value)))
    return x509.SubjectAlternativeName(entries)


def _pem(obj: x509.Certificate | x509.CertificateSigningRequest) -> str:
    return obj.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> str:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption).decode()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Authority:
    """A CA as the role makes one: its own key, a self-signed certificate with CA:TRUE."""

    def __init__(self, name: str = "llm-gateway internal CA", issuer: Authority | None = None) -> None:
        self.key = _key()
        signer = issuer or self
        builder = (x509.CertificateBuilder().subject_name(_name(name))
                   .issuer_name(_name(name) if issuer is None else issuer.certificate.subject)
                   .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=3650))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
        self.certificate = builder.sign(signer.key if issuer else self.key, hashes.SHA256())

    @property
    def pem(self) -> str:
        return _pem(self.certificate)

    def issue(self, key: ec.EllipticCurvePrivateKey, names: list[str], days_left: float = 397,
              common_name: str = "gw1") -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.certificate.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(NOW - dt.timedelta(days=30)).not_valid_after(NOW + dt.timedelta(days=days_left))
                .add_extension(_san(names), critical=False)
                .sign(self.key, hashes.SHA256()))


def _csr(key: ec.EllipticCurvePrivateKey, names: list[str]) -> str:
    request = (x509.CertificateSigningRequestBuilder().subject_name(_name("gw1"))
               .add_extension(_san(names), critical=False).sign(key, hashes.SHA256()))
    return _pem(request)


NAMES = ["DNS:gw1", "IP:10.0.0.5"]


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority()


@pytest.fixture(scope="module")
def host_key() -> ec.EllipticCurvePrivateKey:
    return _key()


# --- subjectAltNames -------------------------------------------------------------


def test_names_are_the_host_then_its_addresses_then_the_extra_names() -> None:
    names = plugin.certificates_subject_alt_names("GW1", ["10.0.0.5", "fd00::0:5"], ["dns:API.Example.org", "IP:10.0.0.5"])
    assert names == ["DNS:gw1", "IP:10.0.0.5", "IP:fd00::5", "DNS:api.example.org"]


def test_a_single_address_and_no_extra_names() -> None:
    assert plugin.certificates_subject_alt_names("gw1", "10.0.0.5", []) == ["DNS:gw1", "IP:10.0.0.5"]


def test_an_inventory_name_that_is_an_address_becomes_an_ip_name() -> None:
    assert plugin.certificates_subject_alt_names("10.0.0.5", None, None) == ["IP:10.0.0.5"]


def test_a_wildcard_is_allowed_as_the_whole_first_label() -> None:
    assert plugin.certificates_subject_alt_names("gw1", [], ["DNS:*.llm.example.org"])[-1] == "DNS:*.llm.example.org"


@pytest.mark.parametrize(("extra", "message"), [
    (["gw.example.org"], "must start with DNS: or IP:"),
    (["URI:https://x"], "must start with DNS: or IP:"),
    (["IP:10.0.0.300"], "is no IP address"),
    (["DNS:bad_name.example.org"], "label 'bad_name'"),
    (["DNS:-x.example.org"], "label '-x'"),
    (["DNS:a.*.example.org"], "label '*'"),
    (["DNS:*.org"], "a wildcard needs at least two labels"),
    (["DNS:10.0.0.5"], "belongs in IP:"),
    (["DNS:" + "a" * 64 + ".org"], "label"),
])
def test_bad_extra_names_are_refused_with_the_entry(extra: list[str], message: str) -> None:
    with pytest.raises(AnsibleFilterError, match="certificates_extra_names") as raised:
        plugin.certificates_subject_alt_names("gw1", [], extra)
    assert message in str(raised.value)
    assert repr(extra[0]) in str(raised.value)


def test_every_bad_name_is_reported_in_one_error() -> None:
    with pytest.raises(AnsibleFilterError) as raised:
        plugin.certificates_subject_alt_names("gw_1", ["not-an-ip"], ["IP:x", "FOO:y"])
    text = str(raised.value)
    assert "inventory_hostname 'gw_1'" in text
    assert "host address 'not-an-ip'" in text
    assert "'IP:x' is no IP address" in text
    assert "'FOO:y' must start with DNS: or IP:" in text


# --- re-issue decisions ---------------------------------------------------------------


def test_a_current_certificate_is_kept(ca: Authority, host_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = _pem(ca.issue(host_key, NAMES))
    assert plugin.certificates_reissue_reasons(certificate, _csr(host_key, NAMES), ca.pem, 30, now=NOW) == []


def test_the_order_and_case_of_names_do_not_matter(ca: Authority, host_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = _pem(ca.issue(host_key, ["IP:10.0.0.5", "DNS:GW1"]))
    assert plugin.certificates_reissue_reasons(certificate, _csr(host_key, NAMES), ca.pem, 30, now=NOW) == []


def test_no_certificate_is_a_reason(ca: Authority, host_key: ec.EllipticCurvePrivateKey) -> None:
    assert plugin.certificates_reissue_reasons("", _csr(host_key, NAMES), ca.pem, 30, now=NOW) == [
        "the host has no certificate yet"]


def test_an_unreadable_certificate_is_a_reason(ca: Authority, host_key: ec.EllipticCurvePrivateKey) -> None:
    [reason] = plugin.certificates_reissue_reasons("garbage", _csr(host_key, NAMES), ca.pem, 30, now=NOW)
    assert reason.startswith("its certificate cannot be read")


def test_a_certificate_within_the_margin_is_reissued(ca: Authority, host_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = _pem(ca.issue(host_key, NAMES, days_left=29.5))
    [reason] = plugin.certificates_reissue_reasons(certificate, _csr(host_key, NAMES), ca.pem, 30, now=NOW)
    assert "within the renewal margin of 30 days" in reason
    assert plugin.certificates_reissue_reasons(certificate, _csr(host_key, NAMES), ca.pem, 29, now=NOW) == []


def test_an_expired_certificate_is_reissued(ca: Authority, host_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = _pem(ca.issue(host_key, NAMES, days_left=-2))
    assert plugin.certificates_reissue_reasons(certificate, _csr(host_key, NAMES), ca.pem, 1, now=NOW)


def test_changed_names_are_a_reason_that_says_which(ca: Authority, host_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = _pem(ca.issue(host_key, NAMES))
    wanted = ["DNS:gw1", "DNS:api.example.org"]
    [reason] = plugin.certificates_reissue_reasons(certificate, _csr(host_key, wanted), ca.pem, 30, now=NOW)
    assert reason == "its names changed (missing DNS:api.example.org; no longer wanted IP:10.0.0.5)"


def test_another_key_on_the_host_is_a_reason(ca: Authority, host_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = _pem(ca.issue(host_key, NAMES))
    assert plugin.certificates_reissue_reasons(certificate, _csr(_key(), NAMES), ca.pem, 30, now=NOW) == [
        "it does not carry the host's current key"]


def test_a_certificate_of_another_ca_with_the_same_name_is_reissued(host_key: ec.EllipticCurvePrivateKey) -> None:
    """A CA made anew under the same name has another key: the signature, not the name, decides."""
    old, new = Authority(), Authority()
    certificate = _pem(old.issue(host_key, NAMES))
    [reason] = plugin.certificates_reissue_reasons(certificate, _csr(host_key, NAMES), new.pem, 30, now=NOW)
    assert reason.startswith("it was not signed by the current CA")


def test_only_the_first_certificate_of_the_file_is_judged(ca: Authority, host_key: ec.EllipticCurvePrivateKey) -> None:
    certificate = _pem(ca.issue(host_key, NAMES)) + ca.pem
    assert plugin.certificates_reissue_reasons(certificate, _csr(host_key, NAMES), ca.pem, 30, now=NOW) == []


# --- vaulted pairs ------------------------------------------------------------------------


def test_a_matching_pair_with_its_intermediate_has_no_problems(host_key: ec.EllipticCurvePrivateKey) -> None:
    root = Authority("root")
    intermediate = Authority("intermediate", issuer=root)
    chain = _pem(intermediate.issue(host_key, NAMES)) + intermediate.pem
    assert plugin.certificates_pair_problems(chain, _key_pem(host_key)) == []


def test_a_key_of_another_certificate_is_a_mismatch(ca: Authority, host_key: ec.EllipticCurvePrivateKey) -> None:
    chain = _pem(ca.issue(host_key, NAMES))
    [problem] = plugin.certificates_pair_problems(chain, _key_pem(_key()))
    assert "key and certificate do not match" in problem
    assert "CN=gw1" in problem


def test_problems_never_quote_the_key(ca: Authority, host_key: ec.EllipticCurvePrivateKey) -> None:
    other = _key_pem(_key())
    problems = plugin.certificates_pair_problems(_pem(ca.issue(host_key, NAMES)), other)
    body = "".join(other.splitlines()[1:-1])
    assert problems and not any(body[:40] in problem for problem in problems)


def test_a_chain_out_of_order_is_a_problem(host_key: ec.EllipticCurvePrivateKey) -> None:
    root = Authority("root")
    intermediate = Authority("intermediate", issuer=root)
    chain = _pem(intermediate.issue(host_key, NAMES)) + root.pem + intermediate.pem
    problems = plugin.certificates_pair_problems(chain, _key_pem(host_key))
    assert len(problems) == 2
    assert problems[0].startswith("certificate 2 (CN=root) did not issue certificate 1 (CN=gw1)")


def test_the_ca_must_have_issued_the_chain(ca: Authority, host_key: ec.EllipticCurvePrivateKey) -> None:
    chain = _pem(ca.issue(host_key, NAMES))
    assert plugin.certificates_pair_problems(chain, _key_pem(host_key), ca.pem) == []
    assert plugin.certificates_pair_problems(chain + ca.pem, _key_pem(host_key), ca.pem) == []
    [problem] = plugin.certificates_pair_problems(chain, _key_pem(host_key), Authority("other").pem)
    assert problem == "the CA certificate (CN=other) did not issue the last certificate of the chain (CN=gw1)"
    assert plugin.certificates_pair_problems(chain, _key_pem(host_key), "junk") == ["the CA certificate cannot be read"]


@pytest.mark.parametrize(("chain", "key", "message"), [
    ("", None, "holds no PEM certificate"),
    ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", None, "cannot be read"),
    (None, "not a key", "no readable PEM private key"),
    (None, b"secret", "the key is encrypted"),
])
def test_unusable_input_is_named(ca: Authority, host_key: ec.EllipticCurvePrivateKey,
                                 chain: str | None, key: str | bytes | None, message: str) -> None:
    chain_pem = _pem(ca.issue(host_key, NAMES)) if chain is None else chain
    if key is None:
        key_pem = _key_pem(host_key)
    elif isinstance(key, bytes):
        key_pem = _key_pem(host_key, password=key)
    else:
        key_pem = key
    problems = plugin.certificates_pair_problems(chain_pem, key_pem)
    assert any(message in problem for problem in problems), problems


@pytest.mark.parametrize(("days_left", "state"), [(200, "valid"), (10, "expiring"), (-1, "expired")])
def test_expiry_states(ca: Authority, host_key: ec.EllipticCurvePrivateKey, days_left: int, state: str) -> None:
    expiry = plugin.certificates_expiry(_pem(ca.issue(host_key, NAMES, days_left=days_left)), 30, now=NOW)
    assert expiry["state"] == state
    assert expiry["days_left"] == days_left
    assert expiry["subject"] == "CN=gw1"
    assert expiry["not_after"] == (NOW + dt.timedelta(days=days_left)).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- certbot -------------------------------------------------------------------------------

ACME = {
    "domains": ["LLM.example.org", "api.example.org"],
    "email": "ops@example.org",
    "server": "https://acme-v02.api.letsencrypt.org/directory",
    "challenge": "webroot",
    "webroot": "/var/lib/llm-acme",
    "key_type": "ecdsa_p256",
    "rsa_key_size": 3072,
    "cert_name": "llm-gateway",
    "deploy_hook": "/usr/local/lib/llm-certificates/certbot-deploy-hook",
}


def test_certbot_webroot_command() -> None:
    assert plugin.certificates_certbot_args(ACME) == [
        "certbot", "certonly", "--non-interactive", "--agree-tos", "--keep-until-expiring",
        "--cert-name", "llm-gateway", "--server", "https://acme-v02.api.letsencrypt.org/directory",
        "--email", "ops@example.org", "--key-type", "ecdsa", "--elliptic-curve", "secp256r1",
        "--webroot", "--webroot-path", "/var/lib/llm-acme",
        "--deploy-hook", "/usr/local/lib/llm-certificates/certbot-deploy-hook",
        "--domain", "llm.example.org", "--domain", "api.example.org",
    ]


def test_certbot_standalone_rsa_without_email() -> None:
    argv = plugin.certificates_certbot_args({**ACME, "challenge": "standalone", "email": "",
                                             "key_type": "rsa", "rsa_key_size": 4096})
    assert "--standalone" in argv and "--webroot" not in argv
    assert "--register-unsafely-without-email" in argv and "--email" not in argv
    assert argv[argv.index("--key-type") + 1:argv.index("--key-type") + 4] == ["rsa", "--rsa-key-size", "4096"]


def test_certbot_p384() -> None:
    argv = plugin.certificates_certbot_args({**ACME, "key_type": "ecdsa_p384"})
    assert argv[argv.index("--elliptic-curve") + 1] == "secp384r1"


def test_certbot_settings_are_all_checked_at_once() -> None:
    with pytest.raises(AnsibleFilterError) as raised:
        plugin.certificates_certbot_args({**ACME, "domains": ["ok.example.org", "bad name"], "email": "nobody",
                                          "server": "http://acme.example.org", "webroot": "relative"})
    text = str(raised.value)
    for part in ("'bad name' is no DNS name", "'nobody' is no e-mail address", "must be an https:// URL",
                 "'relative' must be an absolute path"):
        assert part in text


def test_certbot_needs_domains() -> None:
    with pytest.raises(AnsibleFilterError, match="certificates_acme_domains is empty"):
        plugin.certificates_certbot_args({**ACME, "domains": []})


# --- certbot's deploy hook -------------------------------------------------------------------
# Rendered from the role's template and run with stand-ins for install, mv and systemctl that
# log their arguments, so what the hook would do on a renewal is seen without root or systemd.

HOOK_VARS = {
    "ansible_managed": "Ansible managed",
    "__certificates_acme_live_dir": "/etc/letsencrypt/live/llm",
    "certificates_key_group": "www-data",
    "certificates_server_key_path": "/etc/ssl/llm/server.key",
    "certificates_server_certificate_path": "/etc/ssl/llm/server.crt",
}


def _render_hook(services: list[str]) -> str:
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    environment.filters["quote"] = shlex.quote
    template = (REPO / "roles" / "certificates" / "templates" / "certbot-deploy-hook.j2").read_text()
    return environment.from_string(template).render(**HOOK_VARS, certificates_reload_services=services)


def _run_hook(tmp_path: Path, services: list[str], lineage: str, active: set[str]) -> list[str]:
    hook = tmp_path / "hook"
    hook.write_text(_render_hook(services))
    hook.chmod(0o755)
    log = tmp_path / "log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("install", "mv"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
    active_list = " ".join(sorted(active))
    (bin_dir / "systemctl").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = is-active ]; then for s in {active_list}; do [ "$s" = "$3" ] && exit 0; done; exit 3; fi\n'
        f'echo "systemctl $*" >> {log}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RENEWED_LINEAGE": lineage}
    subprocess.run([str(hook)], check=True, env=env)
    return log.read_text().splitlines() if log.exists() else []


def test_the_deploy_hook_is_valid_shell() -> None:
    for services in ([], ["nginx"], ["nginx", "other service"]):
        subprocess.run(["sh", "-n"], input=_render_hook(services), text=True, check=True)


def test_the_deploy_hook_installs_the_pair_then_reloads_only_running_services(tmp_path: Path) -> None:
    steps = _run_hook(tmp_path, ["nginx", "stopped"], "/etc/letsencrypt/live/llm", active={"nginx"})
    assert steps == [
        "install -m 0640 -o root -g www-data /etc/letsencrypt/live/llm/privkey.pem /etc/ssl/llm/server.key.new",
        "install -m 0644 -o root -g root /etc/letsencrypt/live/llm/fullchain.pem /etc/ssl/llm/server.crt.new",
        "mv -f /etc/ssl/llm/server.key.new /etc/ssl/llm/server.key",
        "mv -f /etc/ssl/llm/server.crt.new /etc/ssl/llm/server.crt",
        "systemctl reload nginx",
    ]


def test_the_deploy_hook_leaves_other_lineages_alone(tmp_path: Path) -> None:
    assert _run_hook(tmp_path, ["nginx"], "/etc/letsencrypt/live/other", active={"nginx"}) == []

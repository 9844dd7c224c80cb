"""Filters of the certificates role: names, re-issue decisions, vault pairs, certbot's arguments.

These are the role's decisions, kept out of Jinja so that each is unit tested
(tests/unit/test_certificates.py): which subjectAltNames a host gets, whether the
certificate it has must be re-issued (and why), whether a vaulted certificate and
key belong together, and the exact certbot command. They run on the controller
and parse PEM with `cryptography`, which ansible-core depends on.

Filters:
    certificates_subject_alt_names(hostname, addresses, extra) -> ["DNS:..", "IP:.."]
    certificates_reissue_reasons(cert_pem, csr_pem, ca_pem, renew_before_days) -> [reason]
    certificates_pair_problems(chain_pem, key_pem, ca_pem)     -> [problem]
    certificates_expiry(chain_pem, renew_before_days)          -> {state, not_after, days_left, subject}
    certificates_certbot_args(settings)                        -> argv of `certbot certonly`
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ansible.errors import AnsibleFilterError
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

# One DNS label: letters, digits and inner hyphens (RFC 1123); dNSName entries
# allow nothing else, and clients reject certificates that carry more.
LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
DNS_NAME_MAX = 253
PEM_CERT_RE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
CHALLENGES = ("webroot", "standalone")
KEY_TYPES = ("ecdsa_p256", "ecdsa_p384", "rsa")


def _dns_problem(name: str) -> str | None:
    """Why `name` is no valid dNSName, or None; a wildcard may only be the whole first label."""
    if len(name) > DNS_NAME_MAX:
        return f"longer than {DNS_NAME_MAX} characters"
    labels = name.split(".")
    if labels[0] == "*":
        if len(labels) < 3:
            return "a wildcard needs at least two labels after it (*.example.org)"
        labels = labels[1:]
    for label in labels:
        if not LABEL_RE.match(label):
            return f"label {label!r} is not letters, digits and inner hyphens"
    if labels[-1].isdigit():
        return "the last label is all digits (an address belongs in IP:)"
    return None


def _ip(text: str) -> str | None:
    """The canonical text of an IP address, or None when `text` is none."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        return list(value)
    return [value]


def certificates_subject_alt_names(hostname: str, addresses: Any = None, extra: Any = None) -> list[str]:
    """The host's subjectAltNames: its inventory name, its address(es), then the extra names.

    Names are normalised (prefix upper case, DNS names lower case, IPs canonical) and
    each appears once, so the list compares equal to what a certificate carries. Every
    bad entry is reported in one error, with where it came from.
    """
    wanted: list[str] = []
    errors: list[str] = []

    def add(entry: str) -> None:
        if entry not in wanted:
            wanted.append(entry)

    host = str(hostname).strip().lower()
    if _ip(host):
        add(f"IP:{_ip(host)}")
    elif (problem := _dns_problem(host)) is None:
        add(f"DNS:{host}")
    else:
        errors.append(f"inventory_hostname {hostname!r} is no DNS name ({problem}); rename the host "
                      "or give it an alias that is one")
    for address in _as_list(addresses):
        if _ip(str(address).strip()):
            add(f"IP:{_ip(str(address).strip())}")
        else:
            errors.append(f"host address {address!r} is no IP address")
    for entry in _as_list(extra):
        kind, sep, value = str(entry).partition(":")
        kind, value = kind.strip().upper(), value.strip()
        if not sep or kind not in ("DNS", "IP"):
            errors.append(f"certificates_extra_names: {entry!r} must start with DNS: or IP:")
        elif kind == "IP":
            if _ip(value):
                add(f"IP:{_ip(value)}")
            else:
                errors.append(f"certificates_extra_names: {entry!r} is no IP address")
        elif (problem := _dns_problem(value.lower())) is None:
            add(f"DNS:{value.lower()}")
        else:
            errors.append(f"certificates_extra_names: {entry!r} is no DNS name ({problem})")
    if errors:
        raise AnsibleFilterError("subjectAltNames: " + "; ".join(errors))
    return wanted


def _certificates(pem: str) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, in order (text around them, as in vault files, is ignored)."""
    blocks = PEM_CERT_RE.findall(pem or "")
    return [x509.load_pem_x509_certificate(block.encode()) for block in blocks]


def _names_of(extensions: x509.Extensions) -> set[str]:
    """The DNS and IP subjectAltNames, spelled as certificates_subject_alt_names spells them."""
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return ({f"DNS:{name.lower()}" for name in san.get_values_for_type(x509.DNSName)}
            | {f"IP:{address}" for address in san.get_values_for_type(x509.IPAddress)})


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer` signed `certificate` (name chaining and the signature itself)."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.timezone.utc)


def _subject(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string() or "(empty subject)"


def certificates_reissue_reasons(cert_pem: str, csr_pem: str, ca_pem: str, renew_before_days: int,
                                 now: dt.datetime | None = None) -> list[str]:
    """Why the host's certificate must be issued anew; an empty list keeps it.

    The request (CSR) made on the host says what the certificate must be: its key and
    its names. A certificate is kept only if it carries both, was signed by the current
    CA, and still has more than `renew_before_days` to run.
    """
    if not (cert_pem or "").strip():
        return ["the host has no certificate yet"]
    try:
        certificate = _certificates(cert_pem)[0]
    except (IndexError, ValueError) as error:
        return [f"its certificate cannot be read ({error or 'no PEM certificate'})"]
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    ca = _certificates(ca_pem)[0]
    reasons: list[str] = []
    if _public_der(certificate.public_key()) != _public_der(csr.public_key()):
        reasons.append("it does not carry the host's current key")
    have, want = _names_of(certificate.extensions), _names_of(csr.extensions)
    if have != want:
        changes = [f"missing {', '.join(sorted(want - have))}"] if want - have else []
        changes += [f"no longer wanted {', '.join(sorted(have - want))}"] if have - want else []
        reasons.append(f"its names changed ({'; '.join(changes)})")
    if not _issued_by(certificate, ca):
        reasons.append(f"it was not signed by the current CA ({_subject(ca)})")
    left = certificate.not_valid_after_utc - _now(now)
    if left < dt.timedelta(days=int(renew_before_days)):
        reasons.append(f"it ends on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, "
                       f"within the renewal margin of {int(renew_before_days)} days")
    return reasons


def certificates_pair_problems(chain_pem: str, key_pem: str, ca_pem: str = "") -> list[str]:
    """What is wrong with a certificate chain and key given as content (vault); empty when nothing.

    The chain must start with the certificate of this key, each further certificate
    must have issued the one before it (the order nginx sends them in), and the CA
    certificate, when one is given, must have issued the last one (or be it). Messages
    name certificates by subject and never quote the key.
    """
    try:
        chain = _certificates(chain_pem)
    except ValueError as error:
        return [f"the certificate chain cannot be read: {error}"]
    problems: list[str] = [] if chain else ["the certificate chain holds no PEM certificate"]
    try:
        key = serialization.load_pem_private_key((key_pem or "").encode(), password=None)
    except TypeError:
        problems.append("the key is encrypted; give it unencrypted (vault protects it at rest)")
        key = None
    except ValueError:
        problems.append("the key is no readable PEM private key")
        key = None
    if chain and key is not None and _public_der(key.public_key()) != _public_der(chain[0].public_key()):
        problems.append(f"the key does not belong to the first certificate ({_subject(chain[0])}): "
                        "key and certificate do not match")
    for position, (certificate, issuer) in enumerate(zip(chain, chain[1:]), start=1):
        if not _issued_by(certificate, issuer):
            problems.append(f"certificate {position + 1} ({_subject(issuer)}) did not issue certificate "
                            f"{position} ({_subject(certificate)}): the chain must be the server "
                            "certificate first, then each issuer in turn")
    if chain and (ca_pem or "").strip():
        try:
            ca = _certificates(ca_pem)[0]
        except (IndexError, ValueError):
            problems.append("the CA certificate cannot be read")
        else:
            if ca != chain[-1] and not _issued_by(chain[-1], ca):
                problems.append(f"the CA certificate ({_subject(ca)}) did not issue the last certificate "
                                f"of the chain ({_subject(chain[-1])})")
    return problems


def certificates_expiry(chain_pem: str, renew_before_days: int, now: dt.datetime | None = None) -> dict[str, Any]:
    """When the first certificate of a chain ends, and whether that is past or within the margin."""
    certificate = _certificates(chain_pem)[0]
    left = certificate.not_valid_after_utc - _now(now)
    if left <= dt.timedelta(0):
        state = "expired"
    elif left < dt.timedelta(days=int(renew_before_days)):
        state = "expiring"
    else:
        state = "valid"
    return {
        "state": state,
        "subject": _subject(certificate),
        "not_after": certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "days_left": left.days,
    }


def certificates_certbot_args(settings: Mapping[str, Any]) -> list[str]:
    """The argv of `certbot certonly` for the role's certificates_acme_* settings, validated.

    `--cert-name` pins the lineage, so a changed domain list replaces that lineage's
    names instead of creating a second one; the deploy hook is saved in the renewal
    configuration, so certbot's own timer installs each renewal the same way.
    """
    errors: list[str] = []
    domains = [str(d).strip().lower() for d in _as_list(settings.get("domains"))]
    if not domains:
        errors.append("certificates_acme_domains is empty")
    for domain in domains:
        if (problem := _dns_problem(domain)) is not None:
            errors.append(f"certificates_acme_domains: {domain!r} is no DNS name ({problem})")
    email = str(settings.get("email") or "").strip()
    if email and not re.match(r"^[^@\s]+@[^@\s]+\.[^@\s]+$", email):
        errors.append(f"certificates_acme_email {email!r} is no e-mail address")
    server = str(settings.get("server") or "")
    if not server.startswith("https://"):
        errors.append(f"certificates_acme_server {server!r} must be an https:// URL")
    challenge = settings.get("challenge")
    if challenge not in CHALLENGES:
        errors.append(f"certificates_acme_challenge {challenge!r} must be one of {', '.join(CHALLENGES)}")
    webroot = str(settings.get("webroot") or "")
    if challenge == "webroot" and not webroot.startswith("/"):
        errors.append(f"certificates_acme_webroot {webroot!r} must be an absolute path")
    key_type = settings.get("key_type")
    if key_type not in KEY_TYPES:
        errors.append(f"certificates_key_type {key_type!r} must be one of {', '.join(KEY_TYPES)}")
    if errors:
        raise AnsibleFilterError("ACME: " + "; ".join(errors))

    argv = ["certbot", "certonly", "--non-interactive", "--agree-tos", "--keep-until-expiring",
            "--cert-name", str(settings["cert_name"]), "--server", server]
    argv += ["--email", email] if email else ["--register-unsafely-without-email"]
    if key_type == "rsa":
        argv += ["--key-type", "rsa", "--rsa-key-size", str(int(settings["rsa_key_size"]))]
    else:
        argv += ["--key-type", "ecdsa", "--elliptic-curve", "secp256r1" if key_type == "ecdsa_p256" else "secp384r1"]
    argv += ["--webroot", "--webroot-path", webroot] if challenge == "webroot" else ["--standalone"]
    argv += ["--deploy-hook", str(settings["deploy_hook"])]
    for domain in domains:
        argv += ["--domain", domain]
    return argv


class FilterModule:
    """Ansible entry point."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        """Map filter names to functions."""
        return {
            "certificates_subject_alt_names": certificates_subject_alt_names,
            "certificates_reissue_reasons": certificates_reissue_reasons,
            "certificates_pair_problems": certificates_pair_problems,
            "certificates_expiry": certificates_expiry,
            "certificates_certbot_args": certificates_certbot_args,
        }

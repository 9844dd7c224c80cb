"""The gateway's TLS files from the certificates role (internal CA): paths, modes, names and chain.

The play runs the role with its defaults plus certificates_key_group www-data and
certificates_reload_services [nginx]. nginx's TLS listener is the gateway's to
test; here: the files it reads, and that the key never left the host.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

testinfra_hosts = ["llm_gateways"]

DIR = "/etc/ssl/llm"
CERT, KEY, CA = f"{DIR}/server.crt", f"{DIR}/server.key", f"{DIR}/ca.crt"
KEY_GROUP = "www-data"
RENEW_BEFORE_DAYS, SERVER_DAYS = 30, 397


@pytest.fixture(scope="module")
def ca_dir(host, inventory) -> Path:
    """The CA directory on the controller: the inventory's certificates_ca_dir, else the role's default."""
    hostvars = inventory["_meta"]["hostvars"][host.backend.get_hostname()]
    if "certificates_ca_dir" in hostvars:
        return Path(hostvars["certificates_ca_dir"])
    return Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent / "credentials" / "ca"


@pytest.fixture(scope="module")
def server_certificate(host) -> x509.Certificate:
    return x509.load_pem_x509_certificate(host.file(CERT).content)


def _spki(public_key) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_the_three_files_have_their_modes_and_owners(host):
    directory = host.file(DIR)
    assert directory.is_directory and (directory.user, directory.group, directory.mode) == ("root", "root", 0o755)
    for path, group, mode in ((CERT, "root", 0o644), (CA, "root", 0o644), (KEY, KEY_GROUP, 0o640)):
        info = host.file(path)
        assert info.is_file, path
        assert (info.user, info.group, info.mode) == ("root", group, mode), path


def test_the_chain_verifies_against_the_ca(host):
    result = host.run(f"openssl verify -CAfile {CA} -purpose sslserver {CERT}")
    assert result.rc == 0 and result.stdout.strip() == f"{CERT}: OK", result.stdout + result.stderr


def test_the_host_has_the_controllers_ca_certificate(host, ca_dir):
    assert host.file(CA).content == (ca_dir / "ca.crt").read_bytes()


def test_the_ca_certificate_is_a_ca(host):
    ca = x509.load_pem_x509_certificate(host.file(CA).content)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.subject == ca.issuer


def test_the_names_are_the_hosts_name_and_address(host, server_certificate, address_of):
    name = host.backend.get_hostname()
    san = server_certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert name in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address(address_of(name)) in san.get_values_for_type(x509.IPAddress)


def test_the_certificate_is_for_servers_and_not_a_ca(server_certificate):
    assert not server_certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usages = server_certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usages


def test_the_lifetime_is_the_default_and_beyond_the_margin(server_certificate):
    now = dt.datetime.now(dt.timezone.utc)
    left = server_certificate.not_valid_after_utc - now
    assert dt.timedelta(days=RENEW_BEFORE_DAYS) < left <= dt.timedelta(days=SERVER_DAYS, hours=1)
    assert server_certificate.not_valid_before_utc <= now


def test_the_key_is_ecdsa_p256_and_belongs_to_the_certificate(host, server_certificate):
    certificate_public = server_certificate.public_key()
    assert isinstance(certificate_public, ec.EllipticCurvePublicKey)
    assert certificate_public.curve.name == "secp256r1"
    assert host.check_output(f"openssl pkey -in {KEY} -pubout").strip() == _spki(certificate_public).strip()


def test_the_key_never_left_the_host(host, ca_dir, server_certificate):
    """The CA directory holds the CA's two files only, none of them the host's key, and the CA has its own key."""
    assert sorted(p.name for p in ca_dir.rglob("*")) == ["ca.crt", "ca.key"]
    key_body = "".join(host.file(KEY).content_string.strip().splitlines()[1:-1])
    assert len(key_body) > 100
    for path in ca_dir.rglob("*"):
        assert key_body[:64] not in path.read_text().replace("\n", ""), path
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    assert _spki(ca.public_key()) != _spki(server_certificate.public_key())

"""broker.tls: what a CA bundle may hold (certificates, nothing else), a bundle file re-read
when it changes, and the serving certificate's start-up errors naming what is wrong."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from broker.errors import ConfigError
from broker.tls import MAX_CA_BYTES, CaBundle, CertificateReloader, parse_ca_pem

CA = trustme.CA()
OTHER = trustme.CA()
CA_PEM = CA.cert_pem.bytes().decode()
LEAF = CA.issue_cert("broker.test")
KEY_PEM = LEAF.private_key_pem.bytes().decode()


def test_a_bundle_of_certificates_is_kept_and_re_encoded() -> None:
    bundle = f"# our CAs\n\n{CA_PEM}\n{OTHER.cert_pem.bytes().decode()}"
    assert parse_ca_pem(bundle) == CA_PEM + OTHER.cert_pem.bytes().decode()
    assert parse_ca_pem(CA_PEM) == CA_PEM


@pytest.mark.parametrize(("text", "says"), [
    ("", "expected one or more PEM certificates (-----BEGIN CERTIFICATE-----), found none"),
    ("hello", "expected one or more PEM certificates (-----BEGIN CERTIFICATE-----), found none"),
    (CA_PEM + KEY_PEM, "holds a private key; give the CA certificate(s) only"),
    (KEY_PEM, "holds a private key; give the CA certificate(s) only"),
    (CA_PEM + "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n",
     "expected PEM certificates only, found PUBLIC KEY"),
    ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
     "a PEM certificate in it does not parse"),
    (CA_PEM + "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
     "a PEM certificate in it does not parse"),
    (CA_PEM.replace("-----END CERTIFICATE-----", ""), "a PEM certificate in it does not parse"),
    (CA_PEM * (MAX_CA_BYTES // len(CA_PEM) + 1), "larger than 64 KiB"),
], ids=["empty", "text", "cert-and-key", "key", "public-key", "bad-base64", "one-bad-of-two",
        "unterminated", "too-large"])
def test_anything_but_certificates_is_refused_saying_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_ca_pem(text)
    assert str(err.value).startswith(says)
    assert "PRIVATE" not in str(err.value).replace("private key", "")


def test_a_bundle_file_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "ca.crt"
    path.write_text(CA_PEM)
    bundle = CaBundle(path, where="agent.ca_file")
    assert bundle.current() == CA_PEM and bundle.reloads == 0
    # Replaced the way the kubelet swaps a volume's files: a new inode.
    tmp = tmp_path / "ca.new"
    tmp.write_text(OTHER.cert_pem.bytes().decode())
    os.replace(tmp, path)
    assert bundle.current() == OTHER.cert_pem.bytes().decode()
    assert bundle.current() == OTHER.cert_pem.bytes().decode() and bundle.reloads == 1
    # What is not a bundle keeps the last good one; the next good one is taken.
    tmp.write_text("not a certificate")
    os.replace(tmp, path)
    assert bundle.current() == OTHER.cert_pem.bytes().decode()
    assert (bundle.reloads, bundle.failures) == (1, 1)
    path.unlink()
    assert bundle.current() == OTHER.cert_pem.bytes().decode()
    tmp.write_text(CA_PEM)
    os.replace(tmp, path)
    assert bundle.current() == CA_PEM and bundle.reloads == 2


@pytest.mark.parametrize(("content", "says"), [
    (None, "agent.ca_file: {path}: No such file or directory: {path}"),
    (b"\xff\xfe", "agent.ca_file: {path}: not PEM text (expected -----BEGIN CERTIFICATE-----)"),
    (KEY_PEM.encode(), "agent.ca_file: {path}: holds a private key; give the CA certificate(s) "
                       "only"),
], ids=["missing", "binary", "key"])
def test_a_bundle_that_cannot_be_used_stops_start_up(tmp_path: Path, content: bytes | None,
                                                      says: str) -> None:
    path = tmp_path / "ca.crt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        CaBundle(path, where="agent.ca_file")
    assert str(err.value) == says.format(path=path)


def _pair(tmp_path: Path, cert: bytes, key: bytes) -> tuple[Path, Path]:
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    return tmp_path / "tls.crt", tmp_path / "tls.key"


def test_the_serving_pair_loads_and_reports_its_expiry(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path, LEAF.cert_chain_pems[0].bytes(), LEAF.private_key_pem.bytes())
    reloader = CertificateReloader(cert, key, where="server.tls")
    assert reloader.not_after > 0 and reloader.check() is False


def _encrypted(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"secret-pass"))


@pytest.mark.parametrize(("cert", "key", "says"), [
    (None, b"", "No such file or directory: {d}/tls.crt"),
    (LEAF.cert_chain_pems[0].bytes(), None, "No such file or directory: {d}/tls.key"),
    (b"garbage", LEAF.private_key_pem.bytes(), "{d}/tls.crt does not start with a PEM certificate"),
    (LEAF.cert_chain_pems[0].bytes(), CA.issue_cert("x").private_key_pem.bytes(),
     "key values mismatch"),
    (LEAF.cert_chain_pems[0].bytes(), _encrypted(LEAF.private_key_pem.bytes()),
     "the key is encrypted; give an unencrypted key file"),
], ids=["no-cert", "no-key", "cert-not-pem", "key-of-another", "encrypted-key"])
def test_a_serving_pair_that_does_not_load_stops_start_up_saying_why(
        tmp_path: Path, cert: bytes | None, key: bytes | None, says: str) -> None:
    if cert is not None:
        (tmp_path / "tls.crt").write_bytes(cert)
    if key is not None:
        (tmp_path / "tls.key").write_bytes(key)
    with pytest.raises(ConfigError) as err:
        CertificateReloader(tmp_path / "tls.crt", tmp_path / "tls.key", where="server.tls")
    head = f"server.tls: cannot load {tmp_path}/tls.crt and {tmp_path}/tls.key: "
    assert str(err.value).startswith(head + says.format(d=tmp_path)), str(err.value)
    assert "BEGIN" not in str(err.value)

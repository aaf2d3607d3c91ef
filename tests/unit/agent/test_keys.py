"""Keys the agent makes: every kind is one the broker's own checks accept (the PKI
engine's CSR reader, the SSH engine's public key reader), the CSR asks for the ``cn``
only, and the private key is written in the form its tools read."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.agent import keys
from broker.agent.spec import KEYGENS
from broker.engines.pki import read_csr
from broker.engines.ssh import read_public_key


@pytest.mark.parametrize("keygen", KEYGENS)
def test_csr_is_accepted_by_the_pki_engine(keygen: str) -> None:
    key = keys.generate(keygen)
    csr = read_csr(keys.request_param(key, "csr", "api.workload.internal"))
    assert csr.names == {("CN", "api.workload.internal"), ("DNS", "api.workload.internal")}
    assert read_csr(keys.csr_pem(key, None)).names == frozenset()
    loaded = x509.load_pem_x509_csr(csr.pem.encode())
    assert loaded.public_key() == key.public_key()


@pytest.mark.parametrize("keygen", KEYGENS)
def test_public_key_is_accepted_by_the_ssh_engine(keygen: str, tmp_path: Path) -> None:
    key = keys.generate(keygen)
    line = keys.request_param(key, "public_key", None)
    assert read_public_key(line) == line
    written = keys.private_file(key, "public_key").private
    assert written.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    path = tmp_path / "id"
    path.write_bytes(written)
    path.chmod(0o400)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    assert derived.split()[:2] == line.split()[:2]


@pytest.mark.parametrize("keygen", KEYGENS)
def test_pem_private_key_for_a_certificate(keygen: str) -> None:
    key = keys.generate(keygen)
    written = keys.private_file(key, "csr")
    assert written.private.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert serialization.load_pem_private_key(written.private, None).public_key() == (
        key.public_key())
    assert "PRIVATE" not in repr(written)


def test_every_key_is_new() -> None:
    assert keys.openssh_public(keys.generate("ed25519")) != keys.openssh_public(
        keys.generate("ed25519"))


def test_unknown_keygen() -> None:
    with pytest.raises(ValueError, match="unknown keygen"):
        keys.generate("dsa")

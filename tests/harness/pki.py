"""PKI and SSH CA mounts of a test's own on the real OpenBao, and the workload's side:
CSRs and key pairs (made with ``openssl``/``ssh-keygen``, as a workload would, or with
``cryptography`` where a test needs a malformed one), certificate and CRL checks.

Each mount has a unique name and an instance policy (``broker-instance-<mount>``) that
grants exactly its issue/sign paths; leaving the context revokes every lease under the
mount, disables it and deletes the policy.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness.vault import VaultProbe

# The names the tests' PKI roles template, and the Vault role that allows them.
PKI_DOMAINS = ("workload.internal", "svc.internal")
TRUST_DOMAIN = "td.test"
PKI_PARAMS = {
    "common_name": "{workload}.workload.internal",
    "alt_names": "{workload}.svc.internal",
    "uri_sans": f"spiffe://{TRUST_DOMAIN}/{{workload}}",
}


def pki_role(**overrides: Any) -> dict[str, Any]:
    """A Vault PKI role as deploy/engines/pki.md recommends it."""
    return {
        "allowed_domains": list(PKI_DOMAINS),
        "allow_subdomains": True,
        "allow_bare_domains": False,
        "allow_ip_sans": False,
        "allow_localhost": False,
        "allow_wildcard_certificates": False,
        "allowed_uri_sans": [f"spiffe://{TRUST_DOMAIN}/*"],
        "enforce_hostnames": True,
        "use_csr_common_name": False,
        "use_csr_sans": False,
        "key_type": "ec",
        "key_bits": 256,
        "ttl": "10m",
        "max_ttl": "1h",
        "generate_lease": True,
        "no_store": False,
        "server_flag": True,
        "client_flag": True,
        **overrides,
    }


@dataclass(frozen=True)
class Mount:
    addr: str
    path: str
    policy: str  # the instance policy granting this mount's paths
    ca_pem: str  # the PKI root certificate, or the SSH CA's public key line


def _ok(result: tuple[int, Any]) -> Any:
    status, body = result
    assert status in (200, 204), body
    return body


def _unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _teardown(vault: VaultProbe, mount: str, policy: str) -> None:
    _ok(vault.call("PUT", f"sys/leases/revoke-prefix/{mount}", {"sync": True}))
    _ok(vault.call("DELETE", f"sys/mounts/{mount}"))
    _ok(vault.call("DELETE", f"sys/policies/acl/{policy}"))


@contextmanager
def mounted_pki(vault: VaultProbe, roles: Mapping[str, Mapping[str, Any]]) -> Iterator[Mount]:
    """A PKI mount with its own EC root CA and ``roles`` (name → Vault role fields)."""
    mount = _unique("pki-t")
    policy = f"broker-instance-{mount}"
    _ok(vault.call("POST", f"sys/mounts/{mount}",
                   {"type": "pki", "config": {"max_lease_ttl": "87600h"}}))
    try:
        root = _ok(vault.call("POST", f"{mount}/root/generate/internal",
                              {"common_name": f"{mount} root", "key_type": "ec",
                               "key_bits": 256, "ttl": "87600h"}))
        for name, fields in roles.items():
            _ok(vault.call("POST", f"{mount}/roles/{name}", dict(fields)))
        rules = "".join(
            f'path "{mount}/{op}/{name}" {{ capabilities = ["update"] }}\n'
            for name in roles for op in ("issue", "sign"))
        _ok(vault.call("PUT", f"sys/policies/acl/{policy}", {"policy": rules}))
        yield Mount(vault.addr, mount, policy, root["data"]["certificate"])
    finally:
        _teardown(vault, mount, policy)


@contextmanager
def mounted_ssh_ca(vault: VaultProbe, roles: Mapping[str, Mapping[str, Any]]) -> Iterator[Mount]:
    """An SSH mount with a generated Ed25519 CA key and ``roles``."""
    mount = _unique("ssh-t")
    policy = f"broker-instance-{mount}"
    _ok(vault.call("POST", f"sys/mounts/{mount}", {"type": "ssh"}))
    try:
        ca = _ok(vault.call("POST", f"{mount}/config/ca",
                            {"generate_signing_key": True, "key_type": "ed25519"}))
        for name, fields in roles.items():
            _ok(vault.call("POST", f"{mount}/roles/{name}", dict(fields)))
        rules = "".join(f'path "{mount}/sign/{name}" {{ capabilities = ["update"] }}\n'
                        for name in roles)
        _ok(vault.call("PUT", f"sys/policies/acl/{policy}", {"policy": rules}))
        yield Mount(vault.addr, mount, policy, ca["data"]["public_key"].strip())
    finally:
        _teardown(vault, mount, policy)


def fetch_crl(vault: VaultProbe, mount: str) -> str:
    """The mount's CRL in PEM, rebuilt first so that it lists every revocation so far."""
    body = _ok(vault.call("GET", f"{mount}/crl/rotate"))
    assert body["data"]["success"] is True, body
    with urllib.request.urlopen(f"{vault.addr}/v1/{mount}/crl/pem", timeout=10) as resp:
        return resp.read().decode()


def serial_of(vault_serial: str) -> int:
    """Vault writes serials as colon-separated hex."""
    return int(vault_serial.replace(":", ""), 16)


# -- the workload's side: keys and CSRs ---------------------------------------------------

_OPENSSL_KEYS = {
    "ec-p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
    "rsa-2048": ["-newkey", "rsa:2048"],
    "ed25519": ["-newkey", "ed25519"],
}


def openssl_csr(directory: Path, key: str = "ec-p256", *, cn: str | None = None,
                sans: Iterable[str] = ()) -> tuple[str, Path]:
    """A CSR made by ``openssl req`` with a fresh key; returns (CSR PEM, key file). ``sans``
    in openssl's syntax: ``DNS:x``, ``IP:1.2.3.4``, ``URI:spiffe://…``, ``email:a@b``."""
    name = secrets.token_hex(4)
    key_file, csr_file = directory / f"{name}.key", directory / f"{name}.csr"
    cmd = ["openssl", "req", "-new", *_OPENSSL_KEYS[key], "-nodes", "-keyout", str(key_file),
           "-out", str(csr_file), "-subj", f"/CN={cn}" if cn else "/"]
    sans = list(sans)
    if sans:
        cmd += ["-addext", "subjectAltName=" + ",".join(sans)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return csr_file.read_text(), key_file


def build_csr(*, cn: str | None = None, dns: Iterable[str] = (), ips: Iterable[str] = (),
              uris: Iterable[str] = (), emails: Iterable[str] = (),
              key: Any = None) -> str:
    """A CSR built with ``cryptography`` (for unit tests and malformed variants)."""
    import ipaddress

    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    general: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    general += [x509.IPAddress(ipaddress.ip_address(n)) for n in ips]
    general += [x509.UniformResourceIdentifier(n) for n in uris]
    general += [x509.RFC822Name(n) for n in emails]
    if general:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    algorithm = None if _is_edwards(key) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def _is_edwards(key: Any) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

    return isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)


def self_signed_certificate(key: Any) -> str:
    """A certificate PEM, for a test that sends one where a CSR belongs."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a csr")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + timedelta(hours=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def tampered(csr_pem: str, old: bytes, new: bytes) -> str:
    """The CSR with bytes of its signed content replaced: it still parses, but its
    signature no longer verifies."""
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    assert der.count(old) == 1 and len(old) == len(new)
    bad = x509.load_der_x509_csr(der.replace(old, new))
    return bad.public_bytes(serialization.Encoding.PEM).decode()


def duplicate_san_csr() -> str:
    """A CSR with two subjectAltName extensions (the second was a subjectKeyIdentifier
    whose OID is rewritten): ``cryptography`` refuses it with a non-ValueError."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("a.test")]), critical=False)
           .add_extension(x509.SubjectKeyIdentifier(b"\x01\x02\x03"), critical=False)
           .sign(key, hashes.SHA256()))
    der = csr.public_bytes(serialization.Encoding.DER)
    ski, san = bytes.fromhex("0603551d0e"), bytes.fromhex("0603551d11")
    assert der.count(ski) == 1
    bad = x509.load_der_x509_csr(der.replace(ski, san))
    return bad.public_bytes(serialization.Encoding.PEM).decode()


def openssl_verify(ca_pem: str, cert_pem: str, directory: Path,
                   crl_pem: str | None = None) -> tuple[int, str]:
    """``openssl verify -CAfile`` (with ``-crl_check`` when a CRL is given)."""
    name = secrets.token_hex(4)
    ca, cert = directory / f"{name}-ca.pem", directory / f"{name}-cert.pem"
    ca.write_text(ca_pem)
    cert.write_text(cert_pem)
    cmd = ["openssl", "verify", "-CAfile", str(ca)]
    if crl_pem is not None:
        crl = directory / f"{name}-crl.pem"
        crl.write_text(crl_pem)
        cmd += ["-crl_check", "-CRLfile", str(crl)]
    done = subprocess.run([*cmd, str(cert)], capture_output=True, text=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).replace(str(cert), "CERT")


# -- SSH -----------------------------------------------------------------------------------

_SSH_KEYS = {"ed25519": ["-t", "ed25519"], "ecdsa-p256": ["-t", "ecdsa", "-b", "256"],
             "rsa-2048": ["-t", "rsa", "-b", "2048"], "rsa-3072": ["-t", "rsa", "-b", "3072"]}


def ssh_keypair(directory: Path, key: str = "ed25519") -> Path:
    """A key pair made by ``ssh-keygen``; returns the private key's path (``.pub`` next)."""
    path = directory / f"id-{secrets.token_hex(4)}"
    subprocess.run(["ssh-keygen", "-q", *_SSH_KEYS[key], "-N", "", "-C", "workload@test",
                    "-f", str(path)], check=True, capture_output=True, timeout=60)
    return path


def ssh_fingerprint(public_key_line: str, directory: Path) -> str:
    path = directory / f"fp-{secrets.token_hex(4)}.pub"
    path.write_text(public_key_line.strip() + "\n")
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(path)],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return out.split()[1]


@dataclass(frozen=True)
class SshCertInfo:
    type: str
    public_key: str  # fingerprint of the certified key
    signing_ca: str  # fingerprint of the CA key
    key_id: str
    serial: int
    valid_from: datetime
    valid_to: datetime
    principals: tuple[str, ...]
    critical_options: tuple[str, ...]
    extensions: tuple[str, ...]


def ssh_cert_info(cert_file: Path) -> SshCertInfo:
    """What ``ssh-keygen -L`` says about a certificate (times read in UTC)."""
    out = subprocess.run(["ssh-keygen", "-L", "-f", str(cert_file)], check=True,
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TZ": "UTC"}).stdout
    fields: dict[str, str] = {}  # "Key: value" lines
    lists: dict[str, list[str]] = {}  # the more deeply indented lines under a key
    current = None
    for raw in out.splitlines()[1:]:
        line = raw.strip()
        if raw.startswith(" " * 16) and current is not None:
            lists[current].append(line)
            continue
        key, _, value = line.partition(":")
        fields[key] = value.strip()
        current = key
        lists[key] = []
    valid = fields["Valid"].split()  # "from <t> to <t>"
    assert valid[0] == "from" and valid[2] == "to", fields["Valid"]

    def when(text: str) -> datetime:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)

    return SshCertInfo(
        type=fields["Type"],
        public_key=fields["Public key"].split()[1],
        signing_ca=fields["Signing CA"].split()[1],
        key_id=fields["Key ID"].strip('"'),
        serial=int(fields["Serial"]),
        valid_from=when(valid[1]),
        valid_to=when(valid[3]),
        principals=tuple(lists["Principals"]),  # "(none)" stays on the field's own line
        critical_options=tuple(lists["Critical Options"]),
        extensions=tuple(lists["Extensions"]),
    )

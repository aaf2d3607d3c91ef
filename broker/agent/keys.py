"""Keys the agent makes itself (``keygen``), so that a private key never leaves the pod:
the broker is sent a CSR (a PKI ``sign``-mode role, parameter ``csr``) or an OpenSSH
public key (an SSH ``sign``-mode role, parameter ``public_key``), and the key is written
next to the certificate with the credential's permissions.

A fresh key is made for every issue, so that a rotation rotates the key too. The CSR
asks for ``cn`` as its subject and as a DNS name, or for no name at all (the broker
checks that every name a CSR asks for is one the role templates, and the certificate
gets the role's names either way).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from broker.agent.render import GeneratedKey

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# The request parameter each kind of signing role takes, in the order they are tried.
KEY_PARAMS = ("csr", "public_key")


def generate(keygen: str) -> PrivateKey:
    if keygen == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if keygen == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if keygen == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown keygen {keygen!r}")


def csr_pem(key: PrivateKey, cn: str | None) -> str:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if cn:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def openssh_public(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def request_param(key: PrivateKey, param: str, cn: str | None) -> str:
    """The value of the request parameter ``param`` (one of ``KEY_PARAMS``) for ``key``."""
    return csr_pem(key, cn) if param == "csr" else openssh_public(key)


def private_file(key: PrivateKey, param: str) -> GeneratedKey:
    """The key as written: PEM (PKCS#8) beside an X.509 certificate, OpenSSH's own format
    beside an SSH certificate (what ``ssh -i`` reads)."""
    fmt = (
        serialization.PrivateFormat.PKCS8 if param == "csr" else serialization.PrivateFormat.OpenSSH
    )
    return GeneratedKey(
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    )

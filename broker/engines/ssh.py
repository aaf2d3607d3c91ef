"""SSH: a user certificate signed by Vault's SSH CA (``<mount>/sign/<role>``).

The workload sends its OpenSSH public key; the private key never leaves it. The
certificate's principals (``valid_principals``) and key id (``key_id``, e.g.
``{issuer_name}:{instance_id}``, so that sshd's log names the instance) come from the
role's templates, never from the request; Vault's role constrains the principals
(``allowed_users``) and must set ``allow_user_key_ids=true`` for the key id to be taken.

Vault answers a signing request without a lease: a signed certificate cannot be revoked
(sshd checks no revocation list Vault keeps), so the credential is recorded as
``delivered`` and its TTL is the only bound on it. Keep that TTL short.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    SSHCertificate,
    load_ssh_public_identity,
    load_ssh_public_key,
)

from broker.engines.base import Engine, Mode, VaultRequest, text_ref
from broker.vault.paths import vault_path

if TYPE_CHECKING:
    from broker.engines.role import RoleSettings

# An RSA 8192 public key line is ~1.4 KiB; the bound leaves room for a comment.
MAX_PUBLIC_KEY_BYTES = 4096
KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
_RSA_BITS = (2048, 8192)
_LAST_SECOND = 253402300799  # 9999-12-31T23:59:59Z, the last a datetime holds
_TEMPLATES = frozenset({"valid_principals", "key_id"})


def read_public_key(value: Any) -> str:
    """The ``public_key`` caller parameter: one OpenSSH public key line
    (``<type> <base64> [comment]``) of an accepted type. Returns ``<type> <base64>``: the
    comment is the caller's free text and is not passed on. Messages never repeat what
    was sent."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected an OpenSSH public key line as a non-empty string")
    if len(value.encode()) > MAX_PUBLIC_KEY_BYTES:
        raise ValueError(f"too long (at most {MAX_PUBLIC_KEY_BYTES} bytes)")
    if "PRIVATE KEY" in value:
        raise ValueError("this is a private key: send the public key (the .pub file), keep the key")
    line = value.removesuffix("\n").removesuffix("\r")
    if not line.isprintable():
        raise ValueError("expected a single line with no control characters")
    parts = line.split()
    key_type = parts[0]
    if key_type not in KEY_TYPES:
        raise ValueError(
            "expected '<type> <base64> [comment]' with type one of "
            f"{', '.join(KEY_TYPES)} (no authorized_keys options, no certificates)"
        )
    if len(parts) < 2:
        raise ValueError("expected '<type> <base64> [comment]'")
    try:
        base64.b64decode(parts[1], validate=True)
        key = load_ssh_public_key(f"{key_type} {parts[1]}".encode())
    except (ValueError, binascii.Error, UnsupportedAlgorithm, NotImplementedError):
        # NotImplementedError: a compressed EC point, which cryptography does not load
        raise ValueError(f"not a valid {key_type} public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        if not _RSA_BITS[0] <= key.key_size <= _RSA_BITS[1]:
            raise ValueError(f"RSA keys must have {_RSA_BITS[0]}-{_RSA_BITS[1]} bits")
    elif not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ValueError(f"not a valid {key_type} public key")
    return f"{key_type} {parts[1]}"


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


class SshEngine(Engine):
    name = "ssh"
    kind = "ssh_certificate"
    modes = {
        "sign": Mode(
            templates=_TEMPLATES,
            required_templates=_TEMPLATES,
            caller={"public_key": read_public_key},
            required_caller=frozenset({"public_key"}),
            leased=False,
        )
    }

    def check_role(self, role: RoleSettings) -> None:
        template = role.params.get("valid_principals", "")
        if len(_split(template)) != len(template.split(",")):
            raise ValueError(
                "params.valid_principals: a comma-separated list without empty entries"
            )
        if "," in role.params.get("key_id", ""):
            raise ValueError("params.key_id: one key id, no commas")

    def request(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any], ttl: int
    ) -> VaultRequest:
        body = {
            "public_key": caller["public_key"],
            "cert_type": "user",
            "valid_principals": ",".join(_split(params["valid_principals"])),
            "key_id": params["key_id"],
            "ttl": f"{ttl}s",
        }
        return VaultRequest("POST", vault_path(role.mount, "sign", role.vault_role), body, True)

    def identifier(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, str] | None:
        return text_ref(data, serial_number="serial_number")

    def shape(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: data[k] for k in ("signed_key", "serial_number") if k in data}
        cert = _certificate(data.get("signed_key"))
        if cert is not None:
            out["expiration"] = cert.valid_before  # unix seconds, as a PKI certificate's
        return out

    def expires_at(self, role: RoleSettings, data: Mapping[str, Any]) -> datetime | None:
        """When the certificate stops being valid. Vault's answer has no lease (its
        ``lease_duration`` is 0), so the issuance service records this as the expiry."""
        cert = _certificate(data.get("signed_key"))
        if cert is None or cert.valid_before > _LAST_SECOND:  # "forever" is 2**64-1
            return None
        return datetime.fromtimestamp(cert.valid_before, UTC)


def _certificate(signed_key: Any) -> SSHCertificate | None:
    if not isinstance(signed_key, str):
        return None
    try:
        cert = load_ssh_public_identity(signed_key.strip().encode())
    except (ValueError, UnsupportedAlgorithm):
        return None
    return cert if isinstance(cert, SSHCertificate) else None

"""Who signs a checkpoint, and how a signature is checked.

A ``CheckpointSigner`` signs the checkpoint message with a key the database does not
hold: an Ed25519 key in OpenBao's transit engine (``transit``, the default; the key never
leaves Vault), or an Ed25519 private key file (``file``, for development). Both give a
raw Ed25519 signature, so ``Signatures`` checks either locally against public keys: the
configured file key's, and the transit key's versions, fetched from Vault and cached
(fetched again, at most once per ``REFRESH_S``, when a checkpoint names a version not
seen yet: the key was rotated).

A checkpoint's ``key_id`` says which key: ``transit:<key>:v<N>`` or
``file:<first 16 hex of SHA-256 of the raw public key>``. Only the configured keys are
trusted: a checkpoint re-signed by any other key does not verify.

A check answers ``True`` (verifies), ``False`` (does not: a forged or re-signed
checkpoint) or ``None``: it cannot be told now, because the transit key's versions could
not be read (Vault down or sealed) or the version named is newer than the ones read less
than ``REFRESH_S`` ago (the key was just rotated). ``None`` is not evidence of tampering.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.audit.checkpoint import Checkpoint, signed_message
from broker.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)
REFRESH_S = 10.0


# True: verifies; False: does not; None: cannot be checked now (see the module's doc).
Verdict = bool | None


class CheckpointSigner(Protocol):
    async def sign(self, message: bytes) -> tuple[str, str, str]:
        """(signer, key_id, base64 signature) of ``message``."""


class TransitKeys(Protocol):
    """What a transit signer needs of Vault (``broker.vault.transit.Transit``)."""

    async def sign(self, key: str, data: bytes) -> tuple[bytes, int]: ...

    async def public_keys(self, key: str) -> dict[int, bytes]: ...


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def file_key_id(public: bytes) -> str:
    return "file:" + hashlib.sha256(public).hexdigest()[:16]


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The file signer's key. ``ConfigError`` naming the file when it is not one."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"audit.file.private_key: cannot read {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise ConfigError(
            f"audit.file.private_key: {path} is not an unencrypted PEM private key"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"audit.file.private_key: {path} is not an Ed25519 key")
    return key


class FileSigner:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = _raw_public(key.public_key())
        self.key_id = file_key_id(self.public)

    def __repr__(self) -> str:  # the private key is never printed
        return f"FileSigner({self.key_id})"

    async def sign(self, message: bytes) -> tuple[str, str, str]:
        return "file", self.key_id, base64.b64encode(self._key.sign(message)).decode("ascii")

    async def check(self, checkpoint: Checkpoint) -> Verdict:
        """Whether this key signed ``checkpoint`` (the writer trusts no other)."""
        if checkpoint.signer != "file" or checkpoint.key_id != self.key_id:
            return False
        return _valid(self.public, signed_message(checkpoint), checkpoint.signature)


class TransitSigner:
    def __init__(self, transit: TransitKeys, key: str) -> None:
        self._transit = transit
        self._key = key
        self._signatures = Signatures(transit=transit, transit_key=key)

    async def check(self, checkpoint: Checkpoint) -> Verdict:
        """Whether this transit key (any of its versions) signed ``checkpoint``."""
        if checkpoint.signer != "transit":
            return False
        return await self._signatures.check_async(checkpoint)

    async def sign(self, message: bytes) -> tuple[str, str, str]:
        signature, version = await self._transit.sign(self._key, message)
        key_id = f"transit:{self._key}:v{version}"
        return "transit", key_id, base64.b64encode(signature).decode("ascii")


def _valid(public: bytes, message: bytes, signature: str) -> bool:
    try:
        raw = base64.b64decode(signature, validate=True)
        Ed25519PublicKey.from_public_bytes(public).verify(raw, message)
    except (ValueError, binascii.Error, InvalidSignature):
        return False
    return True


class Signatures:
    """Checks checkpoint signatures against the trusted public keys.

    ``verify`` is async (it may fetch the transit key's versions); ``check`` is the plain
    ``check_signature(checkpoint) -> bool`` a pure verification takes, over the keys
    known once ``prefetch`` ran for the checkpoints it will see."""

    def __init__(
        self,
        *,
        file_public: bytes | None = None,
        transit: TransitKeys | None = None,
        transit_key: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._file_public = file_public
        self._transit = transit
        self._transit_key = transit_key
        self._monotonic = monotonic
        self._transit_public: dict[int, bytes] = {}
        self._fetched_at = -float("inf")

    def _transit_version(self, signer: str, key_id: str) -> int | None:
        if signer != "transit" or self._transit is None:
            return None
        name, _, version = key_id.removeprefix("transit:").rpartition(":v")
        if not key_id.startswith("transit:") or name != self._transit_key:
            return None
        return int(version) if version.isdigit() else None

    def trust_file_key(self, public: bytes) -> None:
        """Check ``file`` checkpoints against this Ed25519 public key (raw, 32 bytes)."""
        self._file_public = public

    async def _refresh(self) -> bool:
        """Read the transit key's versions; True when they were read just now."""
        if self._transit is None or self._transit_key is None:
            return False
        if self._monotonic() - self._fetched_at < REFRESH_S:
            return False
        self._fetched_at = self._monotonic()
        try:
            self._transit_public = await self._transit.public_keys(self._transit_key)
        except BrokerError as exc:
            log.warning("could not read the transit key's public keys", extra={"code": exc.code})
            return False
        return True

    async def prefetch(self, checkpoints: Iterable[Checkpoint]) -> None:
        """Fetch the transit public keys if any checkpoint names a version not cached."""
        for cp in checkpoints:
            version = self._transit_version(cp.signer, cp.key_id)
            if version is not None and version not in self._transit_public:
                await self._refresh()
                return

    async def verify(self, signer: str, key_id: str, message: bytes, signature: str) -> Verdict:
        version = self._transit_version(signer, key_id)
        if version is not None and version not in self._transit_public:
            if await self._refresh() and version not in self._transit_public:
                return False  # read just now, and the key has no such version
        return self._verify_known(signer, key_id, message, signature)

    def _verify_known(self, signer: str, key_id: str, message: bytes, signature: str) -> Verdict:
        if signer == "file":
            public = self._file_public
            if public is None or key_id != file_key_id(public):
                return False
            return _valid(public, message, signature)
        version = self._transit_version(signer, key_id)
        if version is None:
            return False  # not the configured transit key
        if version not in self._transit_public:
            # Versions only grow: one below the newest read is not the key's (False); one
            # above it, or none read (Vault down), may be a rotation not seen yet (None).
            newest = max(self._transit_public, default=None)
            return False if newest is not None and version < newest else None
        return _valid(self._transit_public[version], message, signature)

    def check(self, checkpoint: Checkpoint) -> Verdict:
        """``check_signature`` for the chain's verification (keys prefetched)."""
        return self._verify_known(
            checkpoint.signer, checkpoint.key_id, signed_message(checkpoint), checkpoint.signature
        )

    async def check_async(self, checkpoint: Checkpoint) -> Verdict:
        return await self.verify(
            checkpoint.signer, checkpoint.key_id, signed_message(checkpoint), checkpoint.signature
        )

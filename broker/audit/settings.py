"""The ``audit`` section: the key that names token ids in events, when the chain head is
checkpointed, who signs it, and the append-only file the checkpoints are also written
to."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from broker.settings import Duration, Frozen, seconds
from broker.vault.paths import NAME_SEGMENT


class CheckpointSettings(Frozen):
    # A checkpoint once this many events were appended since the last one...
    every_events: int = Field(1000, ge=1, le=1_000_000)
    # ...or this long after the last one, when any event came since.
    every: Duration = 60
    signer: Literal["transit", "file"] = "transit"
    # Append-only JSON lines of every checkpoint, outside the database (optional): the
    # newest one past the table's end proves the table's tail was cut.
    file: Path | None = None

    _every = field_validator("every", mode="before")(seconds)

    @field_validator("every")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("expected a duration of at least 1s")
        return v


class TransitSignerSettings(Frozen):
    mount: str = "transit"
    key: str = "broker-audit"

    @field_validator("mount", "key")
    @classmethod
    def _segment(cls, v: str) -> str:
        if not NAME_SEGMENT.match(v):
            raise ValueError("expected a Vault path segment (letters, digits, _ . -)")
        return v


class FileSignerSettings(Frozen):
    # An Ed25519 private key (PKCS#8 PEM, unencrypted): for development only, the key
    # then lives on the broker's disk.
    private_key: Path


class AuditSettings(Frozen):
    """``hash_key``: the key of the keyed hash (HMAC-SHA256) that names a token id in an
    audit event, so that events of one token can be matched without the event holding the
    id itself. A secret, given as ``${ENV}``; not stored in the database, so someone who
    reads the database cannot test a guessed token id against it. Without it, events name
    no token id at all (nothing is derived from what the database holds)."""

    hash_key: SecretStr | None = None
    checkpoint: CheckpointSettings = CheckpointSettings()
    transit: TransitSignerSettings = TransitSignerSettings()
    file: FileSignerSettings | None = None

    @field_validator("hash_key")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError("expected at least 32 characters (e.g. `openssl rand -hex 32`)")
        return v

    @model_validator(mode="after")
    def _signer_configured(self) -> AuditSettings:
        if self.checkpoint.signer == "file" and self.file is None:
            raise ValueError(
                "file.private_key is required with checkpoint.signer: file "
                "(the path of an Ed25519 private key PEM)"
            )
        return self

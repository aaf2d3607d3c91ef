"""The ``audit`` section of the configuration."""

from __future__ import annotations

from pydantic import SecretStr, field_validator

from broker.settings import Frozen


class AuditSettings(Frozen):
    """``hash_key``: the key of the keyed hash (HMAC-SHA256) that names a token id in an
    audit event, so that events of one token can be matched without the event holding the
    id itself. A secret, given as ``${ENV}``; not stored in the database, so someone who
    reads the database cannot test a guessed token id against it. Without it, events name
    no token id at all (nothing is derived from what the database holds)."""

    hash_key: SecretStr | None = None

    @field_validator("hash_key")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError("expected at least 32 characters (e.g. `openssl rand -hex 32`)")
        return v

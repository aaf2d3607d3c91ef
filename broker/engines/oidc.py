"""OIDC: an identity token for the instance, signed by OpenBao/Vault's identity engine.

``GET identity/oidc/token/<vault_role>`` with the instance token, which must carry an
identity entity (``vault.entity_alias: workload``): the token's ``sub`` is that entity's
id (one per workload), its ``aud`` the Vault OIDC role's ``client_id``, its ``iss`` the
identity engine's issuer, and its lifetime the Vault OIDC role's ``ttl``. It is what
Google Cloud and Azure workload identity federation and AWS ``AssumeRoleWithWebIdentity``
accept: a workload reaches a cloud with no cloud secret. Relying parties verify it
against ``<vault>/v1/identity/oidc/.well-known/keys``. The aws engine's ``web_identity``
mode reads the very same token (``identity_token_request``, ``identity_token``) and
exchanges it at STS itself; this engine hands the token out.

A JWT cannot be recalled: Vault has no lease for it and the relying party checks only its
signature and expiry. It is recorded as ``delivered``, with the token's own ``exp`` as its
expiry, and termination revokes nothing of it (the instance token's revocation stops
further reads). So a token that would outlive the role's ``max_ttl`` is refused rather
than handed out: keep the Vault OIDC role's ``ttl`` short, and at most ``max_ttl``. Nor is
one handed out that outlives the TTL granted for it (a policy rule's ``max_ttl`` cap, a
ttl the caller asked for): the path takes no TTL, so the grant can only be checked.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from broker.engines.base import Engine, Mode, VaultRequest
from broker.errors import NotPermitted, UpstreamRejected
from broker.secret import Secret
from broker.vault.paths import vault_path

if TYPE_CHECKING:
    from broker.engines.role import RoleSettings

IDENTITY_MOUNT = "identity"
# Epoch seconds an ``exp``/``iat`` may take: 2001 to 2286 (keeps datetime from overflowing).
_EPOCH_RANGE = (1_000_000_000, 10_000_000_000)


def identity_token_request(role: RoleSettings) -> VaultRequest:
    """Vault's identity engine signs a token for the caller's entity; the path takes no
    TTL (the Vault OIDC role's ``ttl`` is the token's lifetime)."""
    path = vault_path(role.mount, "oidc", "token", role.vault_role)
    return VaultRequest("GET", path, None, False)


def _no_token() -> UpstreamRejected:
    return UpstreamRejected(
        "Vault's identity engine returned no OIDC token; check the OIDC role and that "
        "instance tokens carry an entity",
        code="vault_bad_response",
    )


def identity_token(data: Mapping[str, Any]) -> Secret:
    """The JWT in Vault's answer (three dot-separated parts). Raises UpstreamRejected."""
    token = data.get("token")
    if not isinstance(token, str) or token.count(".") != 2:
        raise _no_token()
    return Secret(token)


def _bad(what: str) -> UpstreamRejected:
    return UpstreamRejected(
        f"Vault's OIDC token is not usable: {what}; check the identity engine's OIDC role",
        code="vault_bad_response",
    )


def _epoch(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not _EPOCH_RANGE[0] <= value < _EPOCH_RANGE[1]
    ):
        raise _bad(f"its {name} is missing or not a time in epoch seconds")
    return value


def token_claims(token: Secret) -> dict[str, Any]:
    """The claims of a JWT Vault just signed, read without checking the signature (the
    answer came from Vault over the broker's own connection; relying parties verify it).
    Raises UpstreamRejected, never quoting the token."""
    payload = token.reveal().split(".")[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        raise _bad("its payload is not base64url JSON") from None
    if not isinstance(claims, dict):
        raise _bad("its payload is not a JSON object")
    return claims


def read_token(data: Mapping[str, Any], max_ttl: int) -> tuple[dict[str, Any], datetime]:
    """The credential (``token``, ``audience``, ``subject``, ``issuer``) and its expiry
    from Vault's answer. A token living longer than ``max_ttl`` seconds (``exp - iat``)
    is refused: it could not be taken back before then."""
    credential, exp, _ = _read(data, max_ttl)
    return credential, exp


def check_granted(data: Mapping[str, Any], max_ttl: int, granted: int) -> None:
    """Refuse a token (Vault's answer, checked as ``read_token`` checks it) that lives
    longer than the ``granted`` seconds: NotPermitted, never quoting the token."""
    lives = _read(data, max_ttl)[2]
    if lives > granted:
        raise NotPermitted(
            f"the role's OIDC tokens live {lives}s, longer than the {granted}s granted (the "
            "ttl asked for, or a policy rule's max_ttl), and an OIDC token cannot be "
            "revoked; ask for no ttl, or set the Vault OIDC role's ttl to at most the grant",
            code="token_outlives_grant",
        )


def _read(data: Mapping[str, Any], max_ttl: int) -> tuple[dict[str, Any], datetime, int]:
    token = identity_token(data)
    claims = token_claims(token)
    texts: dict[str, str] = {}
    for name in ("aud", "sub", "iss"):
        value = claims.get(name)
        if not isinstance(value, str) or not value:
            raise _bad(f"its {name} is missing or not a string")
        texts[name] = value
    client_id = data.get("client_id")
    if client_id is not None and client_id != texts["aud"]:
        raise _bad("its aud is not the OIDC role's client_id")
    exp, iat = _epoch(claims, "exp"), _epoch(claims, "iat")
    if exp <= iat:
        raise _bad("it expires before it was issued")
    if exp - iat > max_ttl:
        raise _bad(
            f"it lives {exp - iat}s, longer than the role's max_ttl of {max_ttl}s, and an "
            "OIDC token cannot be revoked; set the Vault OIDC role's ttl to at most max_ttl"
        )
    credential = {
        "token": token.reveal(),
        "audience": texts["aud"],
        "subject": texts["sub"],
        "issuer": texts["iss"],
    }
    return credential, datetime.fromtimestamp(exp, UTC), exp - iat


class OidcEngine(Engine):
    name = "oidc"
    kind = "oidc_token"
    modes = {"token": Mode(leased=False)}

    def requires(self, role: RoleSettings) -> frozenset[str]:
        return frozenset({"entity"})

    def check_role(self, role: RoleSettings) -> None:
        if role.mount != IDENTITY_MOUNT:
            raise ValueError(
                "mount: the oidc engine reads tokens from Vault's identity engine; set "
                "mount: identity and vault_role to the identity OIDC role"
            )

    def request(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any], ttl: int
    ) -> VaultRequest:
        return identity_token_request(role)

    def check_granted(self, role: RoleSettings, data: Mapping[str, Any], ttl: int) -> None:
        check_granted(data, role.max_ttl, ttl)

    def shape(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, Any]:
        return read_token(data, role.max_ttl)[0]

    def expires_at(self, role: RoleSettings, data: Mapping[str, Any]) -> datetime | None:
        """The token's ``exp``; None if the answer is not usable (``shape`` then refuses
        it, so nothing is handed out with the grant's expiry instead)."""
        try:
            return read_token(data, role.max_ttl)[1]
        except UpstreamRejected:
            return None

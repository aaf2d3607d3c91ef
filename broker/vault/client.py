"""Async Vault client for exactly the calls the broker makes."""

from __future__ import annotations

import logging
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from broker.clock import Clock
from broker.errors import UpstreamRejected, UpstreamUnavailable
from broker.secret import Secret
from broker.vault.identity import OwnToken
from broker.vault.paths import vault_path
from broker.vault.settings import VaultSettings

log = logging.getLogger(__name__)
_GONE = ("invalid lease",)  # Vault's word, on a lease lookup, that the lease does not exist
_ENDED = (*_GONE, "lease expired", "lease not found")  # ... and on a renewal
_NO_TOKEN = ("invalid accessor",)  # older Vault's word that it does not know a token


def entity_alias_name(issuer: str, workload: str) -> str:
    """The entity alias an instance token of this workload is created with."""
    return f"{issuer}:{workload}"


@dataclass(frozen=True)
class InstanceToken:
    token: Secret
    accessor: str
    expires_at: datetime


@dataclass(frozen=True)
class IssuedSecret:
    """Vault's answer to a credential request. ``data`` holds credential values: it is
    handed to the caller once and never logged or stored."""

    lease_id: str
    lease_duration: int
    renewable: bool
    data: dict[str, Any]

    def __repr__(self) -> str:  # data holds credential values: never printed
        return f"IssuedSecret(lease_id={self.lease_id!r}, lease_duration={self.lease_duration})"


@dataclass(frozen=True)
class LeaseInfo:
    """What ``sys/leases/lookup`` says of a lease (its id, times; never a credential)."""

    lease_id: str
    issue_time: datetime | None
    expire_time: datetime | None
    renewable: bool


@dataclass(frozen=True)
class VaultHealth:
    reachable: bool
    initialized: bool = False
    sealed: bool = True

    @property
    def ready(self) -> bool:
        return self.reachable and self.initialized and not self.sealed


class VaultClient:
    def __init__(self, settings: VaultSettings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        # The broker's own token: logged in, checked at start-up, kept alive, asked
        # about by readiness.
        self.own = OwnToken(settings, self._call)

    async def start(self) -> None:
        ssl_ctx: ssl.SSLContext | bool = True
        if self._settings.ca_cert is not None:
            ssl_ctx = ssl.create_default_context(cafile=str(self._settings.ca_cert))
        connector = aiohttp.TCPConnector(limit=self._settings.max_connections, ssl=ssl_ctx)
        self._session = aiohttp.ClientSession(
            base_url=self._settings.addr,
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
            raise_for_status=False,
        )
        await self.own.login()
        await self.own.check()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- the broker's own identity (broker.vault.identity) ------------------------------

    async def maintain_login(self) -> None:
        """Periodic: log in again or renew the broker's own token when due."""
        await self.own.maintain()

    # -- calls -----------------------------------------------------------------------

    async def health(self) -> VaultHealth:
        try:
            body = await self._call(
                "GET",
                "/v1/sys/health",
                token=None,
                params={"standbyok": "true", "sealedcode": "200", "uninitcode": "200"},
            )
        except (UpstreamUnavailable, UpstreamRejected):
            return VaultHealth(reachable=False)
        return VaultHealth(
            reachable=True,
            initialized=bool(body.get("initialized")),
            sealed=bool(body.get("sealed", True)),
        )

    async def runs_alone(self) -> bool:
        """Whether Vault says it runs as one node (``sys/leader``: HA not enabled): every
        answer, a LIST's included, then comes from the node that revokes. False when HA is
        enabled (a standby may answer a read from a copy that lags behind) or Vault did not
        say."""
        try:
            body = await self._call("GET", "/v1/sys/leader", token=None)
        except (UpstreamUnavailable, UpstreamRejected):
            return False
        return body.get("ha_enabled") is False

    async def create_instance_token(
        self, *, instance_id: str, workload: str, issuer: str
    ) -> InstanceToken:
        ttl = self._settings.instance_token_ttl
        request: dict[str, Any] = {
            "policies": list(self._settings.instance_policies),
            "no_default_policy": True,
            "ttl": f"{ttl}s",
            "renewable": False,
            "display_name": "broker-instance",
            "meta": {"instance_id": instance_id, "workload": workload, "issuer": issuer},
        }
        if self._settings.entity_alias == "workload":
            # Vault creates the entity (and this alias on the token auth mount) the first
            # time; every later instance of the workload shares it. Issuer-scoped: two
            # issuers' workloads of the same name are different workloads.
            request["entity_alias"] = entity_alias_name(issuer, workload)
        body = await self._call(
            "POST",
            f"/v1/{vault_path('auth', 'token', 'create', self._settings.token_role)}",
            json=request,
        )
        auth = body.get("auth") or {}
        if not auth.get("client_token") or not auth.get("accessor"):
            raise UpstreamRejected(
                "Vault returned no token for the instance", code="vault_bad_response"
            )
        duration = int(auth.get("lease_duration") or ttl)
        return InstanceToken(
            token=Secret(auth["client_token"]),
            accessor=auth["accessor"],
            expires_at=self._clock.now() + timedelta(seconds=duration),
        )

    async def issue(
        self, token: Secret, method: str, path: str, body: dict[str, Any] | None
    ) -> IssuedSecret:
        resp = await self._call(
            method, f"/v1/{path}", token=token, json=body if method != "GET" else None
        )
        data = resp.get("data")
        if not isinstance(data, dict):
            raise UpstreamRejected("Vault returned no credential", code="vault_bad_response")
        return IssuedSecret(
            lease_id=str(resp.get("lease_id") or ""),
            lease_duration=int(resp.get("lease_duration") or 0),
            renewable=bool(resp.get("renewable")),
            data=data,
        )

    async def renew_lease(self, lease_id: str, increment: int) -> tuple[int, bool]:
        body = await self._call(
            "PUT",
            "/v1/sys/leases/renew",
            json={"lease_id": lease_id, "increment": increment},
            # A lease Vault no longer holds: the renewal's caller decides what it means
            # (expired, or lost), and says so itself.
            expected=_ENDED,
        )
        return int(body.get("lease_duration") or 0), bool(body.get("renewable"))

    async def revoke_lease(self, lease_id: str) -> None:
        """Revoke now (``sync``): returns only once the backend has removed the credential.
        Revoking a lease Vault no longer knows is not an error."""
        await self._call("PUT", "/v1/sys/leases/revoke", json={"lease_id": lease_id, "sync": True})

    async def lease_exists(self, lease_id: str) -> bool:
        try:
            await self._call(
                "PUT", "/v1/sys/leases/lookup", json={"lease_id": lease_id}, expected=_GONE
            )
        except UpstreamRejected as exc:
            # Only Vault's own word that the lease is unknown proves it gone; any other
            # 400 (or a proxy's) is no evidence, and the caller retries.
            if exc.code == "vault_invalid_request" and exc.vault_errors == ("invalid lease",):
                return False
            raise
        return True

    async def lookup_lease(self, lease_id: str) -> LeaseInfo | None:
        """The lease's times, or None when Vault says it does not know it (gone)."""
        try:
            body = await self._call(
                "PUT", "/v1/sys/leases/lookup", json={"lease_id": lease_id}, expected=_GONE
            )
        except UpstreamRejected as exc:
            if exc.code == "vault_invalid_request" and exc.vault_errors == ("invalid lease",):
                return None
            raise
        data = body.get("data") or {}
        return LeaseInfo(
            lease_id=str(data.get("id") or lease_id),
            issue_time=_vault_time(data.get("issue_time")),
            expire_time=_vault_time(data.get("expire_time")),
            renewable=bool(data.get("renewable")),
        )

    async def list_lease_keys(self, prefix: str) -> list[str]:
        """What Vault lists directly under ``prefix`` in its lease tree: lease ids relative
        to the prefix, and deeper levels ending in ``/``; empty when there is nothing.
        Needs ``list`` and ``sudo`` on ``sys/leases/lookup/*``."""
        # Segments as they are, never unescaped: "%41" is not "A" (that would list another
        # path, and leases absent from it would look gone); vault_path refuses it.
        segments = [seg for seg in prefix.strip("/").split("/") if seg]
        path = vault_path("sys", "leases", "lookup", *segments)
        body = await self._call("LIST", f"/v1/{path}/")  # nothing under it: {} (see _call)
        keys = (body.get("data") or {}).get("keys") or []
        return [k for k in keys if isinstance(k, str) and k]

    async def irrevocable_leases(self) -> list[str]:
        """Ids of the leases Vault gave up revoking (after its own retries): they stay
        until an operator deals with them. Needs ``read`` and ``sudo`` on ``sys/leases``."""
        body = await self._call("GET", "/v1/sys/leases", params={"type": "irrevocable"})
        leases = (body.get("data") or {}).get("leases") or []
        return [str(x["lease_id"]) for x in leases if isinstance(x, dict) and x.get("lease_id")]

    async def revoke_confirmed(self, lease_id: str) -> bool:
        """Revoke a lease and ask Vault whether it is gone: True only on Vault's word."""
        await self.revoke_lease(lease_id)
        return not await self.lease_exists(lease_id)

    async def revoke_accessor(self, accessor: str) -> bool:
        """Revoke an instance token; its leases are queued for revocation by Vault. False
        when Vault does not know the token (OpenBao and recent Vault answer 200 with the
        warning "No token found with this accessor", older Vault 400 "invalid accessor"):
        nothing was revoked, and asking again cannot change that."""
        try:
            body = await self._call(
                "POST",
                "/v1/auth/token/revoke-accessor",
                json={"accessor": accessor},
                expected=_NO_TOKEN,
            )
        except UpstreamRejected as exc:
            if exc.code == "vault_invalid_request" and any(
                "invalid accessor" in e for e in exc.vault_errors
            ):
                return False
            raise
        warnings = body.get("warnings") or []
        return not any("No token found" in str(w) for w in warnings)

    # -- transport -------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        token: Secret | None | bool = True,
        json: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        expected: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """``expected``: Vault's error strings that answer the question (a lookup's
        "invalid lease" means gone), logged at debug instead of as a refusal."""
        if self._session is None:
            raise UpstreamUnavailable("the Vault client is not started")
        headers = {}
        if token is True:
            own = self.own.token
            if own is None:
                raise UpstreamUnavailable("the broker is not logged in to Vault")
            headers["X-Vault-Token"] = own.reveal()
        elif isinstance(token, Secret):
            headers["X-Vault-Token"] = token.reveal()
        try:
            async with self._session.request(
                method, path, json=json, params=params, headers=headers
            ) as resp:
                status = resp.status
                payload = await resp.json(content_type=None) if status != 204 else {}
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            log.warning(
                "vault call failed",
                extra={"vault_path": _log_path(path), "error": type(exc).__name__},
            )
            # A refused connection sent nothing; a timeout or a dropped connection may
            # have reached Vault, which may have acted on it.
            raise UpstreamUnavailable(
                "Vault is unreachable; retry shortly",
                outcome_unknown=not isinstance(exc, aiohttp.ClientConnectorError),
            ) from None
        if status in (200, 204):
            return payload or {}
        if method == "LIST" and status == 404 and payload == {"errors": []}:
            # An empty listing is Vault's 404 with exactly this body: an answer, not a
            # refusal. Any other 404 (a proxy's, a missing route) is no evidence that the
            # path holds nothing, and is raised as a refusal.
            return {}
        errors = payload.get("errors") if isinstance(payload, dict) else None
        first = str(errors[0])[:200] if errors else ""
        quiet = bool(errors) and all(str(e) in expected for e in errors or ())
        if status == 403:
            raise self._denied(path, token, quiet=quiet)
        log.log(
            logging.DEBUG if quiet else logging.WARNING,
            "vault refused a call",
            extra={"vault_path": _log_path(path), "status": status, "vault_error": first},
        )
        if status in (429, 500, 502, 503, 504):
            # 502/504 come from something in front of Vault, after Vault may have acted.
            raise UpstreamUnavailable(
                "Vault is unavailable or sealed; retry shortly",
                outcome_unknown=status in (502, 504),
            )
        if status == 400:
            err = UpstreamRejected("Vault refused the request", code="vault_invalid_request")
            err.vault_errors = tuple(str(e) for e in errors or ())
            raise err
        err = UpstreamRejected(f"Vault answered {status}", code="vault_rejected")
        err.http_status = status
        raise err

    def _denied(self, path: str, token: Secret | None | bool, *, quiet: bool) -> UpstreamRejected:
        """A 403, saying whose policy refused which path (a path carries no secret: the
        broker never puts one in a path); the log line has the full path."""
        shown = path.removeprefix("/v1/")
        if token is True:
            self.own.refused()  # perhaps the token itself is no longer valid: look again
            whose, fix = "broker", "the broker's own token (its Vault policy)"
        elif isinstance(token, Secret):
            policies = ", ".join(self._settings.instance_policies)
            whose, fix = "instance", f"the instance token (vault.instance_policies: {policies})"
        else:
            whose, fix = "none", "no token"
        if not quiet:
            log.warning("vault denied a call", extra={"vault_path": shown, "policy_of": whose})
        return UpstreamRejected(
            f"Vault refused {shown} (permission denied) to {fix}", code="vault_permission_denied"
        )


def _vault_time(value: Any) -> datetime | None:
    """Vault's RFC 3339 times (nanoseconds, a zone offset or Z) as aware datetimes."""
    if not isinstance(value, str) or not value:
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)\Z", value)
    if m is None:
        return None
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        return datetime.fromisoformat(f"{m.group(1)}.{frac}{zone}").astimezone(UTC)
    except ValueError:
        return None


def _log_path(path: str) -> str:
    """A path for a log line: the last segment of a lease or credential path is dropped."""
    return path if path.startswith("/v1/sys/") or "/auth/" in path else path.rsplit("/", 1)[0]

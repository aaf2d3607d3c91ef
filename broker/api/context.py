"""The request context every handler works in: the services it reaches (``Api``, under
the application key ``API``), who is calling (``identity_of`` for a workload by its
bearer token, ``verified`` for one by a token sent otherwise, ``operator_of`` and
``require_scope`` for an operator, a refusal audited), and ``Cached`` for the
unauthenticated probes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from broker.api.auth import OperatorRefused
from broker.api.metrics import Metrics, Scraper
from broker.api.operators import Operator, Scope
from broker.api.services import (
    Admin,
    AuditReader,
    AuditTrail,
    Authenticator,
    Credentials,
    EventReceiver,
    Readiness,
    RefusalAudit,
)
from broker.errors import AdminForbidden, AdminUnauthorized, TokenInvalid
from broker.identity import Identity, IdentityVerifier
from broker.logs import note_request


@dataclass(frozen=True)
class Api:
    """What the handlers reach: the services, and what HTTP itself needs."""

    credentials: Credentials
    admin: Admin
    events: EventReceiver | None
    readiness: Readiness
    verifier: IdentityVerifier
    metrics: Metrics
    scraper: Scraper
    operators: Authenticator
    refusals: RefusalAudit


class Cached:
    """The last result of an async probe, reused for ``ttl`` seconds, one call at a time:
    unauthenticated /readyz and /metrics floods cost the store and Vault one query each
    per interval, however many requests arrive."""

    def __init__(self, probe: Callable[[], Awaitable[Any]], ttl: float) -> None:
        self._probe = probe
        self._ttl = ttl
        self._value: Any = None
        self._at = -float("inf")
        self._lock = asyncio.Lock()

    async def get(self) -> Any:
        if time.monotonic() - self._at < self._ttl:
            return self._value
        async with self._lock:
            if time.monotonic() - self._at >= self._ttl:
                self._value = await self._probe()
                self._at = time.monotonic()
        return self._value


API: web.AppKey[Api] = web.AppKey("api", Api)
AUDIT_EVENTS: web.AppKey[AuditReader] = web.AppKey("audit_events")
READINESS: web.AppKey[Cached] = web.AppKey("readiness")
COUNTS: web.AppKey[Cached] = web.AppKey("counts")
AUDIT: web.AppKey[AuditTrail] = web.AppKey("audit")


def _bearer(request: web.Request, *, admin: bool) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if not header or scheme.lower() != "bearer" or not value.strip():
        if admin:
            raise AdminUnauthorized(
                "send the admin token as 'Authorization: Bearer <token>'",
                code="admin_token_missing",
            )
        raise TokenInvalid(
            "send the identity token as 'Authorization: Bearer <jwt>'", code="token_missing"
        )
    return value.strip()


async def identity_of(request: web.Request) -> Identity:
    """The verified caller, from its bearer token; its identifiers join the request's log
    line."""
    return await verified(request, _bearer(request, admin=False))


async def verified(request: web.Request, raw: str) -> Identity:
    """The identity ``raw`` proves, by the one verifier every workload door uses (the
    bearer token of ``/v1/credentials``, the ``subject_token`` of ``/v1/token``): same
    issuers, keys and claims; the replay rule applies where the token is used up, in
    issuance. Its identifiers join the request's log line."""
    identity = await request.app[API].verifier.verify(raw)
    note_request(
        issuer=identity.issuer_name,
        instance_id=identity.instance_id,
        workload=identity.workload,
    )
    return identity


async def operator_of(request: web.Request, needed: Scope) -> Operator:
    """The operator calling, if it may do what needs ``needed``; refused otherwise. A
    refusal is audited (``admin.refused``): who (the operator, or ``unknown`` and a
    fingerprint of the token), what (method, route, scope needed), and from where."""
    try:
        presented = _bearer(request, admin=True)
        operator = await request.app[API].operators.authenticate(presented, needed)
    except OperatorRefused as exc:
        note_request(operator=exc.operator)
        await _audit_refusal(request, needed, exc.code, exc.operator, exc.fingerprint)
        raise
    except AdminUnauthorized as exc:
        await _audit_refusal(request, needed, exc.code)
        raise
    note_request(operator=operator.name)
    return operator


async def require_scope(request: web.Request, operator: Operator, needed: Scope) -> None:
    """A scope a request needs beyond its endpoint's (``revoke_orphans``): refused and
    audited like any other."""
    if not operator.may(needed):
        await _audit_refusal(request, needed, "operator_scope_insufficient", operator.name)
        raise AdminForbidden(
            f"operator {operator.name} has the {operator.scope.label} scope; "
            f"this needs {needed.label}",
            code="operator_scope_insufficient",
        )


async def _audit_refusal(
    request: web.Request,
    needed: Scope,
    code: str,
    operator: str | None = None,
    fingerprint: str | None = None,
) -> None:
    resource = request.match_info.route.resource
    said = {"token_fingerprint": fingerprint} if fingerprint else {}
    await request.app[API].refusals.refused(
        f"operator:{operator}" if operator else "unknown",
        "admin.refused",
        outcome="refused",
        reason=code,
        method=request.method,
        route=resource.canonical if resource is not None else "unmatched",
        scope=needed.label,
        source=request.remote or "unknown",
        **said,
    )

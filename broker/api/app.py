"""Routes and handlers. Each handler authenticates, decodes, calls one function, encodes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from broker.api.errors import make_middleware
from broker.api.metrics import Metrics, Scraper
from broker.api.openapi import openapi_document
from broker.api.operators import Operator, Scope
from broker.api.selection import (
    TERMINATION_FIELDS,
    batch_public,
    radius_public,
    selection_of,
    termination_order,
)
from broker.api.services import Admin, Credentials, EventReceiver, Readiness
from broker.api.views import instance_public, job_public, lease_admin
from broker.durations import parse_duration
from broker.errors import (
    AdminForbidden,
    AdminUnauthorized,
    BadRequest,
    NotFound,
    TokenInvalid,
)
from broker.events import webhook
from broker.identity import Identity, IdentityVerifier
from broker.identity.verify import valid_instance_id
from broker.leases import JobState, JobView, LeaseState

ROLE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
LEASE_ID_PATTERN = re.compile(r"^l-[0-9a-f]{32}\Z")
JOB_ID_PATTERN = re.compile(r"^j-[0-9a-f]{32}\Z")
MAX_AUTH_HEADER = 70 * 1024
MAX_REASON = 200
MAX_PREVIEW_ROLES = 32


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
    admin_token_sha256: str


API: web.AppKey[Api] = web.AppKey("api", Api)
READINESS: web.AppKey[Cached] = web.AppKey("readiness")
COUNTS: web.AppKey[Cached] = web.AppKey("counts")


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
    return await request.app[API].verifier.verify(_bearer(request, admin=False))


async def operator_of(request: web.Request, needed: Scope) -> Operator:
    """The operator calling, if it may do what needs ``needed``; refused otherwise."""
    presented = _bearer(request, admin=True)
    digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest()
    if not hmac.compare_digest(digest, request.app[API].admin_token_sha256):
        raise AdminForbidden("this call needs the broker's admin token")
    operator = Operator("admin", Scope.ADMIN)
    if not operator.may(needed):
        raise AdminForbidden(f"this call needs the {needed.label} scope")
    return operator


async def _json_object(request: web.Request, allowed: set[str] | None) -> dict[str, Any]:
    if request.content_length is None and not request.can_read_body:
        return {}
    raw = await request.read()  # bounded by client_max_size → 413
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON", code="malformed_json") from None
    except RecursionError:  # '[[[[…' within the size limit: refused, not a 500
        raise BadRequest("the request body is nested too deeply", code="malformed_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="malformed_json")
    if allowed is not None and set(body) - allowed:
        raise BadRequest(
            f"the body has fields the broker does not take; allowed: {', '.join(sorted(allowed))}",
            code="unknown_field",
        )
    return body


def _ttl(body: dict[str, Any]) -> int | None:
    if "ttl" not in body or body["ttl"] is None:
        return None
    value = body["ttl"]
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise BadRequest(
            "ttl must be a duration like '10m' or a number of seconds", code="invalid_ttl"
        )
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise BadRequest(
            "ttl must be a duration like '10m' or '1h30m', or a number of seconds, up to 10 years",
            code="invalid_ttl",
        ) from None
    if seconds < 1:
        raise BadRequest("ttl must be at least 1s", code="invalid_ttl")
    return seconds


def _lease_id(request: web.Request) -> str:
    lease_id = request.match_info["lease_id"]
    if not LEASE_ID_PATTERN.match(lease_id):
        raise NotFound("no such lease", code="lease_not_found")
    return lease_id


def _instance_id(request: web.Request) -> str:
    instance_id = request.match_info["instance_id"]
    if not valid_instance_id(instance_id):
        raise BadRequest(
            "an instance id is 1-254 of [A-Za-z0-9._:@/-], starting with a letter or digit, "
            "with no '.' or '..' segment (percent-encode '/' in the path)",
            code="invalid_instance_id",
        )
    return instance_id


# -- workload endpoints ------------------------------------------------------------------


async def create_credential(request: web.Request) -> web.Response:
    api = request.app[API]
    identity = await identity_of(request)
    # Other fields are the role's request parameters (a CSR, a public key): the service
    # refuses any the role does not take, once it knows the role is permitted.
    body = await _json_object(request, None)
    role = body.pop("role", None)
    if not isinstance(role, str) or not ROLE_PATTERN.match(role):
        raise BadRequest("'role' is required: the name of a credential role", code="invalid_role")
    ttl = _ttl(body)
    body.pop("ttl", None)
    credential = await api.credentials.issue(identity, role, ttl, body)
    api.metrics.issued.labels(role=credential.role, kind=credential.kind).inc()
    return web.json_response(
        credential.response(), status=201, headers={"Cache-Control": "no-store"}
    )


async def renew_lease(request: web.Request) -> web.Response:
    credentials = request.app[API].credentials
    identity = await identity_of(request)
    lease_id = _lease_id(request)
    body = await _json_object(request, {"ttl"})
    return web.json_response(await credentials.renew(identity, lease_id, _ttl(body)))


async def release_lease(request: web.Request) -> web.Response:
    credentials = request.app[API].credentials
    identity = await identity_of(request)
    await credentials.release(identity, _lease_id(request))
    return web.Response(status=204)


def _reason(body: dict[str, Any]) -> str | None:
    reason = body.get("reason")
    if reason is None or reason == "":
        return None
    if not isinstance(reason, str) or len(reason) > MAX_REASON or not reason.isprintable():
        raise BadRequest(
            f"'reason' must be printable text of at most {MAX_REASON} characters",
            code="invalid_reason",
        )
    return reason


async def terminate_self(request: web.Request) -> web.Response:
    """The caller's own instance, named by its token (never by the request), ends."""
    credentials = request.app[API].credentials
    identity = await identity_of(request)
    reason = _reason(await _json_object(request, {"reason"}))
    job = await credentials.terminate_self(identity, reason)
    return web.json_response(
        {"instance_id": identity.instance_id, "job": job_public(job)}, status=202
    )


# -- admin endpoints ---------------------------------------------------------------------


async def terminate_instance(request: web.Request) -> web.Response:
    operator = await operator_of(request, Scope.REVOKE)
    instance_id = _instance_id(request)
    job = await request.app[API].admin.terminate(instance_id, operator)
    # Tombstoned all the same (a stolen token of a dead instance draws nothing), but said
    # plainly: a mistyped id is noticed.
    never_seen = await request.app[API].admin.never_seen(instance_id)
    return web.json_response(
        {"instance_id": instance_id, "job": job_public(job), "never_seen": never_seen},
        status=202,
    )


async def select_instances(request: web.Request) -> web.Response:
    """The blast radius of a selection (``broker.api.selection``); changes nothing."""
    await operator_of(request, Scope.READ)
    body = await _json_object(request, {"selection"})
    radius = await request.app[API].admin.selection(selection_of(body.get("selection")))
    return web.json_response(radius_public(radius))


async def terminate_selection(request: web.Request) -> web.Response:
    """The next batch of a selection's bulk termination; the caller follows ``next``."""
    operator = await operator_of(request, Scope.REVOKE)
    order = termination_order(await _json_object(request, set(TERMINATION_FIELDS)))
    batch = await request.app[API].admin.terminate_selection(order, operator)
    return web.json_response(batch_public(batch), status=202)


async def terminate_event(request: web.Request) -> web.Response:
    """A signed termination event from a pipeline (``broker.events.receiver``)."""
    events = request.app[API].events
    if events is None:
        raise NotFound("no such endpoint", code="not_found")
    answers = await events.receive(
        await request.read(),
        timestamp=request.headers.get(webhook.TIMESTAMP_HEADER),
        signature=request.headers.get(webhook.SIGNATURE_HEADER),
    )
    results = [
        {"instance_id": instance_id, "job": job_public(answer)}
        if isinstance(answer, JobView)
        else {"instance_id": instance_id, "error": {"code": answer}}
        for instance_id, answer in answers
    ]
    return web.json_response({"results": results}, status=202)


async def show_instance(request: web.Request) -> web.Response:
    await operator_of(request, Scope.READ)
    instance, leases, job = await request.app[API].admin.instance(_instance_id(request))
    return web.json_response(
        {
            **instance_public(instance),
            "leases": [lease_admin(x) for x in leases],
            "job": job_public(job) if job else None,
        }
    )


def _query(request: web.Request, name: str, allowed: set[str] | None = None) -> str | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    if len(value) > 255 or (allowed is not None and value not in allowed):
        hint = f"; one of {', '.join(sorted(allowed))}" if allowed else ""
        raise BadRequest(f"query parameter {name!r} is not valid{hint}", code="invalid_query")
    return value


async def list_leases(request: web.Request) -> web.Response:
    await operator_of(request, Scope.READ)
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise BadRequest("limit must be an integer", code="invalid_query") from None
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be between 1 and 1000", code="invalid_query")
    after = _query(request, "after")
    leases = await request.app[API].admin.leases(
        instance=_query(request, "instance"),
        workload=_query(request, "workload"),
        role=_query(request, "role"),
        state=_query(request, "state", {s.value for s in LeaseState}),
        limit=limit,
        after=after,
    )
    nxt = leases[-1].lease_id if len(leases) == limit else None
    return web.json_response({"leases": [lease_admin(x) for x in leases], "next": nxt})


async def explain_policy(request: web.Request) -> web.Response:
    """Why a token would be granted a role or refused it (``Admin.explain``)."""
    await operator_of(request, Scope.READ)
    body = await _json_object(request, {"token", "role", "ttl"})
    token, role = body.get("token"), body.get("role")
    if not isinstance(token, str) or not token:
        raise BadRequest(
            "'token' is required: the identity token to explain", code="invalid_token_field"
        )
    if not isinstance(role, str) or not ROLE_PATTERN.match(role):
        raise BadRequest("'role' is required: the name of a credential role", code="invalid_role")
    ttl = _ttl(body)
    return web.json_response(await request.app[API].admin.explain(token, role, ttl))


def _preview_roles(body: dict[str, Any]) -> list[str]:
    roles = body.get("roles")
    if (
        not isinstance(roles, list)
        or not 1 <= len(roles) <= MAX_PREVIEW_ROLES
        or not all(isinstance(r, str) and ROLE_PATTERN.match(r) for r in roles)
    ):
        raise BadRequest(
            f"'roles' is required: a list of 1 to {MAX_PREVIEW_ROLES} role names",
            code="invalid_role",
        )
    return roles


async def preview_policy(request: web.Request) -> web.Response:
    """Whether a token carrying these claims would get each role (``Admin.preview``)."""
    await operator_of(request, Scope.READ)
    body = await _json_object(request, {"issuer", "claims", "roles", "ttl"})
    issuer, claims = body.get("issuer"), body.get("claims")
    if not isinstance(issuer, str) or not issuer:
        raise BadRequest(
            "'issuer' is required: the name of an issuer configured on this broker",
            code="invalid_issuer",
        )
    if not isinstance(claims, dict):
        raise BadRequest(
            "'claims' is required: a JSON object of the claims a token would carry",
            code="invalid_claims",
        )
    roles, ttl = _preview_roles(body), _ttl(body)
    return web.json_response(request.app[API].admin.preview(issuer, claims, roles, ttl))


async def retry_job(request: web.Request) -> web.Response:
    operator = await operator_of(request, Scope.ADMIN)
    job_id = request.match_info["job_id"]
    if not JOB_ID_PATTERN.match(job_id):
        raise NotFound("no such revocation job", code="job_not_found")
    job = await request.app[API].admin.retry(job_id, operator)
    return web.json_response({"job": job_public(job)}, status=202)


async def reconcile(request: web.Request) -> web.Response:
    """Run a reconciliation pass now and answer with its report."""
    operator = await operator_of(request, Scope.REVOKE)
    body = await _json_object(request, {"revoke_orphans"})
    revoke = body.get("revoke_orphans")
    if revoke is not None and not isinstance(revoke, bool):
        raise BadRequest("'revoke_orphans' must be true or false", code="invalid_field")
    if revoke and not operator.may(Scope.ADMIN):
        raise AdminForbidden("revoking orphans needs the admin scope")
    report = await request.app[API].admin.reconcile(revoke)
    return web.json_response(report.public())


async def list_jobs(request: web.Request) -> web.Response:
    await operator_of(request, Scope.READ)
    state = _query(request, "state", {s.value for s in JobState})
    jobs = await request.app[API].admin.jobs(state=state)
    return web.json_response({"jobs": [job_public(j) for j in jobs]})


# -- operations --------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


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


async def readyz(request: web.Request) -> web.Response:
    checks = await request.app[READINESS].get()
    if all(v == "ok" for v in checks.values()):
        return web.json_response({"status": "ready", "checks": checks})
    body = {
        "error": {
            "code": "not_ready",
            "message": "; ".join(f"{k} {v}" for k, v in checks.items() if v != "ok"),
        },
        "checks": checks,
    }
    return web.json_response(body, status=503)


async def scrape(request: web.Request) -> web.Response:
    counts = await request.app[COUNTS].get()
    return web.Response(
        body=request.app[API].scraper.render(counts),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def build_app(
    credentials: Credentials,
    admin: Admin,
    events: EventReceiver | None,
    readiness: Readiness,
    *,
    verifier: IdentityVerifier,
    metrics: Metrics,
    scraper: Scraper,
    admin_token_sha256: str,
    max_body_bytes: int,
) -> web.Application:
    """The application over its services; ``events`` is None without a webhook section
    (the endpoint then answers 404)."""
    app = web.Application(middlewares=[make_middleware(metrics)], client_max_size=max_body_bytes)
    app[API] = Api(
        credentials, admin, events, readiness, verifier, metrics, scraper, admin_token_sha256
    )
    app[READINESS] = Cached(readiness.checks, ttl=1.0)
    app[COUNTS] = Cached(readiness.counts, ttl=5.0)
    r = app.router
    r.add_post("/v1/credentials", create_credential)
    r.add_post("/v1/leases/{lease_id}/renew", renew_lease)
    r.add_delete("/v1/leases/{lease_id}", release_lease)
    # Before the admin route, whose {instance_id} would match "self".
    r.add_post("/v1/instances/self/terminate", terminate_self)
    r.add_post("/v1/instances/{instance_id}/terminate", terminate_instance)
    r.add_get("/v1/instances/{instance_id}", show_instance)
    r.add_get("/v1/admin/leases", list_leases)
    r.add_get("/v1/admin/jobs", list_jobs)
    r.add_post("/v1/admin/jobs/{job_id}/retry", retry_job)
    r.add_post("/v1/admin/reconcile", reconcile)
    r.add_post("/v1/admin/selection", select_instances)
    r.add_post("/v1/admin/terminations", terminate_selection)
    r.add_post("/v1/events/terminate", terminate_event)
    r.add_post("/v1/admin/policy/explain", explain_policy)
    r.add_post("/v1/admin/policy/preview", preview_policy)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", scrape)
    r.add_get("/openapi.json", openapi)
    return app


__all__ = ["build_app"]

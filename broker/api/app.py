"""Routes and handlers. Each handler authenticates, decodes, calls one function, encodes."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from broker.api.auth import OperatorRefused
from broker.api.errors import make_middleware
from broker.api.locks import lock_request, valid_lock_id
from broker.api.metrics import Metrics, Scraper
from broker.api.openapi import openapi_document
from broker.api.operators import Operator, Scope
from broker.api.queries import MAX_PAGE, encode_cursor, query_params
from broker.api.selection import (
    TERMINATION_FIELDS,
    batch_public,
    radius_public,
    selection_of,
    termination_order,
)
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
from broker.api.views import (
    audit_event_public,
    instance_listing,
    instance_public,
    job_public,
    lease_admin,
    lease_groups,
    lock_public,
)
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
from broker.leases import (
    LIVE_LEASE_STATES,
    AuditSelection,
    InstanceState,
    JobState,
    JobView,
    LeaseState,
)

ROLE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
LEASE_ID_PATTERN = re.compile(r"^l-[0-9a-f]{32}\Z")
JOB_ID_PATTERN = re.compile(r"^j-[0-9a-f]{32}\Z")
MAX_AUTH_HEADER = 70 * 1024
MAX_REASON = 200
MAX_INCIDENT = 128
MAX_PREVIEW_ROLES = 32
LEASE_STATES = frozenset(s.value for s in LeaseState)
LEASE_GROUP_BY = frozenset({"role", "engine", "workload", "issuer"})


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
    return await request.app[API].verifier.verify(_bearer(request, admin=False))


async def operator_of(request: web.Request, needed: Scope) -> Operator:
    """The operator calling, if it may do what needs ``needed``; refused otherwise. A
    refusal is audited (``admin.refused``): who (the operator, or ``unknown`` and a
    fingerprint of the token), what (method, route, scope needed), and from where."""
    try:
        presented = _bearer(request, admin=True)
        return await request.app[API].operators.authenticate(presented, needed)
    except OperatorRefused as exc:
        await _audit_refusal(request, needed, exc.code, exc.operator, exc.fingerprint)
        raise
    except AdminUnauthorized as exc:
        await _audit_refusal(request, needed, exc.code)
        raise


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


def _said(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """An admin action's ``reason`` and ``incident`` reference, where given."""
    incident = body.get("incident")
    if incident is None or incident == "":
        return _reason(body), None
    if (
        not isinstance(incident, str)
        or len(incident) > MAX_INCIDENT
        or not incident.isprintable()
        or incident != incident.strip()
    ):
        raise BadRequest(
            f"'incident' must be a printable reference of at most {MAX_INCIDENT} characters "
            "(e.g. INC-1234 or a ticket URL)",
            code="invalid_incident",
        )
    return _reason(body), incident


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
    reason, incident = _said(await _json_object(request, {"reason", "incident"}))
    job = await request.app[API].admin.terminate(
        instance_id, operator, reason=reason, incident=incident
    )
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
    query_params(request, ())
    instance, leases, job = await request.app[API].admin.instance(_instance_id(request))
    return web.json_response(
        {
            **instance_public(instance),
            "leases": [lease_admin(x) for x in leases],
            "job": job_public(job) if job else None,
        }
    )


async def list_leases(request: web.Request) -> web.Response:
    await operator_of(request, Scope.READ)
    q = query_params(request, {"instance", "workload", "role", "state", "limit", "after"})
    limit, after = q.limit(), q.text("after")
    if after is not None and not LEASE_ID_PATTERN.match(after):
        raise BadRequest("'after' is not a cursor this broker gave out", code="invalid_query")
    leases = await request.app[API].admin.leases(
        instance=q.text("instance"),
        workload=q.text("workload"),
        role=q.text("role"),
        state=q.text("state", LEASE_STATES),
        limit=limit + 1,  # one more than shown: ``next`` only when there is more
        after=after,
    )
    nxt = leases[limit - 1].lease_id if len(leases) > limit else None
    return web.json_response({"leases": [lease_admin(x) for x in leases[:limit]], "next": nxt})


async def show_lease(request: web.Request) -> web.Response:
    """One lease as the store holds it; ``?vault=true`` adds what Vault says of it now."""
    await operator_of(request, Scope.READ)
    q = query_params(request, {"vault"})
    vault = q.text("vault", {"true", "false"}) == "true"
    lease, live = await request.app[API].admin.lease(_lease_id(request), vault=vault)
    return web.json_response({**lease_admin(lease), **({"vault": live} if vault else {})})


async def count_leases(request: web.Request) -> web.Response:
    """Leases counted by role, engine, workload or issuer, largest first (live by default):
    a lease explosion at a glance."""
    await operator_of(request, Scope.READ)
    q = query_params(request, {"group_by", "state", "top"})
    group_by = q.text("group_by", LEASE_GROUP_BY)
    if group_by is None:
        raise BadRequest(
            f"'group_by' is required: one of {', '.join(sorted(LEASE_GROUP_BY))}",
            code="invalid_query",
        )
    state = q.text("state", LEASE_STATES)
    states = [state] if state else sorted(s.value for s in LIVE_LEASE_STATES)
    top = q.number("top", 20, low=1, high=MAX_PAGE)
    groups = await request.app[API].admin.lease_counts(group_by=group_by, states=states, top=top)
    return web.json_response(lease_groups(groups, states))


async def list_instances(request: web.Request) -> web.Response:
    await operator_of(request, Scope.READ)
    q = query_params(request, {"state", "workload", "issuer", "since", "limit", "after"})
    limit = q.limit()
    rows = await request.app[API].admin.instances(
        state=q.text("state", {s.value for s in InstanceState}),
        workload=q.text("workload"),
        issuer=q.text("issuer"),
        since=q.time("since"),
        limit=limit + 1,
        after=q.cursor(),
    )
    last = rows[limit - 1].instance if len(rows) > limit else None
    return web.json_response(
        {
            "instances": [instance_listing(x) for x in rows[:limit]],
            "next": encode_cursor(last.created_at, last.instance_id) if last else None,
        }
    )


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
    return web.json_response(await request.app[API].admin.preview(issuer, claims, roles, ttl))


async def retry_job(request: web.Request) -> web.Response:
    operator = await operator_of(request, Scope.ADMIN)
    job_id = request.match_info["job_id"]
    if not JOB_ID_PATTERN.match(job_id):
        raise NotFound("no such revocation job", code="job_not_found")
    reason, incident = _said(await _json_object(request, {"reason", "incident"}))
    job = await request.app[API].admin.retry(job_id, operator, reason=reason, incident=incident)
    return web.json_response({"job": job_public(job)}, status=202)


async def reconcile(request: web.Request) -> web.Response:
    """Run a reconciliation pass now and answer with its report."""
    operator = await operator_of(request, Scope.REVOKE)
    body = await _json_object(request, {"revoke_orphans", "reason", "incident"})
    revoke = body.get("revoke_orphans")
    if revoke is not None and not isinstance(revoke, bool):
        raise BadRequest("'revoke_orphans' must be true or false", code="invalid_field")
    if revoke:
        await require_scope(request, operator, Scope.ADMIN)
    reason, incident = _said(body)
    report = await request.app[API].admin.reconcile(
        revoke, operator, reason=reason, incident=incident
    )
    return web.json_response(report.public())


async def list_jobs(request: web.Request) -> web.Response:
    """Revocation jobs in the order they were requested, a page at a time."""
    await operator_of(request, Scope.READ)
    q = query_params(request, {"state", "instance", "since", "limit", "after"})
    limit = q.limit()
    jobs = await request.app[API].admin.jobs(
        state=q.text("state", {s.value for s in JobState}),
        instance=q.text("instance"),
        since=q.time("since"),
        limit=limit + 1,
        after=q.cursor(),
    )
    last = jobs[limit - 1] if len(jobs) > limit else None
    return web.json_response(
        {
            "jobs": [job_public(j) for j in jobs[:limit]],
            "next": encode_cursor(last.created_at, last.job_id) if last else None,
        }
    )


AUDIT_QUERY = {
    "after",
    "limit",
    "newest",
    "instance",
    "workload",
    "role",
    "action",
    "actor",
    "since",
}


def _audit_selection(request: web.Request) -> tuple[AuditSelection, int, int, bool]:
    q = query_params(request, AUDIT_QUERY)
    after = q.number("after", 0, low=0, high=2**63 - 1)
    selection = AuditSelection(
        instance=q.text("instance"),
        workload=q.text("workload"),
        role=q.text("role"),
        action=q.text("action"),
        actor=q.text("actor"),
        since=q.time("since"),
    )
    newest = q.text("newest", {"true", "false"}) == "true"
    return selection, after, q.limit(), newest


async def list_audit_events(request: web.Request) -> web.Response:
    """Audit events after ``after`` that match, oldest first; ``next`` is the cursor of the
    next page (null when this one was not full). ``newest=true``: the last ``limit`` of
    them (a tail; its ``next`` is null)."""
    await operator_of(request, Scope.READ)
    selection, after, limit, newest = _audit_selection(request)
    reader = request.app.get(AUDIT_EVENTS)
    if reader is None:
        raise NotFound("this broker does not serve its audit events", code="not_found")
    events = await reader.events(
        selection, after=after, limit=limit, newest=newest
    )
    nxt = events[-1].seq if len(events) == limit and not newest else None
    return web.json_response({"events": [audit_event_public(e) for e in events], "next": nxt})


async def verify_audit(request: web.Request) -> web.Response:
    """Recompute the audit chain (from ``from``, or its start) and answer the report."""
    await operator_of(request, Scope.READ)
    body = await _json_object(request, {"from"})
    from_seq = body.get("from", 1)
    if isinstance(from_seq, bool) or not isinstance(from_seq, int) or from_seq < 1:
        raise BadRequest("'from' must be a sequence number, 1 or more", code="invalid_field")
    trail = request.app.get(AUDIT)
    if trail is None:
        raise NotFound("this broker does not verify its audit chain", code="not_found")
    report = await trail.verify(from_seq)
    return web.json_response(report.to_dict())


async def whoami(request: web.Request) -> web.Response:
    """The operator the presented token is: its name, scope and how it authenticated."""
    operator = await operator_of(request, Scope.READ)
    query_params(request, set())
    return web.json_response(
        {"name": operator.name, "scope": operator.scope.label, "via": operator.via}
    )


async def create_lock(request: web.Request) -> web.Response:
    operator = await operator_of(request, Scope.REVOKE)
    body = await _json_object(request, {"kind", "value", "claim", "ttl", "reason", "incident"})
    try:
        ttl = _ttl(body)
        reason, incident = _said(body)
    except BadRequest as exc:
        raise BadRequest(exc.message, code="invalid_lock") from None
    lock = await request.app[API].admin.create_lock(
        operator, **lock_request(body), ttl=ttl, reason=reason or "", incident=incident
    )
    return web.json_response({"lock": lock_public(lock)}, status=201)


async def list_locks(request: web.Request) -> web.Response:
    await operator_of(request, Scope.READ)
    everything = query_params(request, {"all"}).text("all", {"true", "false"}) == "true"
    locks = await request.app[API].admin.locks(include_inactive=everything)
    return web.json_response({"locks": [lock_public(x) for x in locks]})


async def remove_lock(request: web.Request) -> web.Response:
    operator = await operator_of(request, Scope.REVOKE)
    lock_id = request.match_info["lock_id"]
    if not valid_lock_id(lock_id):
        raise NotFound("no such lock", code="lock_not_found")
    reason, incident = _said(await _json_object(request, {"reason", "incident"}))
    lock = await request.app[API].admin.remove_lock(
        lock_id, operator, reason=reason, incident=incident
    )
    return web.json_response({"lock": lock_public(lock)})


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
    operators: Authenticator,
    refusals: RefusalAudit,
    max_body_bytes: int,
    audit: AuditTrail | None = None,
    audit_events: AuditReader | None = None,
) -> web.Application:
    """The application over its services; ``events`` is None without a webhook section
    (the endpoint then answers 404)."""
    app = web.Application(middlewares=[make_middleware(metrics)], client_max_size=max_body_bytes)
    app[API] = Api(
        credentials, admin, events, readiness, verifier, metrics, scraper, operators, refusals
    )
    if audit_events is not None:
        app[AUDIT_EVENTS] = audit_events
    app[READINESS] = Cached(readiness.checks, ttl=1.0)
    app[COUNTS] = Cached(readiness.counts, ttl=5.0)
    if audit is not None:
        app[AUDIT] = audit
    r = app.router
    r.add_post("/v1/admin/audit/verify", verify_audit)
    r.add_post("/v1/credentials", create_credential)
    r.add_post("/v1/leases/{lease_id}/renew", renew_lease)
    r.add_delete("/v1/leases/{lease_id}", release_lease)
    # Before the admin route, whose {instance_id} would match "self".
    r.add_post("/v1/instances/self/terminate", terminate_self)
    r.add_post("/v1/instances/{instance_id}/terminate", terminate_instance)
    r.add_get("/v1/instances/{instance_id}", show_instance)
    r.add_get("/v1/admin/leases", list_leases)
    r.add_get("/v1/admin/leases/count", count_leases)  # before {lease_id}
    r.add_get("/v1/admin/leases/{lease_id}", show_lease)
    r.add_get("/v1/admin/instances", list_instances)
    r.add_get("/v1/admin/jobs", list_jobs)
    r.add_post("/v1/admin/jobs/{job_id}/retry", retry_job)
    r.add_post("/v1/admin/reconcile", reconcile)
    r.add_post("/v1/admin/selection", select_instances)
    r.add_post("/v1/admin/terminations", terminate_selection)
    r.add_post("/v1/events/terminate", terminate_event)
    r.add_post("/v1/admin/policy/explain", explain_policy)
    r.add_post("/v1/admin/policy/preview", preview_policy)
    r.add_get("/v1/admin/audit/events", list_audit_events)
    r.add_get("/v1/admin/whoami", whoami)
    r.add_post("/v1/admin/locks", create_lock)
    r.add_get("/v1/admin/locks", list_locks)
    r.add_delete("/v1/admin/locks/{lock_id}", remove_lock)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", scrape)
    r.add_get("/openapi.json", openapi)
    return app


__all__ = ["build_app"]

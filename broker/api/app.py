"""Routes and handlers. Each handler authenticates, decodes, calls one function, encodes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web

from broker.api.errors import make_middleware
from broker.api.metrics import Metrics
from broker.api.openapi import openapi_document
from broker.api.views import instance_public, job_public, lease_admin
from broker.clock import Clock
from broker.durations import parse_duration
from broker.engines.role import RoleSettings
from broker.errors import (
    AdminForbidden,
    AdminUnauthorized,
    BadRequest,
    BrokerError,
    EventUnauthorized,
    NotFound,
    NotPermitted,
    TokenInvalid,
)
from broker.events import Terminate, TerminationSource, webhook
from broker.events.settings import WebhookSettings
from broker.identity import Identity, IdentityVerifier
from broker.identity.verify import valid_instance_id
from broker.issuance import CredentialService
from broker.leases import InstanceView, JobState, JobView, LeaseState, LeaseView, StoreCounts
from broker.policy.explain import explain
from broker.policy.settings import Rule
from broker.revocation.reconcile import ReconcileReport
from broker.revocation.worker import RevocationWorker
from broker.vault import VaultClient

ROLE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
LEASE_ID_PATTERN = re.compile(r"^l-[0-9a-f]{32}\Z")
JOB_ID_PATTERN = re.compile(r"^j-[0-9a-f]{32}\Z")
# The webhook's accepted signatures share the replay record with token ids; '@' keeps the
# namespace apart from every issuer name.
WEBHOOK_REPLAY_NAMESPACE = "@event-webhook"
MAX_AUTH_HEADER = 70 * 1024


class AdminQueries(Protocol):
    """The admin endpoints' reads of the lease ledgers, and their retry of a failed job."""

    async def get_instance(
        self, instance_id: str
    ) -> tuple[InstanceView, list[LeaseView], JobView | None]: ...

    async def list_leases(
        self,
        *,
        instance: str | None = None,
        workload: str | None = None,
        role: str | None = None,
        state: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[LeaseView]: ...

    async def list_jobs(self, *, state: str | None = None, limit: int = 100) -> list[JobView]: ...

    async def retry_job(self, job_id: str, *, actor: str) -> JobView: ...


class ReplayGuard(Protocol):
    """The shared replay record, where the webhook remembers the signatures it accepted."""

    async def is_used(self, namespace: str, key: str) -> bool: ...

    async def use_once(self, namespace: str, key: str, *, keep_until: datetime) -> bool: ...


class LedgerCounts(Protocol):
    """Live leases by role and state, and the revocation queue, for the metrics."""

    async def counts(self) -> StoreCounts: ...


class Reachable(Protocol):
    """The lease database, as readiness sees it."""

    async def ping(self) -> None: ...


@dataclass(frozen=True)
class ApiDeps:
    verifier: IdentityVerifier
    service: CredentialService
    admin: AdminQueries
    replay: ReplayGuard
    counts: LedgerCounts
    database: Reachable
    vault: VaultClient
    metrics: Metrics
    admin_token_sha256: str
    max_body_bytes: int
    terminate: Terminate
    reconcile: Callable[[bool | None], Awaitable[ReconcileReport]]
    roles: Mapping[str, RoleSettings]
    rules: tuple[Rule, ...]
    clock: Clock
    issuer_names: frozenset[str]
    webhook: WebhookSettings | None = None
    sources: Sequence[TerminationSource] = ()
    liveness_outcomes: Mapping[tuple[str, str], int] = field(default_factory=dict)
    worker: RevocationWorker | None = None


DEPS: web.AppKey[ApiDeps] = web.AppKey("deps", ApiDeps)
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
    return await request.app[DEPS].verifier.verify(_bearer(request, admin=False))


def require_admin(request: web.Request) -> None:
    presented = _bearer(request, admin=True)
    digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest()
    if not hmac.compare_digest(digest, request.app[DEPS].admin_token_sha256):
        raise AdminForbidden("this call needs the broker's admin token")


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
    deps = request.app[DEPS]
    identity = await identity_of(request)
    # Other fields are the role's request parameters (a CSR, a public key): the service
    # refuses any the role does not take, once it knows the role is permitted.
    body = await _json_object(request, None)
    role = body.pop("role", None)
    if not isinstance(role, str) or not ROLE_PATTERN.match(role):
        raise BadRequest("'role' is required: the name of a credential role", code="invalid_role")
    ttl = _ttl(body)
    body.pop("ttl", None)
    credential = await deps.service.issue(identity, role, ttl, body)
    deps.metrics.issued.labels(role=credential.role, kind=credential.kind).inc()
    return web.json_response(
        credential.response(), status=201, headers={"Cache-Control": "no-store"}
    )


async def renew_lease(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    identity = await identity_of(request)
    lease_id = _lease_id(request)
    body = await _json_object(request, {"ttl"})
    return web.json_response(await deps.service.renew(identity, lease_id, _ttl(body)))


async def release_lease(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    identity = await identity_of(request)
    await deps.service.release(identity, _lease_id(request))
    return web.Response(status=204)


# -- admin endpoints ---------------------------------------------------------------------


async def terminate_instance(request: web.Request) -> web.Response:
    require_admin(request)
    deps = request.app[DEPS]
    instance_id = _instance_id(request)
    job = await deps.terminate(instance_id, actor="admin")
    return web.json_response({"instance_id": instance_id, "job": job_public(job)}, status=202)


async def terminate_event(request: web.Request) -> web.Response:
    """A signed termination event from a pipeline (``broker.events.webhook``). Each instance
    gets its durable job before the answer; the signature is remembered only once every
    job is recorded, so a sender that saw a 503 can send the same request again."""
    deps = request.app[DEPS]
    if deps.webhook is None:
        raise NotFound("no such endpoint", code="not_found")
    body = await request.read()
    digest, ts = webhook.verify(
        [s.get_secret_value().encode() for s in deps.webhook.secrets],
        timestamp=request.headers.get(webhook.TIMESTAMP_HEADER),
        signature=request.headers.get(webhook.SIGNATURE_HEADER),
        body=body,
        now=deps.clock.now().timestamp(),
        window_s=deps.webhook.window_s,
    )
    event = webhook.parse(body, max_instances=deps.webhook.max_instances)
    if event.issuer is not None and event.issuer not in deps.issuer_names:
        raise BadRequest("'issuer' must be the name of a configured issuer", code="invalid_issuer")
    if await deps.replay.is_used(WEBHOOK_REPLAY_NAMESPACE, digest):
        raise EventUnauthorized("this signed request was already accepted", code="event_replayed")
    results: list[dict[str, Any]] = []
    for instance_id in event.instance_ids:
        try:
            job = await deps.terminate(instance_id, actor="events:webhook", issuer=event.issuer)
        except NotPermitted as exc:
            results.append({"instance_id": instance_id, "error": {"code": exc.code}})
            continue
        results.append({"instance_id": instance_id, "job": job_public(job)})
    keep_until = datetime.fromtimestamp(ts + deps.webhook.window_s, UTC)
    if not await deps.replay.use_once(WEBHOOK_REPLAY_NAMESPACE, digest, keep_until=keep_until):
        raise EventUnauthorized("this signed request was already accepted", code="event_replayed")
    return web.json_response({"results": results}, status=202)


async def show_instance(request: web.Request) -> web.Response:
    require_admin(request)
    deps = request.app[DEPS]
    instance, leases, job = await deps.admin.get_instance(_instance_id(request))
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
    require_admin(request)
    deps = request.app[DEPS]
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise BadRequest("limit must be an integer", code="invalid_query") from None
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be between 1 and 1000", code="invalid_query")
    after = _query(request, "after")
    leases = await deps.admin.list_leases(
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
    """Which issuer verified the token, the identity it produced, which rule matched and
    why the role would be granted or refused. Issues nothing, records nothing, and does
    not use up the token's jti."""
    require_admin(request)
    deps = request.app[DEPS]
    body = await _json_object(request, {"token", "role", "ttl"})
    token, role = body.get("token"), body.get("role")
    if not isinstance(token, str) or not token:
        raise BadRequest(
            "'token' is required: the identity token to explain", code="invalid_token_field"
        )
    if not isinstance(role, str) or not ROLE_PATTERN.match(role):
        raise BadRequest("'role' is required: the name of a credential role", code="invalid_role")
    ttl = _ttl(body)
    try:
        identity = await deps.verifier.verify(token)
    except TokenInvalid as exc:
        return web.json_response(
            {
                "token": {
                    "valid": False,
                    "issuer": exc.issuer_name,
                    "error": {"code": exc.code, "message": exc.message},
                },
                "identity": None,
                "decision": None,
            }
        )
    decision = explain(identity, role, ttl, roles=deps.roles, rules=deps.rules)
    return web.json_response(
        {
            "token": {"valid": True, "issuer": identity.issuer_name, "error": None},
            "identity": identity.public(),
            "decision": decision,
        }
    )


async def retry_job(request: web.Request) -> web.Response:
    require_admin(request)
    deps = request.app[DEPS]
    job_id = request.match_info["job_id"]
    if not JOB_ID_PATTERN.match(job_id):
        raise NotFound("no such revocation job", code="job_not_found")
    job = await deps.admin.retry_job(job_id, actor="admin")
    await deps.terminate(job.instance_id, actor="admin")  # wakes this replica's worker
    return web.json_response({"job": job_public(job)}, status=202)


async def reconcile(request: web.Request) -> web.Response:
    """Run a reconciliation pass now and answer with its report."""
    require_admin(request)
    deps = request.app[DEPS]
    body = await _json_object(request, {"revoke_orphans"})
    revoke = body.get("revoke_orphans")
    if revoke is not None and not isinstance(revoke, bool):
        raise BadRequest("'revoke_orphans' must be true or false", code="invalid_field")
    report = await deps.reconcile(revoke)
    return web.json_response(report.public())


async def list_jobs(request: web.Request) -> web.Response:
    require_admin(request)
    deps = request.app[DEPS]
    jobs = await deps.admin.list_jobs(state=_query(request, "state", {s.value for s in JobState}))
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


async def _readiness(deps: ApiDeps) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        await deps.database.ping()
        checks["store"] = "ok"
    except BrokerError:
        checks["store"] = "unavailable"
    health = await deps.vault.health()
    checks["vault"] = (
        "ok" if health.ready else "sealed" if health.reachable and health.sealed else "unavailable"
    )
    return checks


async def _ledger_counts(deps: ApiDeps) -> StoreCounts | None:
    try:
        return await deps.counts.counts()
    except BrokerError:
        return None  # serve the last values; readiness reports the store


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


async def metrics(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    counts = await request.app[COUNTS].get()
    if counts is not None:
        deps.metrics.observe_store(counts)
    if deps.worker is not None:
        deps.metrics.observe_runtime(
            worker=deps.worker, sources=deps.sources, liveness=deps.liveness_outcomes
        )
    for cache in deps.verifier.caches:
        for outcome, n in cache.stats.outcomes.items():
            deps.metrics.jwks_fetches.labels(issuer=cache.issuer.name, outcome=outcome).set(n)
    return web.Response(
        body=deps.metrics.render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def build_app(deps: ApiDeps) -> web.Application:
    app = web.Application(
        middlewares=[make_middleware(deps.metrics)], client_max_size=deps.max_body_bytes
    )
    app[DEPS] = deps
    app[READINESS] = Cached(lambda: _readiness(deps), ttl=1.0)
    app[COUNTS] = Cached(lambda: _ledger_counts(deps), ttl=5.0)
    r = app.router
    r.add_post("/v1/credentials", create_credential)
    r.add_post("/v1/leases/{lease_id}/renew", renew_lease)
    r.add_delete("/v1/leases/{lease_id}", release_lease)
    r.add_post("/v1/instances/{instance_id}/terminate", terminate_instance)
    r.add_get("/v1/instances/{instance_id}", show_instance)
    r.add_get("/v1/admin/leases", list_leases)
    r.add_get("/v1/admin/jobs", list_jobs)
    r.add_post("/v1/admin/jobs/{job_id}/retry", retry_job)
    r.add_post("/v1/admin/reconcile", reconcile)
    r.add_post("/v1/events/terminate", terminate_event)
    r.add_post("/v1/admin/policy/explain", explain_policy)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi)
    return app


__all__ = ["ApiDeps", "build_app"]

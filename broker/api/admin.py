"""The admin endpoints: an operator's reads, actions, policy questions, audit and locks.
Each handler authenticates the operator for its scope, decodes, calls one service
(``Api.admin``), encodes; ``add_admin_routes`` registers them."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker.api import decode
from broker.api.context import API, AUDIT, AUDIT_EVENTS, operator_of, require_scope
from broker.api.locks import lock_request, valid_lock_id
from broker.api.operators import Scope
from broker.api.queries import MAX_PAGE, encode_cursor, query_params
from broker.api.selection import (
    TERMINATION_FIELDS,
    batch_public,
    radius_public,
    selection_of,
    termination_order,
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
from broker.audit.collected import MAX_BODY, MAX_CHECKPOINTS, NotACheckpoint, collect
from broker.errors import BadRequest, NotFound
from broker.leases import (
    LIVE_LEASE_STATES,
    AuditSelection,
    CheckpointView,
    InstanceState,
    JobState,
    LeaseState,
)

MAX_PREVIEW_ROLES = 32
LEASE_STATES = frozenset(s.value for s in LeaseState)
LEASE_GROUP_BY = frozenset({"role", "engine", "workload", "issuer"})


async def terminate_instance(request: web.Request) -> web.Response:
    operator = await operator_of(request, Scope.REVOKE)
    instance_id = decode.instance_id(request)
    reason, incident = decode.said(await decode.json_object(request, {"reason", "incident"}))
    termination = await request.app[API].admin.actions.terminate(
        instance_id, operator, reason=reason, incident=incident
    )
    # Tombstoned all the same (a stolen token of a dead instance draws nothing), but said
    # plainly: a mistyped id is noticed.
    return web.json_response(
        {
            "instance_id": instance_id,
            "job": job_public(termination.job),
            "never_seen": termination.never_seen,
        },
        status=202,
    )


async def select_instances(request: web.Request) -> web.Response:
    """The blast radius of a selection (``broker.api.selection``); changes nothing."""
    await operator_of(request, Scope.READ)
    body = await decode.json_object(request, {"selection"})
    radius = await request.app[API].admin.actions.selection(selection_of(body.get("selection")))
    return web.json_response(radius_public(radius))


async def terminate_selection(request: web.Request) -> web.Response:
    """The next batch of a selection's bulk termination; the caller follows ``next``."""
    operator = await operator_of(request, Scope.REVOKE)
    order = termination_order(await decode.json_object(request, set(TERMINATION_FIELDS)))
    batch = await request.app[API].admin.actions.terminate_selection(order, operator)
    return web.json_response(batch_public(batch), status=202)


async def show_instance(request: web.Request) -> web.Response:
    await operator_of(request, Scope.READ)
    query_params(request, ())
    reads = request.app[API].admin.reads
    instance, leases, job = await reads.instance(decode.instance_id(request))
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
    if after is not None and not decode.LEASE_ID_PATTERN.match(after):
        raise BadRequest("'after' is not a cursor this broker gave out", code="invalid_query")
    leases = await request.app[API].admin.reads.leases(
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
    lease, live = await request.app[API].admin.reads.lease(decode.lease_id(request), vault=vault)
    return web.json_response({**lease_admin(lease), **({"vault": live} if vault else {})})


async def resolve_lease(request: web.Request) -> web.Response:
    """Mark a lost lease resolved: the operator ended its credential by hand. Idempotent
    (a lease resolved before is answered as it is, ``changed`` false); any other state is
    409 ``lease_not_lost``."""
    operator = await operator_of(request, Scope.REVOKE)
    lease_id = decode.lease_id(request)
    reason, incident = decode.said(await decode.json_object(request, {"reason", "incident"}))
    if reason is None or not reason.strip():
        raise BadRequest(
            "'reason' is required: how the lost lease's credential was ended by hand",
            code="invalid_reason",
        )
    lease, changed = await request.app[API].admin.actions.resolve(
        lease_id, operator, reason=reason, incident=incident
    )
    return web.json_response({"lease": lease_admin(lease), "changed": changed})


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
    reads = request.app[API].admin.reads
    groups = await reads.lease_counts(group_by=group_by, states=states, top=top)
    return web.json_response(lease_groups(groups, states))


async def list_instances(request: web.Request) -> web.Response:
    await operator_of(request, Scope.READ)
    q = query_params(request, {"state", "workload", "issuer", "since", "limit", "after"})
    limit = q.limit()
    rows = await request.app[API].admin.reads.instances(
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
    """Why a token would be granted a role or refused it (``PolicyQuestions.explain``)."""
    await operator_of(request, Scope.READ)
    body = await decode.json_object(request, {"token", "role", "ttl"})
    token, role = body.get("token"), body.get("role")
    if not isinstance(token, str) or not token:
        raise BadRequest(
            "'token' is required: the identity token to explain", code="invalid_token_field"
        )
    if not isinstance(role, str) or not decode.ROLE_PATTERN.match(role):
        raise BadRequest("'role' is required: the name of a credential role", code="invalid_role")
    ttl = decode.ttl(body)
    return web.json_response(await request.app[API].admin.policy.explain(token, role, ttl))


def _preview_roles(body: dict[str, Any]) -> list[str]:
    roles = body.get("roles")
    if (
        not isinstance(roles, list)
        or not 1 <= len(roles) <= MAX_PREVIEW_ROLES
        or not all(isinstance(r, str) and decode.ROLE_PATTERN.match(r) for r in roles)
    ):
        raise BadRequest(
            f"'roles' is required: a list of 1 to {MAX_PREVIEW_ROLES} role names",
            code="invalid_role",
        )
    return roles


async def preview_policy(request: web.Request) -> web.Response:
    """Whether a token carrying these claims would get each role (``PolicyQuestions.preview``)."""
    await operator_of(request, Scope.READ)
    body = await decode.json_object(request, {"issuer", "claims", "roles", "ttl"})
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
    roles, ttl = _preview_roles(body), decode.ttl(body)
    policy = request.app[API].admin.policy
    return web.json_response(await policy.preview(issuer, claims, roles, ttl))


async def retry_job(request: web.Request) -> web.Response:
    operator = await operator_of(request, Scope.ADMIN)
    job_id = request.match_info["job_id"]
    if not decode.JOB_ID_PATTERN.match(job_id):
        raise NotFound("no such revocation job", code="job_not_found")
    reason, incident = decode.said(await decode.json_object(request, {"reason", "incident"}))
    job = await request.app[API].admin.actions.retry(
        job_id, operator, reason=reason, incident=incident
    )
    return web.json_response({"job": job_public(job)}, status=202)


async def reconcile(request: web.Request) -> web.Response:
    """Run a reconciliation pass now and answer with its report."""
    operator = await operator_of(request, Scope.REVOKE)
    body = await decode.json_object(request, {"revoke_orphans", "reason", "incident"})
    revoke = body.get("revoke_orphans")
    if revoke is not None and not isinstance(revoke, bool):
        raise BadRequest("'revoke_orphans' must be true or false", code="invalid_field")
    if revoke:
        await require_scope(request, operator, Scope.ADMIN)
    reason, incident = decode.said(body)
    report = await request.app[API].admin.actions.reconcile(
        revoke, operator, reason=reason, incident=incident
    )
    return web.json_response(report.public())


async def list_jobs(request: web.Request) -> web.Response:
    """Revocation jobs in the order they were requested, a page at a time."""
    await operator_of(request, Scope.READ)
    q = query_params(request, {"state", "instance", "since", "limit", "after"})
    limit = q.limit()
    jobs = await request.app[API].admin.reads.jobs(
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
    "lease",
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
        lease=q.text("lease"),
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
    events = await reader.events(selection, after=after, limit=limit, newest=newest)
    nxt = events[-1].seq if len(events) == limit and not newest else None
    return web.json_response({"events": [audit_event_public(e) for e in events], "next": nxt})


async def verify_audit(request: web.Request) -> web.Response:
    """Recompute the audit chain (from ``from``, or its start) and answer the report;
    ``checkpoints``: lines the operator collected (``broker.audit.collected``), held
    against the chain with the broker's own."""
    await operator_of(request, Scope.READ)
    body = await decode.json_object(request, {"from", "checkpoints"}, max_bytes=MAX_BODY)
    from_seq = body.get("from", 1)
    if isinstance(from_seq, bool) or not isinstance(from_seq, int) or from_seq < 1:
        raise BadRequest("'from' must be a sequence number, 1 or more", code="invalid_field")
    collected = collected_of(body.get("checkpoints", []), from_seq)
    trail = request.app.get(AUDIT)
    if trail is None:
        raise NotFound("this broker does not verify its audit chain", code="not_found")
    report = await trail.verify(from_seq, collected)
    return web.json_response(report.to_dict())


def collected_of(lines: Any, from_seq: int) -> list[CheckpointView]:
    """The request's ``checkpoints`` decoded: at most ``MAX_CHECKPOINTS`` strings, each a
    checkpoint line (``broker.audit.collected.collect``); 400 ``invalid_checkpoints``
    naming the first line that is not one."""
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
        raise BadRequest(
            "'checkpoints' must be a list of checkpoint lines (strings)",
            code="invalid_checkpoints",
        )
    if len(lines) > MAX_CHECKPOINTS:
        raise BadRequest(
            f"at most {MAX_CHECKPOINTS} checkpoint lines in one verification (got "
            f"{len(lines)}): verify a later stretch with 'from'",
            code="invalid_checkpoints",
        )
    try:
        return collect(lines, from_seq=from_seq)
    except NotACheckpoint as exc:
        raise BadRequest(f"checkpoints: {exc}", code="invalid_checkpoints") from None


async def whoami(request: web.Request) -> web.Response:
    """The operator the presented token is: its name, scope and how it authenticated."""
    operator = await operator_of(request, Scope.READ)
    query_params(request, set())
    return web.json_response(
        {"name": operator.name, "scope": operator.scope.label, "via": operator.via}
    )


async def create_lock(request: web.Request) -> web.Response:
    operator = await operator_of(request, Scope.REVOKE)
    body = await decode.json_object(
        request, {"kind", "value", "claim", "ttl", "reason", "incident"}
    )
    try:
        ttl = decode.ttl(body)
        reason, incident = decode.said(body)
    except BadRequest as exc:
        raise BadRequest(exc.message, code="invalid_lock") from None
    lock = await request.app[API].admin.locks.create_lock(
        operator, **lock_request(body), ttl=ttl, reason=reason or "", incident=incident
    )
    return web.json_response({"lock": lock_public(lock)}, status=201)


async def list_locks(request: web.Request) -> web.Response:
    await operator_of(request, Scope.READ)
    everything = query_params(request, {"all"}).text("all", {"true", "false"}) == "true"
    locks = await request.app[API].admin.locks.locks(include_inactive=everything)
    return web.json_response({"locks": [lock_public(x) for x in locks]})


async def remove_lock(request: web.Request) -> web.Response:
    operator = await operator_of(request, Scope.REVOKE)
    lock_id = request.match_info["lock_id"]
    if not valid_lock_id(lock_id):
        raise NotFound("no such lock", code="lock_not_found")
    reason, incident = decode.said(await decode.json_object(request, {"reason", "incident"}))
    lock = await request.app[API].admin.locks.remove_lock(
        lock_id, operator, reason=reason, incident=incident
    )
    return web.json_response({"lock": lock_public(lock)})


def add_admin_routes(r: web.UrlDispatcher) -> None:
    """The admin routes, in the order the router tries them; the caller adds the
    workload's ``/v1/instances/self/terminate`` first, since ``{instance_id}`` would match
    "self"."""
    r.add_post("/v1/admin/audit/verify", verify_audit)
    r.add_post("/v1/instances/{instance_id}/terminate", terminate_instance)
    r.add_get("/v1/instances/{instance_id}", show_instance)
    r.add_get("/v1/admin/leases", list_leases)
    r.add_get("/v1/admin/leases/count", count_leases)  # before {lease_id}
    r.add_get("/v1/admin/leases/{lease_id}", show_lease)
    r.add_post("/v1/admin/leases/{lease_id}/resolve", resolve_lease)
    r.add_get("/v1/admin/instances", list_instances)
    r.add_get("/v1/admin/jobs", list_jobs)
    r.add_post("/v1/admin/jobs/{job_id}/retry", retry_job)
    r.add_post("/v1/admin/reconcile", reconcile)
    r.add_post("/v1/admin/selection", select_instances)
    r.add_post("/v1/admin/terminations", terminate_selection)
    r.add_post("/v1/admin/policy/explain", explain_policy)
    r.add_post("/v1/admin/policy/preview", preview_policy)
    r.add_get("/v1/admin/audit/events", list_audit_events)
    r.add_get("/v1/admin/whoami", whoami)
    r.add_post("/v1/admin/locks", create_lock)
    r.add_get("/v1/admin/locks", list_locks)
    r.add_delete("/v1/admin/locks/{lock_id}", remove_lock)


__all__ = ["add_admin_routes"]

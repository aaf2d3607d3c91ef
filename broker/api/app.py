"""The broker's application: the workload endpoints (a credential, by the broker's own
request or by RFC 8693 token exchange; a lease's renewal and release; an instance ending
itself), the signed event webhook, the operations endpoints, and ``build_app``, which
routes them with the admin endpoints (``broker.api.admin``). Each handler authenticates,
decodes, calls one function, encodes; a workload handler ends with its outcome's log
line (``broker.api.requestlog``)."""

from __future__ import annotations

from aiohttp import web

from broker.api import decode, oauth, requestlog
from broker.api.admin import add_admin_routes
from broker.api.context import (
    API,
    AUDIT,
    AUDIT_EVENTS,
    COUNTS,
    READINESS,
    Api,
    Cached,
    identity_of,
    verified,
)
from broker.api.errors import make_middleware, note_refusal, route_of
from broker.api.metrics import Metrics, Scraper
from broker.api.openapi import openapi_document
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
from broker.api.views import job_public
from broker.clock import iso_z
from broker.errors import BadRequest, BrokerError, NotFound
from broker.events import webhook
from broker.identity import IdentityVerifier
from broker.issuance.service import IssuedCredential
from broker.leases import JobView
from broker.logs import note_request

TOKEN_PATH = "/v1/token"

# -- workload endpoints ------------------------------------------------------------------


async def create_credential(request: web.Request) -> web.Response:
    api = request.app[API]
    identity = await identity_of(request)
    # Other fields are the role's request parameters (a CSR, a public key): the service
    # refuses any the role does not take, once it knows the role is permitted.
    body = await decode.json_object(request, None)
    role = body.pop("role", None)
    if not isinstance(role, str) or not decode.ROLE_PATTERN.match(role):
        raise BadRequest("'role' is required: the name of a credential role", code="invalid_role")
    note_request(role=role)
    ttl = decode.ttl(body)
    body.pop("ttl", None)
    credential = await api.credentials.issue(identity, role, ttl, body)
    _issued(api, credential)
    return web.json_response(
        credential.response(), status=201, headers={"Cache-Control": "no-store"}
    )


async def exchange_token(request: web.Request) -> web.Response:
    """RFC 8693 token exchange (``broker.api.oauth``): the subject token verified as
    ``create_credential`` verifies its bearer token, the credential issued by the same
    service call, counted and logged the same; answers and refusals in OAuth's shapes."""
    api = request.app[API]
    try:
        exchange = oauth.read_request(request.content_type, await request.read())
        identity = await verified(request, exchange.subject_token)
        role = oauth.target(exchange.role)
        note_request(role=role)
        if oauth.needs_kind(exchange.requested_token_type):
            kind = api.credentials.issued_kind(identity, role)
            oauth.check_requested(exchange.requested_token_type, kind)
        try:
            credential = await api.credentials.issue(identity, role, None, {})
        except BadRequest as exc:  # the role needs what a form cannot carry (a CSR)
            note_request(reason=exc.message)  # for the log line, not the caller
            raise oauth.unservable(exc) from None
    except BrokerError as exc:
        answer = oauth.refusal(exc)
        # The middleware's count and log line for a refusal, with the broker's own code.
        note_refusal(api.metrics, route_of(request), answer.status, exc)
        return _oauth_error(answer)
    except web.HTTPRequestEntityTooLarge:  # the body is past client_max_size
        api.metrics.count_refused("payload_too_large")
        requestlog.refused(route_of(request), 413, "payload_too_large")
        return _oauth_error(oauth.too_large())
    _issued(api, credential)
    return web.json_response(oauth.token_response(credential), headers=oauth.NO_STORE)


def _issued(api: Api, credential: IssuedCredential) -> None:
    """The count and log line of an issued credential, whichever door it came through."""
    api.metrics.issued.labels(role=credential.role, kind=credential.kind).inc()
    requestlog.served(
        requestlog.ISSUED,
        lease_id=credential.lease_id,
        kind=credential.kind,
        expires_at=iso_z(credential.expires_at),
    )


def _oauth_error(answer: oauth.OAuthRefusal) -> web.Response:
    return web.json_response(answer.body(), status=answer.status, headers=oauth.NO_STORE)


async def _token_answers_never_cached(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer at ``/v1/token`` is uncacheable (RFC 6749 §5.1), the middleware's too:
    a 405 for another method and a 500 for a failure after a credential was issued."""
    if request.path == TOKEN_PATH:
        response.headers.update(oauth.NO_STORE)


async def renew_lease(request: web.Request) -> web.Response:
    credentials = request.app[API].credentials
    identity = await identity_of(request)
    lease_id = decode.lease_id(request)
    note_request(lease_id=lease_id)
    body = await decode.json_object(request, {"ttl"})
    renewed = await credentials.renew(identity, lease_id, decode.ttl(body))
    requestlog.served(requestlog.RENEWED, expires_at=renewed.get("expires_at"))
    return web.json_response(renewed)


async def release_lease(request: web.Request) -> web.Response:
    credentials = request.app[API].credentials
    identity = await identity_of(request)
    lease_id = decode.lease_id(request)
    note_request(lease_id=lease_id)
    state = await credentials.release(identity, lease_id)
    requestlog.served(requestlog.RELEASED, state=state)  # a lost one is not "released"
    return web.Response(status=204)


async def terminate_self(request: web.Request) -> web.Response:
    """The caller's own instance, named by its token (never by the request), ends."""
    credentials = request.app[API].credentials
    identity = await identity_of(request)
    reason = decode.reason(await decode.json_object(request, {"reason"}))
    job = await credentials.terminate_self(identity, reason)
    requestlog.served(requestlog.SELF_TERMINATED, job_id=job.job_id)
    return web.json_response(
        {"instance_id": identity.instance_id, "job": job_public(job)}, status=202
    )


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


# -- operations --------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks = await request.app[READINESS].get()
    if all(v == "ok" for v in checks.values()):
        return web.json_response({"status": "ready", "checks": checks})
    message = "; ".join(f"{k} {v}" for k, v in checks.items() if v != "ok")
    code = "not_ready"
    if checks.get("vault") == "token_invalid":  # every exchange would get a 502
        code = "vault_token_invalid"
        message += ": Vault no longer accepts the broker's own token (expired or revoked)"
    body = {
        "error": {"code": code, "message": message},
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
    app.on_response_prepare.append(_token_answers_never_cached)
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
    r.add_post("/v1/credentials", create_credential)
    r.add_post(TOKEN_PATH, exchange_token)
    r.add_post("/v1/leases/{lease_id}/renew", renew_lease)
    r.add_delete("/v1/leases/{lease_id}", release_lease)
    # Before the admin route, whose {instance_id} would match "self".
    r.add_post("/v1/instances/self/terminate", terminate_self)
    r.add_post("/v1/events/terminate", terminate_event)
    add_admin_routes(r)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", scrape)
    r.add_get("/openapi.json", openapi)
    return app


__all__ = ["build_app"]

"""Why a role would be granted or refused, without issuing anything. Pure.

``explain`` answers for the identity a verified token produced; ``preview`` for the claims
a token would carry (the injector asks at admission, before the pod and its token exist).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from broker.clock import iso_z
from broker.engines.role import RoleSettings
from broker.errors import BadRequest, NotPermitted, TokenInvalid
from broker.identity.model import Identity
from broker.identity.settings import IssuerSettings
from broker.identity.verify import map_claims
from broker.policy.rules import decide, rules_applying
from broker.policy.settings import Rule
from broker.policy.templates import render_params
from broker.settings import template_fields

# A preview has no token, so its identity has no times; policy reads none.
_NO_TOKEN_TIME = datetime(1970, 1, 1, tzinfo=UTC)


def explain(
    identity: Identity,
    role: str,
    requested_ttl: int | None,
    *,
    roles: Mapping[str, RoleSettings],
    rules: Sequence[Rule],
) -> dict[str, Any]:
    decision = decide(identity, role, requested_ttl, roles=roles, rules=rules)
    out: dict[str, Any] = {
        "role": role,
        "allowed": decision.allowed,
        "rule": decision.rule,
        "reason": decision.reason,
        "ttl": decision.ttl if decision.allowed else None,
        "rules_applying": rules_applying(identity, rules),
        "params": None,
        "code": None if decision.allowed else "role_not_permitted",
    }
    if decision.allowed:
        try:
            # Identity-derived values only (a CN, a session name): never secret.
            out["params"] = render_params(roles[role].params, identity)
        except NotPermitted as exc:
            out.update(allowed=False, ttl=None, reason=exc.message, code=exc.code)
    return out


def decision_refusal(decision: Mapping[str, Any]) -> dict[str, Any] | None:
    """The refusal a policy decision (``explain``) stands for, or None if it grants."""
    if decision["allowed"]:
        return None
    return {"code": decision["code"], "message": decision["reason"]}


def instance_refusal(
    instance_id: str, state: str | None, *, since: datetime | None, by: str | None
) -> dict[str, Any] | None:
    """The refusal an instance's standing stands for: any state but ``active`` is a
    tombstone (``terminating`` included: nothing new is issued from the moment it was
    asked). ``state`` None: the broker never saw the instance, which refuses nothing.
    ``since``: when it was terminated (or asked to be); ``by``: who asked."""
    if state is None or state == "active":
        return None
    return {
        "code": "instance_terminated",
        "message": f"instance {instance_id} is {state}: the broker issues and renews "
        "nothing for it",
        "state": state,
        "since": iso_z(since) if since else None,
        "by": by,
    }


def token_claims(
    issuer: IssuerSettings, claims: Mapping[str, Any], audience: str
) -> dict[str, Any]:
    """``claims`` as a token of ``issuer`` would carry them: ``iss`` and ``aud``, which
    verification requires of every real token (and a rule may match on), filled in from
    the configuration where the caller left them out. A Kubernetes projected token
    carries ``aud`` as a list, as TokenRequest always writes it (and a list matches no
    string condition, for a preview as for the token)."""
    out = dict(claims)
    out.setdefault("iss", issuer.issuer)
    out.setdefault("aud", [audience] if issuer.kind == "kubernetes" else audience)
    return out


def preview_identity(issuer: IssuerSettings, claims: Mapping[str, Any]) -> Identity:
    """The identity a token of ``issuer`` carrying ``claims`` would map to. A missing
    instance claim maps to "" (unknown at admission). Claims the mapping refuses are a
    bad request (``invalid_claims``), saying why."""
    try:
        mapped = map_claims(claims, issuer, instance_optional=True)
    except TokenInvalid as exc:
        raise BadRequest(
            f"the claims do not map to an identity of issuer {issuer.name}: {exc.message}",
            code="invalid_claims",
        ) from None
    return Identity(
        issuer_name=issuer.name,
        issuer=issuer.issuer,
        subject=mapped.subject,
        instance_id=mapped.instance_id,
        workload=mapped.workload,
        issued_at=_NO_TOKEN_TIME,
        expires_at=_NO_TOKEN_TIME,
        claims=MappingProxyType(dict(claims)),
    )


def preview(
    issuer: IssuerSettings,
    claims: Mapping[str, Any],
    wanted: Sequence[str],
    requested_ttl: int | None,
    *,
    roles: Mapping[str, RoleSettings],
    rules: Sequence[Rule],
    audience: str,
) -> dict[str, Any]:
    """Whether a token of ``issuer`` carrying ``claims`` would be granted each role of
    ``wanted`` (in order, repeats answered again). A refused role carries the code
    ``POST /v1/credentials`` would answer with, and a human reason. ``audience`` is the
    broker's (``identity.audience``), for a token whose ``aud`` the caller left out."""
    identity = preview_identity(issuer, token_claims(issuer, claims, audience))
    return {
        "issuer": issuer.name,
        "identity": {
            "subject": identity.subject,
            "workload": identity.workload,
            "instance_id": identity.instance_id,
        },
        "roles": [
            _preview_role(identity, role, requested_ttl, roles=roles, rules=rules)
            for role in wanted
        ],
    }


def _preview_role(
    identity: Identity,
    role: str,
    requested_ttl: int | None,
    *,
    roles: Mapping[str, RoleSettings],
    rules: Sequence[Rule],
) -> dict[str, Any]:
    decision = decide(identity, role, requested_ttl, roles=roles, rules=rules)
    answer: dict[str, Any] = {
        "role": role,
        "granted": decision.allowed,
        "code": None if decision.allowed else "role_not_permitted",
        "reason": decision.reason,
        "rule": decision.rule,
        "ttl": decision.ttl if decision.allowed else None,
    }
    if decision.allowed:
        # Templates over the instance id cannot be judged before the instance exists.
        known = {
            param: template
            for param, template in roles[role].params.items()
            if identity.instance_id or "instance_id" not in template_fields(template)
        }
        try:
            render_params(known, identity)
        except NotPermitted as exc:
            answer.update(granted=False, code=exc.code, reason=exc.message, ttl=None)
    return answer

"""Why a role would be granted or refused to an identity, without issuing anything. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from broker.engines.role import RoleSettings
from broker.errors import NotPermitted
from broker.identity.model import Identity
from broker.policy.rules import decide, rules_applying
from broker.policy.settings import Rule
from broker.policy.templates import render_params


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
    }
    if decision.allowed:
        try:
            # Identity-derived values only (a CN, a session name): never secret.
            out["params"] = render_params(roles[role].params, identity)
        except NotPermitted as exc:
            out.update(allowed=False, ttl=None, reason=exc.message)
    return out

"""Declarative rules: an identity matcher → the roles it may have, with TTL caps.

Deny by default. Rules are tried in order; the first rule that applies to the identity
(issuer and every condition match) *and* allows the role grants it. A refusal explains
which rules applied and that none allowed the role, or that no rule applied at all.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from broker.engines.role import RoleSettings
from broker.identity.model import Identity
from broker.identity.verify import claim_at
from broker.policy.settings import ClaimMatch, Rule


@dataclass(frozen=True)
class Decision:
    allowed: bool
    role: str
    rule: str | None
    reason: str
    ttl: int = 0


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@lru_cache(maxsize=4096)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


class _Values:
    """The text each condition compares, resolved once per decision: a thousand rules on
    the same claim path walk that path once."""

    __slots__ = ("_identity", "_memo")

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self._memo: dict[object, str | None] = {}

    def text(self, cond: ClaimMatch) -> str | None:
        key = cond.identity if cond.identity is not None else cond.claim
        try:
            return self._memo[key]
        except KeyError:
            pass
        if cond.identity is not None:
            value: Any = getattr(self._identity, cond.identity)
        else:
            assert cond.claim is not None
            value = claim_at(self._identity.claims, cond.claim)
        # Absent, a list, an object or a boolean never matches a string condition.
        text = None if isinstance(value, bool) or not isinstance(value, str | int) else str(value)
        self._memo[key] = text
        return text


def _holds(values: _Values, cond: ClaimMatch) -> bool:
    text = values.text(cond)
    if text is None:
        return False
    if cond.exact is not None:
        return text == cond.exact
    if cond.glob is not None:
        return _glob(cond.glob).match(text) is not None
    if cond.regex is not None:
        return _regex(cond.regex).fullmatch(text) is not None
    if cond.one_of is not None:
        return text in cond.one_of
    return False


def _applies(values: _Values, identity: Identity, rule: Rule) -> bool:
    if rule.issuer is not None and rule.issuer != identity.issuer_name:
        return False
    return all(_holds(values, c) for c in rule.match)


def rules_applying(identity: Identity, rules: Sequence[Rule]) -> list[str]:
    """Names of every rule whose issuer and conditions match the identity."""
    values = _Values(identity)
    return [rule.name for rule in rules if _applies(values, identity, rule)]


def decide(
    identity: Identity,
    role: str,
    requested_ttl: int | None,
    *,
    roles: Mapping[str, RoleSettings],
    rules: Sequence[Rule],
) -> Decision:
    spec = roles.get(role)
    if spec is None:
        return Decision(False, role, None, f"role {role!r} does not exist")
    applied = []
    values = _Values(identity)
    for rule in rules:
        if not _applies(values, identity, rule):
            continue
        applied.append(rule.name)
        if role not in rule.allow:
            continue
        cap = spec.max_ttl if rule.max_ttl is None else min(spec.max_ttl, rule.max_ttl)
        wanted = spec.default_ttl if requested_ttl is None else requested_ttl
        ttl = max(1, min(wanted, cap))
        return Decision(
            True,
            role,
            rule.name,
            f"rule {rule.name!r} allows role {role!r} (ttl capped at {cap}s)",
            ttl,
        )
    if applied:
        return Decision(
            False,
            role,
            None,
            f"rules {', '.join(map(repr, applied))} apply to this identity "
            f"but none allows role {role!r}",
        )
    return Decision(False, role, None, "no rule applies to this identity (deny by default)")

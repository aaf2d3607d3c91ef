"""The bulk termination endpoints' request bodies, decoded into values (pure), and their
answers encoded. ``POST /v1/admin/selection`` takes ``{"selection": {...}}``;
``POST /v1/admin/terminations`` adds ``reason``, ``incident``, ``max``, ``after`` (the
cursor the previous batch answered) and ``batch``. A selection's fields:

    instances, workloads, issuers, roles, leases   lists of names or ids
    claims                                         list of "key=value"
    issued_after, issued_before                    RFC 3339 times with a zone

Refused with 400: a malformed one (``invalid_selection``, naming the field), one without
any selector (``empty_selection``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.api.decode import ROLE_PATTERN, printable, said
from broker.errors import BadRequest
from broker.identity.verify import WORKLOAD_PATTERN, valid_instance_id
from broker.leases import BlastRadius, Selection, TerminationBatch
from broker.leases.selection import MAX_SELECTOR_VALUES
from broker.revocation.bulk import DEFAULT_BATCH, MAX_BATCH

SELECTION_FIELDS = frozenset(
    {
        "instances",
        "workloads",
        "issuers",
        "roles",
        "leases",
        "claims",
        "issued_after",
        "issued_before",
    }
)
TERMINATION_FIELDS = frozenset({"selection", "reason", "incident", "max", "after", "batch"})
# A lease id, an issuer name (``IssuerSettings.name``); a role name is the app's.
_ROLE = ROLE_PATTERN
_LEASE = re.compile(r"^l-[0-9a-f]{32}\Z")
_ISSUER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# A claim key as a selector names it: no '"' (it is quoted in a JSON path), no '='.
CLAIM_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/@-]{0,127}\Z")
MAX_CLAIM_VALUE = 255


def _bad(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_selection")


def _names(raw: dict[str, Any], field: str, valid: Any) -> tuple[str, ...]:
    values = raw.get(field)
    if values is None:
        return ()
    if (
        not isinstance(values, list)
        or len(values) > MAX_SELECTOR_VALUES
        or not all(isinstance(v, str) and valid(v) for v in values)
    ):
        raise _bad(f"selection.{field} must be a list of at most {MAX_SELECTOR_VALUES} valid names")
    return tuple(dict.fromkeys(values))


def _claim(text: Any) -> tuple[str, str]:
    if isinstance(text, str):
        key, sep, value = text.partition("=")
        if sep and CLAIM_KEY.match(key) and 0 < len(value) <= MAX_CLAIM_VALUE:
            if printable(value):
                return key, value
    raise _bad(
        "selection.claims must be a list of 'key=value' (a top-level claim recorded at first "
        f"issuance: key of [A-Za-z0-9_.:/@-], value of 1 to {MAX_CLAIM_VALUE} printable chars)"
    )


def _time(raw: dict[str, Any], field: str) -> datetime | None:
    value = raw.get(field)
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        at = datetime.fromisoformat(value)
    except ValueError:
        raise _bad(
            f"selection.{field} must be an RFC 3339 time, e.g. 2026-01-01T12:00:00Z"
        ) from None
    if at.tzinfo is None:
        raise _bad(f"selection.{field} must name its time zone (e.g. a trailing Z)")
    return at


def selection_of(raw: Any) -> Selection:
    """The selection in a request body. Raises ``BadRequest``."""
    if not isinstance(raw, dict):
        raise BadRequest(
            "'selection' is required: an object of selectors (instances, workloads, issuers, "
            "claims, roles, leases, issued_after, issued_before)",
            code="empty_selection" if raw is None else "invalid_selection",
        )
    unknown = set(raw) - SELECTION_FIELDS
    if unknown:
        raise _bad(f"selection has fields the broker does not take: {', '.join(sorted(unknown))}")
    claims = raw.get("claims")
    claims = [] if claims is None else claims  # false, 0 or "" is not an empty list
    if not isinstance(claims, list) or len(claims) > MAX_SELECTOR_VALUES:
        raise _bad(f"selection.claims must be a list of at most {MAX_SELECTOR_VALUES} 'key=value'")
    selection = Selection(
        instances=_names(raw, "instances", valid_instance_id),
        workloads=_names(raw, "workloads", lambda v: bool(WORKLOAD_PATTERN.match(v))),
        issuers=_names(raw, "issuers", lambda v: bool(_ISSUER.match(v))),
        roles=_names(raw, "roles", lambda v: bool(_ROLE.match(v))),
        leases=_names(raw, "leases", lambda v: bool(_LEASE.match(v))),
        claims=tuple(dict.fromkeys(_claim(c) for c in claims)),
        issued_after=_time(raw, "issued_after"),
        issued_before=_time(raw, "issued_before"),
    )
    if selection.empty:
        raise BadRequest(
            "the selection names no selector: give at least one of instances, workloads, "
            "issuers, claims, roles, leases, issued_after, issued_before",
            code="empty_selection",
        )
    return selection


@dataclass(frozen=True)
class TerminationOrder:
    selection: Selection
    reason: str | None
    incident: str | None
    max_instances: int | None
    after: str | None
    batch: int


def _count(body: dict[str, Any], field: str, low: int, high: int | None) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"'{field}' must be an integer {bound}", code="invalid_field")
    return value


def termination_order(body: dict[str, Any]) -> TerminationOrder:
    """The bulk termination a request body asks for. Raises ``BadRequest``."""
    selection = selection_of(body.get("selection"))
    after = body.get("after")
    if after is not None and not (isinstance(after, str) and valid_instance_id(after)):
        raise BadRequest(
            "'after' must be the cursor a previous batch answered", code="invalid_field"
        )
    reason, incident = said(body)  # as every admin action takes them
    return TerminationOrder(
        selection=selection,
        reason=reason,
        incident=incident,
        max_instances=_count(body, "max", 1, None),
        after=after,
        batch=_count(body, "batch", 1, MAX_BATCH) or DEFAULT_BATCH,
    )


def radius_public(radius: BlastRadius) -> dict[str, Any]:
    progress = radius.progress
    return {
        "instances": radius.instances,
        "already_terminated": radius.already_terminated,
        "never_seen": list(radius.never_seen),
        "leases": {
            "live": radius.live_leases,
            "by_role": dict(radius.leases_by_role),
            "by_engine": dict(radius.leases_by_engine),
            "by_kind": dict(radius.leases_by_kind),
        },
        "workloads": {
            "count": radius.workload_count,
            "top": [{"workload": w, "instances": n} for w, n in radius.workloads],
        },
        "issuers": dict(radius.issuers),
        "sample": list(radius.sample),
        "progress": {
            "jobs": dict(progress.jobs),
            "leases": {
                "live": progress.leases_live,
                "ended": progress.leases_ended,
                "lost": progress.leases_lost,
            },
        },
    }


def batch_public(batch: TerminationBatch) -> dict[str, Any]:
    terminated = len(batch.terminated)
    return {
        "terminated": [
            {"instance_id": t.instance_id, "job_id": t.job_id, "leases": t.leases}
            for t in batch.terminated
        ],
        "never_seen": list(batch.never_seen),
        "next": batch.next,
        "counts": {
            "reachable": batch.reachable,
            "terminated": terminated,
            "leases": sum(t.leases for t in batch.terminated),
            "never_seen": len(batch.never_seen),
            # The last batch counts what is left (instances that appeared behind the
            # cursor, failed jobs); others estimate from the count before the batch.
            "remaining": batch.left
            if batch.left is not None
            else max(batch.reachable - terminated, 0),
        },
    }


__all__ = ["TerminationOrder", "batch_public", "radius_public", "selection_of", "termination_order"]

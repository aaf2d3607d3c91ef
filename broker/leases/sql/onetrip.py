"""Issuance's two store steps in one round trip each, on PostgreSQL: the server-side
functions migration 0008 created, called on the ``Database``'s plain asyncpg pool.

Each serves the common case only (see the migration) and raises ``GeneralCase`` having
written nothing otherwise; ``broker.leases.records.IssuanceRecords`` then runs the
general path (``broker.leases.sql.issuance``), whose answers these must equal: same rows,
same audit event, byte for byte (the tests run both paths side by side).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Protocol

from broker.leases.sql.common import event_arguments, iso, pending_event
from broker.leases.states import COUNTED_LEASE_STATES, LeaseState
from broker.leases.views import IssuingRow, LeaseLimit

_BEGIN = "SELECT broker_begin_issue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
_COMPLETE = (
    "SELECT broker_complete_issue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, "
    "$13, $14, $15, $16, $17, $18, $19, $20, $21)"
)
_RECORD_TOKEN = "SELECT broker_record_token($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
_COUNTED = sorted(s.value for s in COUNTED_LEASE_STATES)


class OneTrip(Protocol):
    """One statement, its own transaction (``broker.leases.database.OneTrip``)."""

    async def fetchval(self, query: str, *args: Any) -> Any: ...


def _json(value: dict[str, Any] | None) -> str:
    """As SQLAlchemy's JSON column writes it: None is JSON ``null``, not SQL NULL."""
    return json.dumps(value)


async def begin_issue(
    trip: OneTrip,
    lease_id: str,
    row: IssuingRow,
    *,
    now: datetime,
    token_id: tuple[str, datetime] | None,
    limit: LeaseLimit | None,
    external_ref: dict[str, Any] | None,
    vault_path: str | None,
    claims: dict[str, Any] | None,
) -> None:
    """Write the ``issuing`` row (and the instance's, the token id) or raise
    ``GeneralCase`` having written nothing."""
    await trip.fetchval(
        _BEGIN,
        lease_id,
        row.instance_id,
        row.issuer_name,
        row.workload,
        row.role,
        row.kind,
        token_id[0] if token_id else None,
        token_id[1] if token_id else None,
        limit.max_leases if limit else None,
        _COUNTED,
        _json(external_ref),
        vault_path,
        None if claims is None else json.dumps(claims),  # absent: SQL NULL, as the general path
        now,
    )


async def complete_issue(
    trip: OneTrip,
    lease_id: str,
    row: IssuingRow,
    *,
    now: datetime,
    vault_lease_id: str | None,
    accessor: str,
    renewable: bool,
    issued_at: datetime,
    expires_at: datetime,
    state: LeaseState,
    stale: datetime,
    engine: str | None,
    token_ref: str | None,
    credential_ref: dict[str, str] | None,
) -> bool:
    """Complete the ``issuing`` row of an instance still active, with its ``lease.issued``
    event; True. Raises ``GeneralCase`` having written nothing otherwise (an instance
    terminated meanwhile too: the general path records the credential withheld)."""
    subject: dict[str, Any] = {"issuer": row.issuer_name, "workload": row.workload}
    if token_ref is not None:
        subject["token"] = token_ref
    detail = {
        **subject,
        "role": row.role,
        "kind": row.kind,
        "engine": engine,
        "state": state.value,
        "vault_lease_id": vault_lease_id,
        "credential_ref": credential_ref,
        "renewable": renewable,
        "expires_at": iso(expires_at),
    }
    event = event_arguments(
        pending_event(
            "workload", "lease.issued", instance_id=row.instance_id, lease_id=lease_id, **detail
        ),
        now,
    )
    await trip.fetchval(
        _COMPLETE,
        lease_id,
        row.instance_id,
        row.issuer_name,
        row.workload,
        row.role,
        row.kind,
        state.value,
        vault_lease_id,
        accessor,
        renewable,
        issued_at,
        expires_at,
        stale,
        _json(credential_ref),
        now,
        event["tag"],
        event["at"],
        event["actor"],
        event["action"],
        event["detail"],
        event["unsequenced"],
    )
    return True


async def record_token(
    trip: OneTrip, *, now: datetime, instance_id: str, accessor: str, expires_at: datetime
) -> None:
    """Record an instance token's accessor, with its ``instance.token_created`` event (the
    accessor not named), for an active instance; else ``GeneralCase``, nothing written."""
    event = event_arguments(
        pending_event(
            "broker", "instance.token_created", instance_id=instance_id, expires_at=iso(expires_at)
        ),
        now,
    )
    await trip.fetchval(
        _RECORD_TOKEN,
        instance_id,
        accessor,
        expires_at,
        now,
        event["tag"],
        event["at"],
        event["actor"],
        event["action"],
        event["detail"],
        event["unsequenced"],
    )

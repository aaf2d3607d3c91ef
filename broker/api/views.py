"""How leases, jobs and instances are shown in JSON: to a workload (``*_public``) and to
an admin (``lease_admin``). Timestamps are ISO 8601 in UTC with a ``Z``."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from broker.clock import iso_z
from broker.leases import (
    LIVE_LEASE_STATES,
    AuditEventView,
    InstanceListing,
    InstanceView,
    JobView,
    LeaseGroups,
    LeaseView,
)
from broker.leases.views import LockView

LIVE = frozenset(s.value for s in LIVE_LEASE_STATES)


def _iso(dt: datetime | None) -> str | None:
    return iso_z(dt) if dt else None


def lease_public(lease: LeaseView) -> dict[str, Any]:
    d = asdict(lease)
    for k in ("created_at", "issued_at", "expires_at", "ended_at"):
        d[k] = _iso(d[k])
    # Vault's lease id and the token accessor are operator data, not secrets, but
    # callers don't need them; admins see them through the admin API.
    d.pop("vault_lease_id")
    d.pop("token_accessor")
    d.pop("external_ref")
    d.pop("vault_path")
    d.pop("credential_ref")
    d.pop("revoke_sent_at")
    for k in ("resolved_at", "resolved_by", "resolved_reason", "resolved_incident"):
        d.pop(k)  # an operator's marker on a lost lease: the admin API's
    return d


def lease_admin(lease: LeaseView) -> dict[str, Any]:
    d = lease_public(lease)
    d["vault_lease_id"] = lease.vault_lease_id
    if lease.external_ref is not None:
        d["external_ref"] = lease.external_ref
    # What an operator needs to end a ``lost`` credential by hand: where Vault issued it
    # and its non-secret identifier.
    d["vault_path"] = lease.vault_path
    d["credential_ref"] = lease.credential_ref
    d["revoke_sent_at"] = _iso(lease.revoke_sent_at)
    d["resolution"] = resolution_public(lease)
    return d


def resolution_public(lease: LeaseView) -> dict[str, Any] | None:
    """Who marked a lost lease resolved, when, why and for which incident; None when no
    one did."""
    if lease.resolved_at is None:
        return None
    return {
        "at": iso_z(lease.resolved_at),
        "by": lease.resolved_by,
        "reason": lease.resolved_reason,
        "incident": lease.resolved_incident,
    }


def job_public(job: JobView) -> dict[str, Any]:
    d = asdict(job)
    for k in ("next_attempt_at", "created_at", "completed_at"):
        d[k] = _iso(d[k])
    return d


def instance_public(instance: InstanceView) -> dict[str, Any]:
    d = asdict(instance)
    d["created_at"] = _iso(instance.created_at)
    d["terminated_at"] = _iso(instance.terminated_at)
    return d


def instance_listing(row: InstanceListing) -> dict[str, Any]:
    """An instance in a listing, with its leases counted by state and how many are live."""
    return {
        **instance_public(row.instance),
        "leases": dict(sorted(row.leases.items())),
        "live_leases": sum(n for s, n in row.leases.items() if s in LIVE),
    }


def lease_groups(groups: LeaseGroups, states: list[str]) -> dict[str, Any]:
    shown = sum(n for _, n in groups.groups)
    return {
        "group_by": groups.group_by,
        "states": states,
        "groups": [{"key": key, "count": n} for key, n in groups.groups],
        "total": groups.total,
        "group_count": groups.group_count,
        # Leases in the groups a ``top`` cut off (0 when every group is shown).
        "others": groups.total - shown,
    }


def audit_event_public(event: AuditEventView) -> dict[str, Any]:
    """An audit event as the chain hashed it (``broker.leases.chain.event_document``), with
    its links: an exported line can be re-hashed by anyone."""
    d = asdict(event)
    d.pop("row_id")  # the store's insertion order: not part of the event
    d["at"] = iso_z(event.at)
    return d


def lock_public(lock: LockView) -> dict[str, Any]:
    d = asdict(lock)
    for k in ("created_at", "expires_at", "removed_at"):
        d[k] = _iso(d[k])
    return d

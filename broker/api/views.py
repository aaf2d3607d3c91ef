"""How leases, jobs and instances are shown in JSON: to a workload (``*_public``) and to
an admin (``lease_admin``). Timestamps are ISO 8601 in UTC with a ``Z``."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from broker.clock import iso_z
from broker.leases import InstanceView, JobView, LeaseView
from broker.leases.views import LockView


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
    return d


def lease_admin(lease: LeaseView) -> dict[str, Any]:
    d = lease_public(lease)
    d["vault_lease_id"] = lease.vault_lease_id
    if lease.external_ref is not None:
        d["external_ref"] = lease.external_ref
    return d


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


def lock_public(lock: LockView) -> dict[str, Any]:
    d = asdict(lock)
    for k in ("created_at", "expires_at", "removed_at"):
        d[k] = _iso(d[k])
    return d

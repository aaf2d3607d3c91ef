"""A selection of instances, as an operator names them for a bulk termination
(``brokerctl revoke`` selectors), and what the store answers about one: its blast radius
and one batch of its termination. Pure values; the SQL is ``broker.leases.sql.selection``.

How selectors combine: the same selector repeated is OR (``--workload a --workload b``),
different selectors are AND (``--workload a --role db``). Claims are grouped by key: the
same key repeated is OR, different keys are AND. Instance-level selectors (instance ids,
workload, issuer, claim) look at the instance; lease-level ones (role, the issued window,
lease ids) select an active instance when it holds a *live* lease matching all of them
(and an instance already terminating or terminated when it held such a lease, so that the
progress of a running revocation stays visible). A lease's "issued" time is when it was
requested (its row's ``created_at``): an ``issuing`` lease has no other.

A claim selector ``k=v`` matches an instance whose recorded claim ``k`` (claims recorded at
first issuance, ``broker.identity.recorded``) is the string ``v``, or a list of strings
holding ``v``. Only active instances are terminated; explicit instance ids the broker has
never seen are reported as such (and a termination tombstones them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from broker.clock import iso_z

# Values one selector may list (each becomes a bound parameter of one IN list).
MAX_SELECTOR_VALUES = 1000


@dataclass(frozen=True)
class Selection:
    instances: tuple[str, ...] = ()
    workloads: tuple[str, ...] = ()
    issuers: tuple[str, ...] = ()
    claims: tuple[tuple[str, str], ...] = ()
    roles: tuple[str, ...] = ()
    leases: tuple[str, ...] = ()
    issued_after: datetime | None = None
    issued_before: datetime | None = None

    @property
    def empty(self) -> bool:
        return not (
            self.instances or self.workloads or self.issuers or self.claims or self.lease_level
        )

    @property
    def lease_level(self) -> bool:
        """Whether any selector looks at the instance's leases."""
        return bool(
            self.roles
            or self.leases
            or self.issued_after is not None
            or self.issued_before is not None
        )

    def claims_by_key(self) -> dict[str, tuple[str, ...]]:
        """The claim selectors grouped by key (OR within a key, AND across keys)."""
        grouped: dict[str, list[str]] = {}
        for key, value in self.claims:
            values = grouped.setdefault(key, [])
            if value not in values:
                values.append(value)
        return {key: tuple(values) for key, values in sorted(grouped.items())}

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("instances", "workloads", "issuers", "roles", "leases"):
            if getattr(self, name):
                out[name] = list(getattr(self, name))
        if self.claims:
            out["claims"] = [f"{k}={v}" for k, v in self.claims]
        if self.issued_after is not None:
            out["issued_after"] = iso_z(self.issued_after)
        if self.issued_before is not None:
            out["issued_before"] = iso_z(self.issued_before)
        return out


@dataclass(frozen=True)
class Progress:
    """How far the revocation of a selection's instances is: their jobs by state, and
    their leases still live against those ended since the job was requested."""

    jobs: Mapping[str, int] = field(default_factory=dict)
    leases_live: int = 0
    leases_ended: int = 0
    leases_lost: int = 0  # of the ended: Vault had forgotten them (``lost``)


@dataclass(frozen=True)
class BlastRadius:
    """What terminating a selection would reach, read from aggregates (no instance list
    beyond ``sample``)."""

    instances: int  # active instances selected: what a termination would end
    already_terminated: int  # selected instances terminating or terminated
    live_leases: int
    leases_by_role: Mapping[str, int]
    leases_by_kind: Mapping[str, int]
    workloads: tuple[tuple[str | None, int], ...]  # the top ones, most instances first
    workload_count: int
    issuers: Mapping[str, int]
    never_seen: tuple[str, ...]
    sample: tuple[str, ...]
    progress: Progress
    # Filled by the service, which knows each role's engine (the store knows roles).
    leases_by_engine: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Terminated:
    instance_id: str
    job_id: str
    leases: int  # live when its job was recorded


@dataclass(frozen=True)
class TerminationBatch:
    """One batch of a bulk termination: the instances whose jobs it recorded (or whose
    failed job it queued again), the explicit ids the broker never saw (tombstoned; reported
    on the first batch), and the cursor of the next batch (None: this was the last).

    ``left``, on the last batch only: what the selection still holds untouched after it,
    its active instances (one that appeared behind the cursor while the batches ran) and
    its failed jobs. Not zero: start again from no cursor (``brokerctl revoke`` does, a
    bounded number of passes)."""

    terminated: tuple[Terminated, ...]
    never_seen: tuple[str, ...]
    next: str | None
    reachable: int  # active instances selected before this batch (never-seen ids included)
    left: int | None = None

"""Every ledger on one database, built together: the broker hands each consumer only
its own."""

from __future__ import annotations

from dataclasses import dataclass

from broker.clock import Clock
from broker.leases.admin_records import AdminRecords, SelectionRecords
from broker.leases.audit_records import AuditRecords, ChainRecords
from broker.leases.database import Database
from broker.leases.ending_records import EndingRecords
from broker.leases.records import (
    IssuanceRecords,
    ReconcileRecords,
    ReplayRecords,
    SightingRecords,
)
from broker.leases.termination_records import RevocationJobRecords, TerminationRecords


@dataclass(frozen=True)
class Ledgers:
    """Every ledger on one database: the broker hands each consumer only its own."""

    database: Database
    issuance: IssuanceRecords
    termination: TerminationRecords
    jobs: RevocationJobRecords
    reconcile: ReconcileRecords
    replay: ReplayRecords
    sightings: SightingRecords
    admin: AdminRecords
    audit: AuditRecords
    chain: ChainRecords
    selection: SelectionRecords
    ending: EndingRecords

    @classmethod
    def on(cls, database: Database, clock: Clock, *, token_key: bytes | None = None) -> Ledgers:
        return cls(
            database=database,
            issuance=IssuanceRecords(database, clock, token_key),
            termination=TerminationRecords(database, clock),
            jobs=RevocationJobRecords(database, clock),
            reconcile=ReconcileRecords(database, clock),
            replay=ReplayRecords(database, clock),
            sightings=SightingRecords(database),
            admin=AdminRecords(database, clock),
            audit=AuditRecords(database),
            chain=ChainRecords(database),
            selection=SelectionRecords(database, clock),
            ending=EndingRecords(database, clock),
        )


__all__ = ["Ledgers"]

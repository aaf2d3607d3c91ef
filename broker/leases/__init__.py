"""What the broker remembers: instances, instance-token accessors, leases, revocation
jobs and the audit log. Never a token or a credential value.

``Database`` owns the connection pool and transactions; each consumer gets its own ledger
(``IssuanceRecords``, ``RevocationJobRecords``...) and the value types below. Consumers
import from here, not from the modules inside."""

from broker.leases.admin_records import AdminRecords, SelectionRecords
from broker.leases.audit_records import AuditRecords, ChainRecords
from broker.leases.database import Database
from broker.leases.ledgers import Ledgers
from broker.leases.records import (
    IssuanceRecords,
    ReconcileRecords,
    ReplayRecords,
    SightingRecords,
)
from broker.leases.selection import (
    BlastRadius,
    Progress,
    Selection,
    Terminated,
    TerminationBatch,
)
from broker.leases.states import LIVE_LEASE_STATES, InstanceState, JobState, LeaseState
from broker.leases.termination_records import RevocationJobRecords, TerminationRecords
from broker.leases.views import (
    AuditEventView,
    AuditSelection,
    CheckpointView,
    InstanceListing,
    InstanceView,
    IssueTicket,
    IssuingRow,
    JobView,
    LeaseGroups,
    LeaseLimit,
    LeasesStillLive,
    LeaseView,
    LockView,
    RevocationWork,
    StoreCounts,
    Termination,
    TokenView,
    new_id,
)

__all__ = [
    "AdminRecords",
    "AuditEventView",
    "AuditRecords",
    "AuditSelection",
    "ChainRecords",
    "CheckpointView",
    "Database",
    "InstanceState",
    "InstanceListing",
    "InstanceView",
    "IssuanceRecords",
    "IssueTicket",
    "IssuingRow",
    "JobState",
    "JobView",
    "LeaseGroups",
    "LeaseLimit",
    "Ledgers",
    "LeaseState",
    "LeaseView",
    "LIVE_LEASE_STATES",
    "LeasesStillLive",
    "LockView",
    "ReconcileRecords",
    "ReplayRecords",
    "RevocationJobRecords",
    "RevocationWork",
    "BlastRadius",
    "Progress",
    "Selection",
    "SelectionRecords",
    "Terminated",
    "Termination",
    "TerminationBatch",
    "SightingRecords",
    "StoreCounts",
    "TerminationRecords",
    "TokenView",
    "new_id",
]

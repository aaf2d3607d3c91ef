"""What a request's outcome leaves behind: a pure table, the I/O done by the service.

``obtain`` (token, Vault, the cloud exchange, the TTL fit) ends in one of three values:
``Obtained``, ``Refused`` (Vault or the cloud said no for sure: nothing was issued) or
``Unknown`` (a call may have been acted on: a timeout, a dropped connection). A credential
obtained and then not handed out is ``Withheld``, with the step that withheld it. For each,
``settle`` decides what the ``issuing`` row becomes, whether the Vault lease just obtained
is taken back, and whether the identity token's ``jti`` is given back (only when nothing
was issued: then the workload may retry with the token it has).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from broker.aws import StsSession
from broker.errors import BrokerError
from broker.leases.states import LeaseState


@dataclass(frozen=True)
class Obtained:
    accessor: str  # of the instance token the credential was read with
    answer: Mapping[str, Any]  # Vault's answer: credential values, never printed
    vault_lease_id: str | None
    duration: int  # of the Vault lease, after fitting it to the grant
    renewable: bool
    session: StsSession | None = None  # what the cloud exchange gave, if there was one

    def __repr__(self) -> str:
        return f"Obtained(vault_lease_id={self.vault_lease_id!r}, answer=***)"


@dataclass(frozen=True)
class Refused:
    error: BrokerError


@dataclass(frozen=True)
class Unknown:
    error: BrokerError


class Step(Enum):
    """Where a credential that was obtained stopped on its way to the caller."""

    FIT = "fit"  # the lease could not be set to the granted TTL
    SHAPE = "shape"  # the answer is not one the broker can hand out
    RECORD = "record"  # the ledger could not complete the row
    TERMINATED = "terminated"  # completed, but the instance was terminated meanwhile
    LOCKED = "locked"  # not completed: a lock that matches appeared meanwhile


@dataclass(frozen=True)
class Withheld:
    error: BrokerError
    step: Step
    vault_lease_id: str | None
    outcome_unknown: bool = False  # the failed call may have been acted on


Outcome = Obtained | Refused | Unknown | Withheld


class Record(Enum):
    """What becomes of the ``issuing`` row."""

    # Completed, and tracked until termination by its Vault lease or by what termination
    # denies at a cloud.
    ACTIVE = LeaseState.ACTIVE.value
    # Completed, with nothing to revoke (a kv read, an SSH certificate).
    DELIVERED = LeaseState.DELIVERED.value
    # Nothing issued is live: the row is closed with the error's code.
    FAILED = "failed"
    # Nothing is written: the row stays ``issuing``, possibly live, for termination and the
    # reconciler to settle; or it is already completed, for its instance's revocation job.
    KEEP = "keep"


@dataclass(frozen=True)
class Settlement:
    record: Record
    code: str = ""  # the failed row's error code
    take_back: bool = False  # revoke the Vault lease just obtained
    release_jti: bool = False  # give the identity token's id back

    @property
    def hands_out(self) -> bool:
        return self.record in (Record.ACTIVE, Record.DELIVERED)

    def after_take_back(self, taken_back: bool) -> Record:
        """The record once the take-back is done: a lease Vault may still hold keeps its
        row ``issuing``, for the recorded instance token and the reconciler to cover."""
        if self.take_back and not taken_back and self.record is Record.FAILED:
            return Record.KEEP
        return self.record


def settle(outcome: Outcome, *, lease_expected: bool, external: bool) -> Settlement:
    """``lease_expected``: the plan said Vault's answer carries a lease; ``external``: the
    row names what termination denies at a cloud (an STS session)."""
    if isinstance(outcome, Obtained):
        if outcome.vault_lease_id is None and lease_expected and outcome.session is None:
            # Nothing the broker could revoke: refused rather than handed out untracked.
            return Settlement(Record.FAILED, code="vault_no_lease")
        tracked = outcome.vault_lease_id is not None or external
        return Settlement(Record.ACTIVE if tracked else Record.DELIVERED)
    if isinstance(outcome, Refused):
        return Settlement(Record.FAILED, code=outcome.error.code, release_jti=True)
    if isinstance(outcome, Unknown):
        return Settlement(Record.KEEP)
    # Withheld: whatever it has of a Vault lease is taken back, and the jti is kept (the
    # token was used). The row fails only when nothing can be live; after RECORD the
    # ledger did not answer, after TERMINATED the row is recorded.
    take_back = outcome.vault_lease_id is not None
    fails = not outcome.outcome_unknown and (
        outcome.step is Step.FIT
        # A cloud session cannot be taken back: its row waits for termination's deny.
        or (outcome.step in (Step.SHAPE, Step.LOCKED) and not external)
    )
    if fails:
        return Settlement(Record.FAILED, code=outcome.error.code, take_back=take_back)
    return Settlement(Record.KEEP, take_back=take_back)

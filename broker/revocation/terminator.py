"""The one way an instance is terminated: every termination source (the admin API and
CLI, the signed webhook, SQS, the pod watch, the reconciler, issuance's liveness check)
calls ``Terminator``, which satisfies ``broker.events.Terminate``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from broker.leases import JobState, JobView, Termination


class TerminationLedger(Protocol):
    """The tombstone with its revocation job, in one transaction; whether the instance was
    ever seen, read in it."""

    async def request_termination(
        self,
        instance_id: str,
        *,
        actor: str,
        issuer: str | None = None,
        workload: str | None = None,
        token_id: tuple[str, datetime] | None = None,
        reason: str | None = None,
        incident: str | None = None,
        self_terminated: bool = False,
    ) -> Termination: ...


class Forgets(Protocol):
    """This replica's cache of instance tokens."""

    def forget(self, instance_id: str) -> None: ...


class Terminator:
    """The durable job first, so that a crash after it loses nothing; then this replica
    forgets the instance's token (no more issuing under it here) and, if the job is still
    to do, wakes the revocation tick instead of waiting for its next interval."""

    def __init__(
        self, ledger: TerminationLedger, tokens: Forgets, wake_revocation: Callable[[], None]
    ) -> None:
        self._ledger = ledger
        self._tokens = tokens
        self._wake_revocation = wake_revocation

    async def __call__(self, instance_id: str, **said: Any) -> JobView:
        """``broker.events.Terminate``: the job (``request``'s arguments)."""
        return (await self.request(instance_id, **said)).job

    async def request(
        self,
        instance_id: str,
        *,
        actor: str,
        issuer: str | None = None,
        workload: str | None = None,
        token_id: tuple[str, datetime] | None = None,
        reason: str | None = None,
        incident: str | None = None,
        self_terminated: bool = False,
    ) -> Termination:
        """The same, answered with whether the broker never saw the instance (an operator's
        mistyped id is noticed)."""
        termination = await self._ledger.request_termination(
            instance_id,
            actor=actor,
            issuer=issuer,
            workload=workload,
            token_id=token_id,
            reason=reason,
            incident=incident,
            self_terminated=self_terminated,
        )
        self._tokens.forget(instance_id)
        if termination.job.state in (JobState.PENDING, JobState.RUNNING):
            self._wake_revocation()
        return termination

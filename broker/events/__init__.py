"""Termination sources: everything that tells the broker an instance is gone.

The admin API and CLI, the signed event webhook (``webhook``), EC2 state-change events from
an SQS queue (``sqs``) and the Kubernetes pod watch (``pod_watch``) each turn
what they hear into the same call, ``Terminate``: one durable, idempotent revocation job
per instance, created in the transaction that tombstones it. A source acknowledges an event
(deletes the SQS message, advances its watch position) only after that call returned.

A long-running source has ``run(stop)`` and ``run_once()``; ``broker.app`` runs them
under its supervisor, restarted with backoff if they die, counts what they handled by
outcome (``counts``) for the metrics, and closes each on the way out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Protocol

from broker.leases import JobView


class Terminate(Protocol):
    """Tombstone an instance and queue its revocation job; returns the job (an existing one
    if the instance was already terminating). ``issuer`` names the issuer whose instances
    the source speaks for: an instance another issuer owns is refused with
    ``NotPermitted`` (code ``instance_issuer_mismatch``) and left untouched. An instance
    ending itself also names its ``workload`` (another workload's instance is refused with
    ``instance_workload_mismatch``) and, where its issuer's replay rule applies, its
    token's ``token_id`` (jti, expiry), used once in the same transaction
    (``token_replayed``); a ``reason`` and an ``incident`` reference are kept on the job
    and in the audit event, which says ``self_terminated`` as the caller does. Raises
    ``StoreUnavailable`` when the job could not be recorded: the event must not be
    acknowledged then."""

    async def __call__(
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
    ) -> JobView: ...


class TerminationSource(Protocol):
    name: str

    async def run(self, stop: asyncio.Event) -> None: ...

    def counts(self) -> Mapping[str, int]: ...

    async def close(self) -> None: ...


__all__ = ["Terminate", "TerminationSource"]

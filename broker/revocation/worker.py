"""The revocation worker: claims jobs from its ledger and makes Vault forget an instance.

For one instance, in this order (see DESIGN: revoking a token only *queues* its leases):
0. look up the recorded leases no revocation of ours covered yet: one Vault does not know
   is not taken for revoked (``broker.leases.ending``: expired, confirmed dead by a direct
   check, else ``lost``);
1. revoke every recorded live lease explicitly, synchronously, 16 at a time: each chunk
   gets ``revoke_sent_at`` (committed) right before its revocations are sent, so that a
   retry takes Vault's silence about them for our own revocation, never for a loss; a
   revocation that certainly did not take effect (Vault refused it, the connection was
   refused) takes its stamp back; Vault refusing one lease does not stop the others, Vault
   away ends the pass before the next chunk is stamped;
2. revoke every recorded instance token by accessor, the catch-all for a lease the broker
   never managed to record; the leases it covers that carry no stamp (the still issuing
   ones, one whose own revocation was refused) are stamped right before, and unstamped
   when it certainly did not take effect; a token Vault no longer knows counts as
   revoked (retrying cannot change that) but covered nothing;
3. confirm with Vault that each lease is gone (one LIST of a path that holds many of the
   job's leases, else ``sys/leases/lookup`` per lease), and only then mark it ``revoked``;
4. a lease still ``issuing`` is waited for (its request is in flight) up to a bound, then
   marked ``abandoned``: its token is revoked, so Vault holds nothing usable for it;
5. leases that stand for STS sessions (``external_ref``), which no one can revoke, are
   denied in IAM once no request of the instance is in flight any more (so the deny's
   time comes after every session's issue time), abandoned ones included; each is
   marked ``revoked`` only once IAM shows the deny in place;
6. mark the job done and the instance terminated.

Every step is idempotent, so a worker that dies anywhere leaves a job that the next claim
(after ``claim_timeout_s``) finishes. Failures retry with exponential backoff and jitter;
after ``max_attempts`` the job is ``failed``: visible, counted, retried when asked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Protocol

from broker.aws import SessionRef
from broker.backoff import retry_delay
from broker.clock import Clock
from broker.errors import BrokerError, RevocationWaiting, UpstreamRejected, UpstreamUnavailable
from broker.leases import JobView, LeaseState, LeaseView, RevocationWork, TokenView
from broker.leases.ending import LeaseEnder, Revoked, Stamp, sent_for_certain_not
from broker.revocation.bounded import VAULT_CONCURRENCY, Bounded
from broker.revocation.settings import RevocationSettings
from broker.vault import VaultClient

log = logging.getLogger(__name__)
# From this many of a job's leases under one Vault path, one LIST confirms them all.
LIST_CONFIRM_MIN = 16
# A session that expired this long ago (by the broker's clock, against AWS's stamp) needs
# no deny: AWS refuses it already.
EXPIRED_MARGIN = timedelta(minutes=5)


class SessionRevoker(Protocol):
    """Stands in for revoking STS sessions: a deny in IAM, confirmed before returning."""

    async def deny_sessions(self, ref: SessionRef, *, issued_before: datetime) -> None: ...


class RevocationJobs(Protocol):
    """What the worker reads and writes of the lease ledgers (``RevocationJobRecords``)."""

    async def claim_jobs(
        self, *, worker: str, limit: int, claim_for: timedelta
    ) -> list[JobView]: ...

    async def extend_claim(self, job: JobView, *, worker: str, claim_for: timedelta) -> bool: ...

    async def finish_job(self, job: JobView, *, worker: str) -> bool: ...

    async def reschedule_job(
        self,
        job: JobView,
        *,
        worker: str,
        error: str,
        next_attempt_at: datetime,
        give_up: bool,
        count_attempt: bool = True,
    ) -> None: ...

    async def revocation_work(self, instance_id: str) -> RevocationWork: ...

    async def mark_token_revoked(self, accessor: str) -> None: ...

    async def mark_leases_ended(
        self, lease_ids: Sequence[str], state: LeaseState, *, actor: str
    ) -> int: ...

    async def superseded_leases(
        self, *, older_than: timedelta, limit: int = 200
    ) -> list[LeaseView]: ...

    def exclusive(self, key: str, *, timeout_s: int = 30) -> AbstractAsyncContextManager[None]: ...


class RevocationWorker:
    def __init__(
        self,
        settings: RevocationSettings,
        ledger: RevocationJobs,
        vault: VaultClient,
        clock: Clock,
        *,
        on_terminated: Callable[[str], None] | None = None,
        worker_id: str | None = None,
        jitter: Callable[[], float] = random.random,
        cloud: SessionRevoker | None = None,
        ender: LeaseEnder,
    ) -> None:
        self._settings = settings
        self._ender = ender
        self._ledger = ledger
        self._vault = vault
        self._clock = clock
        self._cloud = cloud
        self._on_terminated = on_terminated
        self._jitter = jitter
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        # How the audit names what this worker does: ``revocation`` first, so an operator
        # finds every revocation with ``audit list --actor revocation``.
        self.actor = f"revocation:{self.worker_id}"
        self._bounded = Bounded()
        self._completed = 0
        self._retried = 0
        self._failed = 0

    def counts(self) -> dict[str, int]:
        """Job passes of this worker since start, by outcome, for the metrics."""
        return {"completed": self._completed, "retried": self._retried, "failed": self._failed}

    async def run_once(self) -> int:
        """Claim and process one batch of due jobs. Returns how many were claimed."""
        jobs = await self._ledger.claim_jobs(
            worker=self.worker_id,
            limit=self._settings.batch,
            claim_for=timedelta(seconds=self._settings.claim_timeout_s),
        )
        if jobs:
            await asyncio.gather(*(self._process(job) for job in jobs))
        return len(jobs)

    async def _process(self, job: JobView) -> None:
        holding = asyncio.create_task(self._hold_claim(job))
        try:
            await self._process_claimed(job)
        finally:
            holding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holding

    async def _hold_claim(self, job: JobView) -> None:
        """Extend the claim while the job runs (Vault may be slow or away for longer than
        ``claim_timeout_s``), so no other replica takes over a job whose worker is alive.
        A worker that dies stops extending, and its claim lapses as before."""
        claim_for = timedelta(seconds=self._settings.claim_timeout_s)
        while True:
            await asyncio.sleep(self._settings.claim_timeout_s / 3)
            try:
                if not await self._ledger.extend_claim(
                    job, worker=self.worker_id, claim_for=claim_for
                ):
                    log.warning("lost the claim on a revocation job", extra={"job_id": job.job_id})
                    return
            except BrokerError:
                continue  # the store is away: the claim may lapse; the guards still hold

    async def _process_claimed(self, job: JobView) -> None:
        try:
            await self._revoke_instance(job)
        except BrokerError as exc:
            await self._retry(job, exc)
            return
        except Exception as exc:  # noqa: BLE001 — a job never dies silently
            log.exception("revocation job crashed", extra={"job_id": job.job_id})
            await self._retry(job, exc)
            return
        try:
            finished = await self._ledger.finish_job(job, worker=self.worker_id)
        except BrokerError as exc:
            await self._retry(job, exc)
            return
        if not finished:
            log.warning(
                "a revocation job was taken over before this worker finished it",
                extra={"job_id": job.job_id, "instance_id": job.instance_id},
            )
            return
        self._completed += 1
        if self._on_terminated is not None:
            self._on_terminated(job.instance_id)
        log.info(
            "instance terminated",
            extra={
                "instance_id": job.instance_id,
                "job_id": job.job_id,
                "attempts": job.attempts,
            },
        )

    async def _retry(self, job: JobView, exc: Exception) -> None:
        code = exc.code if isinstance(exc, BrokerError) else type(exc).__name__
        waiting = isinstance(exc, RevocationWaiting)
        give_up = not waiting and job.attempts >= self._settings.max_attempts
        if waiting:
            delay = min(self._settings.tick_s * 2, 5.0)
        else:
            delay = retry_delay(
                job.attempts,
                base=self._settings.backoff_base_s,
                cap=self._settings.backoff_max_s,
                jitter=self._jitter(),
            )
        next_at = self._clock.now() + timedelta(seconds=delay)
        try:
            await self._ledger.reschedule_job(
                job,
                worker=self.worker_id,
                error=code,
                next_attempt_at=next_at,
                give_up=give_up,
                count_attempt=not waiting,
            )
        except BrokerError:
            # The store is down too: the claim lapses and the job is picked up again.
            log.warning("could not reschedule revocation job", extra={"job_id": job.job_id})
            return
        if give_up:
            self._failed += 1
            log.error(
                "revocation job failed",
                extra={
                    "job_id": job.job_id,
                    "instance_id": job.instance_id,
                    "error": code,
                    "attempts": job.attempts,
                },
            )
        elif not waiting:
            self._retried += 1
            log.warning(
                "revocation job will retry",
                extra={"job_id": job.job_id, "error": code, "delay_s": round(delay, 2)},
            )

    async def sweep_superseded(self) -> int:
        """Finish leases left ``revoking`` by a request that died before it revoked them
        (replaced under a role's lease limit). Returns how many were confirmed gone (a
        lease Vault had forgotten is recorded ``lost`` or ``expired``, not counted)."""
        leases = await self._ledger.superseded_leases(
            older_than=timedelta(seconds=self._settings.issuing_timeout_s)
        )
        recorded = [lease for lease in leases if lease.vault_lease_id]

        async def one(lease: LeaseView) -> object:
            return await self._ender.end_one(
                lease, actor="lease_limit", found_by="lease_limit", ours=LeaseState.REVOKED
            )

        results = await asyncio.gather(
            *(self._bounded(one, lease) for lease in recorded), return_exceptions=True
        )
        gone = [
            lease.lease_id
            for lease, ok in zip(recorded, results, strict=True)
            if isinstance(ok, Revoked)
        ]
        for lease, ok in zip(recorded, results, strict=True):
            if ok is None or isinstance(ok, BaseException):
                log.warning(
                    "a replaced lease is still not revoked",
                    extra={
                        "lease_id": lease.lease_id,
                        "error": ok.code
                        if isinstance(ok, BrokerError)
                        else type(ok).__name__
                        if isinstance(ok, BaseException)
                        else "still_in_vault",
                    },
                )
        return await self._ledger.mark_leases_ended(gone, LeaseState.REVOKED, actor="lease_limit")

    async def _each(
        self, call: Callable[[str], Awaitable[bool]], vault_lease_ids: list[str]
    ) -> list[bool | BrokerError]:
        """``call`` on each Vault lease id, bounded. Vault refusing one
        lease is that lease's outcome, and the others go on; Vault away ends the pass at
        once, and the calls not yet answered are cancelled, not left running behind a retry."""

        async def one(lease_id: str) -> bool | BrokerError:
            try:
                return await self._bounded(call, lease_id)
            except UpstreamUnavailable:
                raise
            except BrokerError as exc:
                return exc

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(lease_id)) for lease_id in vault_lease_ids]
        except* UpstreamUnavailable as away:
            raise away.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _revoke(self, vault_lease_id: str) -> bool:
        await self._vault.revoke_lease(vault_lease_id)  # sync: done when it returns
        return True

    async def _revoke_leases(self, recorded: list[LeaseView]) -> list[bool | BrokerError]:
        """Step 1, one bounded chunk at a time: the chunk's leases are stamped
        (``revoke_sent_at``) right before their revocations are sent, and a lease whose
        revocation certainly did not take effect (Vault refused it, or the connection was
        refused) has its stamp taken back. Vault away ends the pass after its chunk: the
        leases of later chunks were never stamped, so a retry still looks them up first."""
        outcomes: list[bool | BrokerError] = []
        for start in range(0, len(recorded), VAULT_CONCURRENCY):
            chunk = recorded[start : start + VAULT_CONCURRENCY]
            stamp = await self._ender.stamp(
                [lease.lease_id for lease in chunk if lease.revoke_sent_at is None]
            )
            answers = await asyncio.gather(
                *(self._bounded(self._revoke, str(lease.vault_lease_id)) for lease in chunk),
                return_exceptions=True,
            )
            await self._ender.unstamp(
                stamp,
                [
                    lease.lease_id
                    for lease, answer in zip(chunk, answers, strict=True)
                    if sent_for_certain_not(answer)
                ],
            )
            for answer in answers:
                if isinstance(answer, UpstreamUnavailable) or (
                    isinstance(answer, BaseException) and not isinstance(answer, BrokerError)
                ):
                    raise answer  # Vault away (or a crash): the pass ends after this chunk
                # Vault refusing one lease is that lease's outcome; the others go on.
                outcomes.append(answer if isinstance(answer, BrokerError) else True)
        return outcomes

    async def _revoke_tokens(
        self,
        tokens: Sequence[TokenView],
        recorded: list[LeaseView],
        issuing: list[LeaseView],
        first: list[bool | BrokerError],
    ) -> None:
        """Step 2: the instance's tokens by accessor. The leases their revocation may
        cover and no stamp covers yet (one whose own revocation certainly failed, the
        ones still issuing) are stamped right before; the stamp is taken back when no
        token revocation took effect for them (Vault refused it, the connection was
        refused, or Vault no longer knew the token)."""
        live = [token for token in tokens if token.revoked_at is None]
        if not live:
            return
        unstamped = [
            lease
            for lease, outcome in zip(recorded, first, strict=True)
            if lease.revoke_sent_at is None and isinstance(outcome, BrokerError)
        ]
        stamp = await self._ender.stamp(
            [lease.lease_id for lease in (*unstamped, *issuing) if lease.revoke_sent_at is None]
        )
        revoked_any = any(token.revoked_at is not None for token in tokens)
        for token in live:
            try:
                known = await self._vault.revoke_accessor(token.accessor)
            except BrokerError as exc:
                if sent_for_certain_not(exc):
                    await self._unstamp_token(stamp, token.accessor, revoked_any, unstamped)
                raise
            if known:
                revoked_any = True
            else:
                # Vault no longer knows the token: nothing it held is revoked by this
                # call, and retrying cannot change that; its leases are looked at alone.
                log.warning(
                    "Vault no longer knew an instance token; its leases are checked one by one",
                    extra={"token_accessor": token.accessor},
                )
                await self._unstamp_token(stamp, token.accessor, revoked_any, unstamped)
            await self._ledger.mark_token_revoked(token.accessor)

    async def _unstamp_token(
        self, stamp: Stamp, accessor: str, revoked_any: bool, leases: list[LeaseView]
    ) -> None:
        """Take back the stamp made for a token revocation that did not take effect: all of
        it while no token revocation of this instance took effect yet, else only on the
        leases issued under that very token (an issuing lease names no token yet: another
        token's revocation may cover it, and it keeps the stamp)."""
        if not revoked_any:
            await self._ender.unstamp(stamp)
            return
        await self._ender.unstamp(
            stamp, [lease.lease_id for lease in leases if lease.token_accessor == accessor]
        )

    async def _still_held(
        self, vault_lease_ids: list[str], *, confirm_absent: bool = False
    ) -> set[str]:
        """The leases Vault still holds, by its own word. Many leases under one path are
        checked with one LIST of that path (an instance with 1,000 leases costs Vault one
        listing, not 1,000 lookups); a few, or a path that cannot be listed, one lookup
        each. A lease Vault will not answer for counts as held. ``confirm_absent``: a lease
        the LIST lacks is looked up too before it counts as gone (a listing is no proof
        that Vault forgot a lease nobody revoked)."""
        by_path: dict[str, list[str]] = {}
        for lease_id in vault_lease_ids:
            by_path.setdefault(lease_id.rsplit("/", 1)[0], []).append(lease_id)
        held: set[str] = set()
        lookups: list[str] = []
        for path, ids in by_path.items():
            if len(ids) < LIST_CONFIRM_MIN:
                lookups.extend(ids)
                continue
            try:
                listed = {f"{path}/{key}" for key in await self._vault.list_lease_keys(path)}
            except UpstreamRejected:
                lookups.extend(ids)  # not listable (policy, path): ask one by one
                continue
            held.update(i for i in ids if i in listed)
            if confirm_absent:
                lookups.extend(i for i in ids if i not in listed)
        answers = await self._each(self._vault.lease_exists, lookups)
        held.update(i for i, exists in zip(lookups, answers, strict=True) if exists is not False)
        return held

    async def _revoke_instance(self, job: JobView) -> None:
        work = await self._ledger.revocation_work(job.instance_id)
        recorded = [lease for lease in work.leases if lease.vault_lease_id]
        issuing = [lease for lease in work.leases if lease.state == LeaseState.ISSUING]
        # Live STS sessions with no Vault lease: only a deny at AWS ends them.
        sessions = [
            lease
            for lease in work.leases
            if not lease.vault_lease_id and lease.state != LeaseState.ISSUING
        ]

        # Every revocation this worker sends is preceded by its stamp (a token's included:
        # it stamps the leases it covers), and migration 0006 stamped what older code had
        # sent: a lease without a stamp was covered by no revocation of ours. (A token
        # recorded revoked is no proof: Vault may not have known it any more.)
        recorded = await self._settle_forgotten(recorded)
        first = await self._revoke_leases(recorded)
        await self._revoke_tokens(work.tokens, recorded, issuing, first)
        # Then Vault's word on each: a lease it no longer holds is gone (the token's
        # revocation may also have taken one whose own revocation was refused).
        held = await self._still_held([str(lease.vault_lease_id) for lease in recorded])
        gone = [lease for lease in recorded if lease.vault_lease_id not in held]
        # A lease that is also an STS session (Vault's revoke of it is a no-op at AWS) waits
        # for its deny before it counts as revoked.
        await self._ledger.mark_leases_ended(
            [lease.lease_id for lease in gone if lease.external_ref is None],
            LeaseState.REVOKED,
            actor=self.actor,
        )
        if len(gone) != len(recorded):
            # Why, when Vault said: its refusal of a lease still live.
            for lease, outcome in zip(recorded, first, strict=True):
                if lease.vault_lease_id in held and isinstance(outcome, BrokerError):
                    raise outcome
            raise UpstreamRejected(
                f"{len(recorded) - len(gone)} lease(s) still exist in Vault after revocation",
                code="revocation_unconfirmed",
            )

        if issuing:
            self._wait_for_issuing(issuing)
        external = [lease for lease in (*gone, *sessions, *issuing) if lease.external_ref]
        if external:
            await self._deny_sessions(external)
        if issuing:
            await self._settle_issuing(issuing)

    async def _settle_forgotten(self, recorded: list[LeaseView]) -> list[LeaseView]:
        """Step 0: the recorded leases Vault still knows, or that a revocation of ours
        already covers (stamped); those no revocation covered and Vault does not know are
        settled (expired, confirmed dead, else lost) and left out. An STS session's lease
        is left to its deny in IAM, whatever Vault knows."""
        fresh = [
            lease
            for lease in recorded
            if lease.revoke_sent_at is None and lease.external_ref is None
        ]
        if not fresh:
            return recorded
        known = await self._still_held(
            [str(lease.vault_lease_id) for lease in fresh], confirm_absent=True
        )
        forgotten = [lease for lease in fresh if lease.vault_lease_id not in known]
        if not forgotten:
            return recorded
        await self._ender.settle_unknown(forgotten, actor=self.actor, found_by="revocation")
        settled = {lease.lease_id for lease in forgotten}
        return [lease for lease in recorded if lease.lease_id not in settled]

    def _wait_for_issuing(self, issuing: list[LeaseView]) -> None:
        bound = timedelta(seconds=self._settings.issuing_timeout_s)
        now = self._clock.now()
        young = [lease for lease in issuing if now - lease.created_at < bound]
        if young:
            # A request is between writing its row and recording Vault's answer; once it
            # records, the lease is revoked on the next pass.
            raise RevocationWaiting(f"{len(young)} lease(s) still being issued")

    async def _deny_sessions(self, leases: list[LeaseView]) -> None:
        """Deny in IAM the STS sessions these leases stand for, then mark the live ones
        ``revoked``. Runs only when no request of the instance is in flight, so every
        session was issued before now. A session known to have expired is left alone."""
        now = self._clock.now()
        by_ref: dict[SessionRef, list[LeaseView]] = {}
        for lease in leases:
            assert lease.external_ref is not None
            try:
                ref = SessionRef.from_record(lease.external_ref)
            except ValueError:
                raise UpstreamRejected(
                    f"lease {lease.lease_id} names an external reference this broker cannot act on",
                    code="external_ref_unknown",
                ) from None
            by_ref.setdefault(ref, []).append(lease)
        for ref, group in by_ref.items():
            expired = all(
                lease.state != LeaseState.ISSUING
                and lease.expires_at is not None
                and lease.expires_at + EXPIRED_MARGIN < now
                for lease in group
            )
            if expired:
                continue
            if self._cloud is None:
                raise UpstreamRejected(
                    "leases of this instance are STS sessions, and the broker has no aws "
                    "section to deny them with",
                    code="cloud_not_configured",
                )
            async with self._ledger.exclusive(f"aws-deny:{ref.role_arn}"):
                await self._cloud.deny_sessions(ref, issued_before=now)
        await self._ledger.mark_leases_ended(
            [lease.lease_id for lease in leases if lease.state != LeaseState.ISSUING],
            LeaseState.REVOKED,
            actor=self.actor,
        )

    async def _settle_issuing(self, issuing: list[LeaseView]) -> None:
        self._wait_for_issuing(issuing)
        moved = await self._ledger.mark_leases_ended(
            [lease.lease_id for lease in issuing], LeaseState.ABANDONED, actor=self.actor
        )
        if moved != len(issuing):
            # Some completed meanwhile and are active now: revoke them on the next pass.
            raise RevocationWaiting(
                f"{len(issuing) - moved} lease(s) completed while being settled"
            )

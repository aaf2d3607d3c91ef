"""The reconciler: makes the lease ledger and Vault agree, on a schedule and on demand.

One pass, four steps, each on its own (one failing does not skip the others):

1. **expiry**: leases the ledger still counts live past their expiry are looked up in Vault
   (``sys/leases/lookup``); gone → ``expired`` (``lost`` when a direct check finds the
   credential still valid: Vault forgot the lease, ``broker.revocation.amnesia``); renewed
   meanwhile → the ledger's expiry is corrected; still there past expiry → revoked now,
   and reported if Vault keeps it.
2. **stuck issuing**: an ``issuing`` row older than ``issuing_timeout_s`` belongs to a
   request that died (or gave up) between asking Vault and recording the answer. The
   lease Vault may have issued for it is under the row's Vault path, unknown to the ledger,
   was issued in the request's window, and is older than the issuing bound: each such lease
   is revoked and confirmed gone, and the row is settled ``abandoned``. Why that takes
   nothing from a workload: the broker hands out only what it recorded, and a request may
   record its lease only while its row is younger than the issuing bound
   (``IssuanceRecords.complete_issue``), so a lease older than the bound that no row holds
   can never be handed out. The Vault roles the broker's roles name must be the broker's
   own: a lease someone else read from them in that window is revoked too. (Termination
   covers the same lease through the instance token as well.)
3. **orphans**: the leases under the broker's Vault paths (those its roles issue from, and
   every path a lease row names) that no live row holds, older than the issuing bound,
   are reported, and revoked when ``revoke_orphans`` is set. Leases under those paths
   that Vault itself marked *irrevocable* (its own revocation retries ran out) are
   reported too: only an operator can deal with them. Recorded live leases the listing
   lacks are looked up, and the ones Vault forgot settled (``broker.revocation.amnesia``).
4. **unseen**: for issuers with ``liveness.unseen_grace``, active instances that neither
   exchanged nor renewed for that long are terminated.

The decisions are pure functions below; ``Reconciler`` does the I/O. Replicas take a
try-lock in the store, so one pass runs at a time across them (a second replica skips).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol
from urllib.parse import unquote

from broker.clock import Clock
from broker.engines import ENGINES
from broker.engines.role import RoleSettings
from broker.errors import BrokerError, UpstreamRejected
from broker.events import Terminate
from broker.identity.settings import IssuerSettings
from broker.leases import LeaseState, LeaseView
from broker.leases.ending import LeaseEnder
from broker.leases.states import LIVE_LEASE_STATES
from broker.revocation.amnesia import Amnesia, AmnesiaLedger, Found
from broker.revocation.bounded import Bounded
from broker.revocation.settings import ReconcileSettings, RevocationSettings
from broker.vault import VaultClient
from broker.vault.client import LeaseInfo

log = logging.getLogger(__name__)
SAMPLE = 50  # ids listed in a report; the counts are complete
# Unrecorded leases looked up under one path per pass at most; past it the path is
# reported (``reconcile_too_many``) and nothing under it is settled from a partial view.
MAX_LOOKUPS = 20_000
_LIVE = frozenset(s.value for s in LIVE_LEASE_STATES)


# -- pure decisions ------------------------------------------------------------------


ExpiryAction = Literal["expired", "extend", "revoke"]


def expiry_action(info: LeaseInfo | None, now: datetime) -> ExpiryAction:
    """What to do with a lease past its expiry in the ledger, given Vault's lookup."""
    if info is None:
        return "expired"  # Vault does not know it: gone
    if info.expire_time is not None and info.expire_time > now:
        return "extend"  # renewed meanwhile: the ledger was behind
    return "revoke"  # past expiry and still held: Vault's own expiry has not taken it


def issue_window(
    created_at: datetime, issuing_timeout_s: int, skew_s: int
) -> tuple[datetime, datetime]:
    """When Vault may have issued the lease of a request whose row was written at
    ``created_at``: after the row (the request asks Vault only then), before the issuing
    bound (a request gives up at half of it; Vault may still act a little later), give or
    take the skew between the broker's clock and Vault's."""
    skew = timedelta(seconds=skew_s)
    return created_at - skew, created_at + timedelta(seconds=issuing_timeout_s) + skew


def match_stuck(
    rows: Sequence[LeaseView],
    unknown: Sequence[LeaseInfo],
    *,
    issuing_timeout_s: int,
    skew_s: int,
) -> dict[str, list[str]]:
    """For each stuck row (all under one Vault path), the unrecorded leases issued within
    its window. A lease inside two rows' windows is listed for both: it is revoked once,
    and either row may be the one it was issued for."""
    out: dict[str, list[str]] = {}
    for row in rows:
        start, end = issue_window(row.created_at, issuing_timeout_s, skew_s)
        out[row.lease_id] = sorted(
            info.lease_id
            for info in unknown
            if info.issue_time is not None and start <= info.issue_time <= end
        )
    return out


def is_orphan(info: LeaseInfo, *, now: datetime, min_age_s: int) -> bool:
    """An unrecorded lease old enough that no request in flight can still record it."""
    if info.issue_time is None:
        return True  # Vault gives no time: nothing in flight can claim it either
    return info.issue_time < now - timedelta(seconds=min_age_s)


def unheld(vault_lease_ids: Iterable[str], states: Mapping[str, str]) -> list[str]:
    """Vault leases that no live lease row holds (never recorded, or recorded as ended)."""
    return [v for v in vault_lease_ids if states.get(v) not in _LIVE]


def under_prefixes(lease_ids: Iterable[str], prefixes: Iterable[str]) -> list[str]:
    """The lease ids that live under one of the prefixes (a whole path level, not a
    string prefix: ``db/creds/app`` does not cover ``db/creds/app2/…``)."""
    roots = tuple(p.rstrip("/") + "/" for p in prefixes)
    return sorted(i for i in lease_ids if i.startswith(roots))


def role_lease_prefixes(
    roles: Mapping[str, RoleSettings], verbs_by_mount: Mapping[str, Sequence[str]]
) -> set[str]:
    """The Vault paths the roles issue leases from: ``<mount>/<verb>/<vault_role>``, for
    each verb (``creds``, ``issue``, ``sign``, …) Vault lists under the role's mount."""
    out = set()
    for role in roles.values():
        if not _leased(role):
            continue
        for verb in verbs_by_mount.get(role.mount, ()):
            out.add(f"{role.mount}/{verb}/{role.vault_role}")
    return out


def _leased(role: RoleSettings) -> bool:
    engine = ENGINES.get(role.engine)
    return engine is not None and engine.mode(role).leased


# -- the report ----------------------------------------------------------------------


@dataclass
class ReconcileReport:
    started_at: datetime
    skipped: bool = False  # another replica was reconciling
    expired: int = 0
    expiry_corrected: int = 0
    past_expiry_held: list[str] = field(default_factory=list)  # lease ids Vault keeps
    stuck_settled: int = 0
    stuck_revoked_in_vault: int = 0
    stuck_waiting: list[str] = field(default_factory=list)  # lease ids left as they are
    orphans: int = 0
    orphans_revoked: int = 0
    orphan_sample: list[str] = field(default_factory=list)  # Vault lease ids
    irrevocable: list[str] = field(default_factory=list)  # Vault lease ids Vault gave up on
    unseen_terminated: list[str] = field(default_factory=list)  # instance ids
    # Leases Vault had forgotten before their expiry and before any revocation of ours
    # (``lost``): their credentials may still work; an operator ends them by hand.
    lost: list[str] = field(default_factory=list)  # lease ids
    errors: dict[str, str] = field(default_factory=dict)  # step → error code

    def found_nothing(self) -> bool:
        """Nothing for an operator: every figure zero, every sample empty, no error."""
        return not any(v for k, v in vars(self).items() if k not in ("started_at", "skipped"))

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["started_at"] = self.started_at.isoformat().replace("+00:00", "Z")
        for key in (
            "past_expiry_held",
            "stuck_waiting",
            "orphan_sample",
            "unseen_terminated",
            "irrevocable",
            "lost",
        ):
            d[key] = d[key][:SAMPLE]
        return d


# -- the I/O shell -------------------------------------------------------------------


class ReconcileLedger(AmnesiaLedger, Protocol):
    """What a reconcile pass reads and writes of the lease ledgers (``ReconcileRecords``)."""

    def try_exclusive(self, key: str) -> AbstractAsyncContextManager[bool]: ...

    async def past_expiry(self, *, before: datetime, limit: int) -> list[LeaseView]: ...

    async def correct_expiry(self, lease_id: str, expires_at: datetime) -> None: ...

    async def mark_leases_ended(
        self, lease_ids: Sequence[str], state: LeaseState, *, actor: str
    ) -> int: ...

    async def stuck_issuing(
        self, *, created_before: datetime, limit: int
    ) -> list[tuple[LeaseView, str]]: ...

    async def settle_stuck(self, lease_id: str, *, revoked: Sequence[str], actor: str) -> bool: ...

    async def vault_lease_states(self, vault_lease_ids: Sequence[str]) -> dict[str, str]: ...

    async def vault_paths(self) -> set[str]: ...

    async def record_audit(self, actor: str, action: str, **detail: Any) -> None: ...

    async def unseen_instances(
        self, issuer_name: str, *, seen_before: datetime, limit: int
    ) -> list[str]: ...


class Reconciler:
    def __init__(
        self,
        settings: ReconcileSettings,
        revocation: RevocationSettings,
        *,
        roles: Mapping[str, RoleSettings],
        issuers: Sequence[IssuerSettings],
        ledger: ReconcileLedger,
        vault: VaultClient,
        clock: Clock,
        terminate: Terminate,
        ender: LeaseEnder,
    ) -> None:
        self._settings = settings
        self._ender = ender
        self._issuing_timeout_s = revocation.issuing_timeout_s
        self._roles = roles
        self._issuers = issuers
        self._ledger = ledger
        self._vault = vault
        self._clock = clock
        self._terminate = terminate
        self._bounded = Bounded()
        self._amnesia = Amnesia(
            ledger,
            vault,
            clock,
            ender,
            self._bounded,
            engine_of={name: role.engine for name, role in roles.items()},
            batch=settings.batch,
            clock_skew_s=settings.clock_skew_s,
        )
        self._running = asyncio.Lock()
        self._pass_prefixes: set[str] | None = None  # the broker's paths, once per pass
        self.last: ReconcileReport | None = None

    async def run_once(self, *, revoke_orphans: bool | None = None) -> ReconcileReport:
        """One pass. ``revoke_orphans`` overrides the setting for this pass."""
        revoke = self._settings.revoke_orphans if revoke_orphans is None else revoke_orphans
        report = ReconcileReport(started_at=self._clock.now())
        async with self._running, self._ledger.try_exclusive("reconcile") as mine:
            if not mine:
                report.skipped = True
                return report
            self._pass_prefixes = None
            for name, step in (
                ("expiry", self._expiry),
                ("stuck_issuing", self._stuck),
                ("orphans", lambda r: self._orphans(r, revoke)),
                ("irrevocable", self._irrevocable),
                ("unseen", self._unseen),
            ):
                try:
                    await step(report)
                except BrokerError as exc:
                    report.errors[name] = exc.code
                    log.warning("reconcile step failed", extra={"step": name, "error": exc.code})
                except Exception as exc:  # noqa: BLE001 — one step never stops the others
                    report.errors[name] = type(exc).__name__
                    log.exception("reconcile step crashed", extra={"step": name})
        self.last = report
        # A healthy pass is silent above debug; one that found something says so at info.
        log.log(
            logging.DEBUG if report.found_nothing() else logging.INFO,
            "reconcile pass",
            extra={
                "expired": report.expired,
                "stuck_settled": report.stuck_settled,
                "orphans": report.orphans,
                "orphans_revoked": report.orphans_revoked,
                "unseen_terminated": len(report.unseen_terminated),
                "errors": ",".join(sorted(report.errors)) or None,
            },
        )
        return report

    async def _lookup_all(self, lease_ids: Sequence[str]) -> list[LeaseInfo | None]:
        return list(
            await asyncio.gather(*(self._bounded(self._vault.lookup_lease, i) for i in lease_ids))
        )

    # -- 1. expiry ---------------------------------------------------------------------

    async def _expiry(self, report: ReconcileReport) -> None:
        now = self._clock.now()
        rows = await self._ledger.past_expiry(
            before=now - timedelta(seconds=self._settings.expiry_margin_s),
            limit=self._settings.batch,
        )
        # No Vault lease (an STS session): the cloud ends it at its expiry by itself.
        expired = [r.lease_id for r in rows if r.vault_lease_id is None]
        leased = [r for r in rows if r.vault_lease_id is not None]
        infos = await self._lookup_all([r.vault_lease_id for r in leased])  # type: ignore[misc]
        to_revoke = []
        unknown = []
        for row, info in zip(leased, infos, strict=True):
            action = expiry_action(info, now)
            if action == "expired":
                unknown.append(row)  # Vault does not know it: expired, unless (below)
            elif action == "extend":
                assert info is not None and info.expire_time is not None
                await self._ledger.correct_expiry(row.lease_id, info.expire_time)
                report.expiry_corrected += 1
            else:
                to_revoke.append(row)
        gone = await asyncio.gather(
            *(self._bounded(self._vault.revoke_confirmed, r.vault_lease_id) for r in to_revoke),
            return_exceptions=True,
        )
        for row, ok in zip(to_revoke, gone, strict=True):
            if ok is True:
                expired.append(row.lease_id)
            else:
                report.past_expiry_held.append(row.lease_id)
                log.warning(
                    "a lease past its expiry is still held by Vault",
                    extra={"lease_id": row.lease_id, "role": row.role},
                )
        # A revocation of ours covers it: as the decision says; else expired, unless a
        # direct check finds its credential still valid (Vault forgot it: lost).
        found, gone_by_expiry = await self._amnesia.past_expiry(unknown)
        self._add(report, found)
        report.expired += await self._ledger.mark_leases_ended(
            [*expired, *gone_by_expiry], LeaseState.EXPIRED, actor="reconciler"
        )

    # -- 2. stuck issuing --------------------------------------------------------------

    async def _stuck(self, report: ReconcileReport) -> None:
        now = self._clock.now()
        stuck = await self._ledger.stuck_issuing(
            created_before=now - timedelta(seconds=self._issuing_timeout_s),
            limit=self._settings.batch,
        )
        by_path: dict[str, list[LeaseView]] = {}
        for row, _instance_state in stuck:
            if row.external_ref is not None:
                # An STS session may exist with no Vault lease to revoke: only the deny
                # on termination ends it, so the row stays visible until then.
                report.stuck_waiting.append(row.lease_id)
                continue
            path = row.vault_path or self._role_path_hint(row.role)
            if path is None:
                report.stuck_waiting.append(row.lease_id)
                continue
            by_path.setdefault(path, []).append(row)
        for path, rows in by_path.items():
            try:
                await self._settle_path(report, path, rows, now)
            except BrokerError as exc:  # one path's trouble does not hold up the others
                report.errors["stuck_issuing"] = exc.code
                report.stuck_waiting.extend(row.lease_id for row in rows)
                log.warning(
                    "could not settle stuck rows under a path",
                    extra={"vault_path": path, "error": exc.code},
                )

    async def _settle_path(
        self, report: ReconcileReport, path: str, rows: list[LeaseView], now: datetime
    ) -> None:
        # Judged only from leases older than the bound (a younger one may belong to a
        # request still allowed to record it), so a row waits until its whole window is.
        min_age = self._issuing_timeout_s + self._settings.clock_skew_s
        judged_before = now - timedelta(seconds=min_age)
        ready = []
        for row in rows:
            _, window_end = issue_window(
                row.created_at, self._issuing_timeout_s, self._settings.clock_skew_s
            )
            if window_end <= judged_before:
                ready.append(row)
            else:
                report.stuck_waiting.append(row.lease_id)
        if not ready:
            return
        unknown = [
            info
            for info in await self._unrecorded_under(path)
            if is_orphan(info, now=now, min_age_s=min_age)
        ]
        matches = match_stuck(
            ready,
            unknown,
            issuing_timeout_s=self._issuing_timeout_s,
            skew_s=self._settings.clock_skew_s,
        )
        candidates = sorted({v for ids in matches.values() for v in ids})
        results = await asyncio.gather(
            *(self._bounded(self._vault.revoke_confirmed, v) for v in candidates),
            return_exceptions=True,
        )
        confirmed = {v for v, ok in zip(candidates, results, strict=True) if ok is True}
        report.stuck_revoked_in_vault += len(confirmed)
        for row in ready:
            mine = matches[row.lease_id]
            if any(v not in confirmed for v in mine):
                report.stuck_waiting.append(row.lease_id)  # a revocation failed: next pass
                continue
            if await self._ledger.settle_stuck(row.lease_id, revoked=mine, actor="reconciler"):
                report.stuck_settled += 1

    def _role_path_hint(self, role_name: str) -> str | None:
        """For a row written before rows named their path: the role's, if unambiguous."""
        role = self._roles.get(role_name)
        if role is None:
            return None
        engine = ENGINES.get(role.engine)
        if engine is None or role.params:
            return None  # templated per identity: no single path
        try:
            return engine.request(role, {}, {}, role.default_ttl).path
        except Exception:  # noqa: BLE001 — a hint only
            return None

    async def _unrecorded_under(
        self, prefix: str, *, missing: ReconcileReport | None = None
    ) -> list[LeaseInfo]:
        """The leases under ``prefix`` (a Vault path as a row stores it, escaped) that no
        live row holds, with their times. Raises ``UpstreamRejected`` (code
        ``reconcile_too_many``) rather than judge from part of them. With ``missing`` (the
        orphans step's report), recorded leases the listing lacks are settled too."""
        path = "/".join(unquote(seg) for seg in prefix.strip("/").split("/"))
        keys = await self._vault.list_lease_keys(path)
        ids = [f"{path}/{k}" for k in keys if not k.endswith("/")]
        if missing is not None:
            self._add(missing, await self._amnesia.missing(path, set(ids)))
        states = await self._ledger.vault_lease_states(ids)
        unrecorded = unheld(ids, states)
        if len(unrecorded) > MAX_LOOKUPS:
            raise UpstreamRejected(
                f"{len(unrecorded)} unrecorded leases under {path}; revoke the orphans "
                "(brokerctl reconcile --revoke-orphans) or check who else uses this path",
                code="reconcile_too_many",
            )
        infos = await self._lookup_all(unrecorded)
        return [i for i in infos if i is not None]

    # -- 3. orphans --------------------------------------------------------------------

    async def _prefixes(self) -> set[str]:
        """The broker's Vault paths: its roles' and every path a lease row names. Listed
        once per pass (the orphan and irrevocable steps both need them)."""
        if self._pass_prefixes is not None:
            return self._pass_prefixes
        verbs: dict[str, list[str]] = {}
        for mount in sorted({r.mount for r in self._roles.values() if _leased(r)}):
            keys = await self._vault.list_lease_keys(mount)
            verbs[mount] = [k.rstrip("/") for k in keys if k.endswith("/")]
        self._pass_prefixes = role_lease_prefixes(self._roles, verbs) | (
            await self._ledger.vault_paths()
        )
        return self._pass_prefixes

    @staticmethod
    def _add(report: ReconcileReport, found: Found) -> None:
        report.lost.extend(found.lost)
        report.expired += found.expired

    async def _orphans(self, report: ReconcileReport, revoke: bool) -> None:
        now = self._clock.now()
        prefixes = await self._prefixes()
        min_age = self._issuing_timeout_s + self._settings.clock_skew_s
        orphans: list[str] = []
        for prefix in sorted(prefixes):
            try:
                unrecorded = await self._unrecorded_under(prefix, missing=report)
            except BrokerError as exc:  # one path's trouble does not hide the others
                report.errors["orphans"] = exc.code
                log.warning(
                    "could not look for orphans under a path",
                    extra={"vault_path": prefix, "error": exc.code},
                )
                continue
            orphans.extend(
                info.lease_id for info in unrecorded if is_orphan(info, now=now, min_age_s=min_age)
            )
        report.orphans = len(orphans)
        report.orphan_sample = orphans[:SAMPLE]
        if orphans:
            log.warning(
                "leases in Vault that the store does not hold",
                extra={"count": len(orphans), "revoke": revoke},
            )
        if revoke and orphans:
            results = await asyncio.gather(
                *(self._bounded(self._vault.revoke_confirmed, v) for v in orphans),
                return_exceptions=True,
            )
            report.orphans_revoked = sum(1 for ok in results if ok is True)
        if orphans:
            await self._ledger.record_audit(
                "reconciler",
                "reconcile.orphans",
                count=len(orphans),
                revoked=report.orphans_revoked,
                vault_lease_ids=orphans[:SAMPLE],
            )

    async def _irrevocable(self, report: ReconcileReport) -> None:
        mine = under_prefixes(await self._vault.irrevocable_leases(), await self._prefixes())
        report.irrevocable = mine
        if mine:
            log.error(
                "Vault gave up revoking leases under the broker's paths",
                extra={"count": len(mine)},
            )

    # -- 4. unseen instances -----------------------------------------------------------

    async def _unseen(self, report: ReconcileReport) -> None:
        now = self._clock.now()
        for issuer in self._issuers:
            grace = issuer.liveness.unseen_grace
            if not grace:
                continue
            ids = await self._ledger.unseen_instances(
                issuer.name,
                seen_before=now - timedelta(seconds=grace),
                limit=self._settings.batch,
            )
            for instance_id in ids:
                await self._terminate(instance_id, actor="liveness:unseen", issuer=issuer.name)
                report.unseen_terminated.append(instance_id)

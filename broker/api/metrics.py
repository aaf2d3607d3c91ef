"""Prometheus metrics, in a registry owned by the app (no global state)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker.leases import StoreCounts

if TYPE_CHECKING:
    from broker.revocation.reconcile import ReconcileReport


class Counted(Protocol):
    """A part that counts what it did since start, by outcome (the revocation worker, a
    termination source, a JWKS cache, the liveness answers of one issuer)."""

    def counts(self) -> Mapping[str, int]: ...


class CountedByKey(Protocol):
    """A part that counts since start by a key of several labels (lost leases by role and
    the path that found them)."""

    def counts(self) -> Mapping[tuple[str, str], int]: ...


class CheckpointStatus(Protocol):
    """The audit checkpoint writer: the newest trusted checkpoint, its signing failures
    and its refusals (a chain that does not hold) in a row, stored checkpoints ignored."""

    failures: int
    refusals: int

    @property
    def ignored(self) -> int: ...

    def age_s(self) -> float | None: ...

    @property
    def last_seq(self) -> int: ...


class TokenLife(Protocol):
    """The broker's own Vault token (``broker.vault.identity.OwnToken``): seconds left,
    as last learnt (None: it does not expire)."""

    def expires_in(self) -> float | None: ...


class Metrics:
    def __init__(self, engine_of: Mapping[str, str] | None = None) -> None:
        self._engine_of = dict(engine_of or {})  # role → engine, for the leases gauge
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "broker_http_requests_total",
            "HTTP requests by route and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "broker_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.issued = Counter(
            "broker_credentials_issued_total", "Credentials issued", ["role", "kind"], registry=r
        )
        self.refused = Counter(
            "broker_requests_refused_total",
            "Requests refused, by error code and (for identity refusals) issuer",
            ["code", "issuer"],
            registry=r,
        )
        self.revocations = Gauge(
            "broker_revocation_jobs_processed",
            "Revocation job passes of this replica since start, by outcome",
            ["outcome"],
            registry=r,
        )
        self.leases = Gauge(
            "broker_leases",
            "Live leases by role, engine and state, and lost ones (state lost: Vault forgot "
            "them; their credentials may still work)",
            ["role", "engine", "state"],
            registry=r,
        )
        self.leases_lost = Counter(
            "broker_leases_lost",
            "Leases Vault no longer knew before the broker revoked them and before their "
            "expiry (their credentials may still work: alert on any increase), by the path "
            "that found them: revocation, release, lease_limit, renewal, reconciler",
            ["engine", "role", "found_by"],
            registry=r,
        )
        self._lost_seen: dict[tuple[str, str], int] = {}
        self.queue_depth = Gauge(
            "broker_revocation_queue_depth", "Revocation jobs pending or running", registry=r
        )
        self.oldest_job = Gauge(
            "broker_revocation_oldest_job_age_seconds",
            "Age of the oldest unfinished revocation job",
            registry=r,
        )
        self.failed_jobs = Gauge(
            "broker_revocation_failed_jobs", "Revocation jobs that stopped retrying", registry=r
        )
        self.jwks_fetches = Gauge(
            "broker_jwks_fetches",
            "JWKS fetch outcomes since start",
            ["issuer", "outcome"],
            registry=r,
        )

        self.reconcile_runs = Counter(
            "broker_reconcile_runs_total",
            "Reconciliation passes, by outcome (ok, errors, skipped: another replica ran)",
            ["outcome"],
            registry=r,
        )
        self.reconcile_found = Counter(
            "broker_reconcile_findings_total",
            "What reconciliation found and did: expired, expiry_corrected, past_expiry_held, "
            "stuck_settled, stuck_revoked_in_vault, stuck_waiting, orphans, orphans_revoked, "
            "unseen_terminated, lost",
            ["finding"],
            registry=r,
        )
        self.reconcile_orphans = Gauge(
            "broker_reconcile_orphans",
            "Leases in Vault under the broker's paths that the store does not hold (last pass)",
            registry=r,
        )
        self.reconcile_irrevocable = Gauge(
            "broker_reconcile_irrevocable",
            "Leases under the broker's paths that Vault marked irrevocable (last pass)",
            registry=r,
        )
        self.reconcile_stuck = Gauge(
            "broker_reconcile_stuck_issuing",
            "Lease rows stuck in issuing that the last pass could not settle",
            registry=r,
        )
        self.events = Gauge(
            "broker_termination_events",
            "Termination events handled by this replica's sources since start, by outcome",
            ["source", "outcome"],
            registry=r,
        )
        self.liveness = Gauge(
            "broker_liveness_checks",
            "Liveness answers at renewal since start (alive, gone, unknown)",
            ["issuer", "outcome"],
            registry=r,
        )

        self.checkpoint_seq = Gauge(
            "broker_audit_checkpoint_seq",
            "Sequence number of the newest signed audit checkpoint (0: none yet)",
            registry=r,
        )
        self.checkpoint_age = Gauge(
            "broker_audit_checkpoint_age_seconds",
            "Age of the newest signed audit checkpoint (-1: none yet); alert when it grows",
            registry=r,
        )
        self.checkpoint_failures = Gauge(
            "broker_audit_checkpoint_failures",
            "Failed attempts in a row to sign an audit checkpoint on this replica",
            registry=r,
        )

        self.checkpoint_refusals = Gauge(
            "broker_audit_checkpoint_refusals",
            "Ticks in a row this replica refused to sign because the audit chain does not "
            "hold (alert on any: the chain was rewritten; run brokerctl audit verify)",
            registry=r,
        )
        self.checkpoints_ignored = Gauge(
            "broker_audit_checkpoints_ignored",
            "Stored audit checkpoints ignored since start as not genuine: ahead of the head "
            "or the clock, or a signature that does not verify (alert on any)",
            registry=r,
        )

        self.vault_token_expires = Gauge(
            "broker_vault_token_expires_seconds",
            "Seconds the broker's own Vault token has left, as last learnt (-1: it does not "
            "expire); a login is renewed before it runs out, alert when a static token's is low",
            registry=r,
        )

    def count_refused(self, code: str, issuer: str = "") -> None:
        """One refused request, by its error code and the issuer it was refused for (empty
        when none is known: a refusal before any token was read)."""
        self.refused.labels(code=code, issuer=issuer).inc()

    def observe_checkpoints(self, status: CheckpointStatus) -> None:
        age = status.age_s()
        self.checkpoint_seq.set(status.last_seq)
        self.checkpoint_age.set(-1 if age is None else age)
        self.checkpoint_failures.set(status.failures)
        self.checkpoint_refusals.set(status.refusals)
        self.checkpoints_ignored.set(status.ignored)

    def observe_store(self, counts: StoreCounts) -> None:
        self.leases.clear()
        for (role, state), n in counts.leases.items():
            engine = self._engine_of.get(role, "unknown")
            self.leases.labels(role=role, engine=engine, state=state).set(n)
        self.queue_depth.set(counts.queue_depth)
        self.oldest_job.set(counts.oldest_job_age_s)
        self.failed_jobs.set(counts.failed_jobs)

    def observe_reconcile(self, report: ReconcileReport) -> None:
        if report.skipped:
            self.reconcile_runs.labels(outcome="skipped").inc()
            return
        self.reconcile_runs.labels(outcome="errors" if report.errors else "ok").inc()
        for finding, n in (
            ("expired", report.expired),
            ("expiry_corrected", report.expiry_corrected),
            ("past_expiry_held", len(report.past_expiry_held)),
            ("stuck_settled", report.stuck_settled),
            ("stuck_revoked_in_vault", report.stuck_revoked_in_vault),
            ("stuck_waiting", len(report.stuck_waiting)),
            ("orphans", report.orphans),
            ("orphans_revoked", report.orphans_revoked),
            ("unseen_terminated", len(report.unseen_terminated)),
            ("lost", len(report.lost)),
        ):
            if n:
                self.reconcile_found.labels(finding=finding).inc(n)
        if "orphans" not in report.errors:
            self.reconcile_orphans.set(report.orphans - report.orphans_revoked)
        if "irrevocable" not in report.errors:
            self.reconcile_irrevocable.set(len(report.irrevocable))
        if "stuck_issuing" not in report.errors:
            self.reconcile_stuck.set(len(report.stuck_waiting))

    def observe_counts(
        self,
        *,
        revocations: Counted,
        events: Mapping[str, Counted],
        jwks_fetches: Mapping[str, Counted],
        liveness: Mapping[str, Counted],
    ) -> None:
        """The counting parts' figures; ``events`` by source name, ``jwks_fetches`` and
        ``liveness`` by issuer name."""
        for outcome, n in revocations.counts().items():
            self.revocations.labels(outcome=outcome).set(n)
        for source, counted in events.items():
            for outcome, n in counted.counts().items():
                self.events.labels(source=source, outcome=outcome).set(n)
        for issuer, counted in jwks_fetches.items():
            for outcome, n in counted.counts().items():
                self.jwks_fetches.labels(issuer=issuer, outcome=outcome).set(n)
        for issuer, counted in liveness.items():
            for outcome, n in counted.counts().items():
                self.liveness.labels(issuer=issuer, outcome=outcome).set(n)

    def observe_lost(self, lost: CountedByKey) -> None:
        """The lost leases counted since the last scrape, by (role, found_by)."""
        for (role, found_by), n in lost.counts().items():
            seen = self._lost_seen.get((role, found_by), 0)
            if n > seen:
                engine = self._engine_of.get(role, "unknown")
                self.leases_lost.labels(engine=engine, role=role, found_by=found_by).inc(n - seen)
                self._lost_seen[(role, found_by)] = n

    def source_restarted(self, source: str) -> None:
        self.events.labels(source=source, outcome="restarted").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Scraper:
    """What /metrics renders: the store's figures when the last read of them succeeded (the
    previous ones otherwise), and what each counting part has counted since start."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        revocations: Counted,
        events: Mapping[str, Counted],
        jwks_fetches: Mapping[str, Counted],
        liveness: Mapping[str, Counted],
        checkpoints: CheckpointStatus | None = None,
        lost: CountedByKey | None = None,
        vault_token: TokenLife | None = None,
    ) -> None:
        self._metrics = metrics
        self._lost = lost
        self._vault_token = vault_token
        self._checkpoints = checkpoints
        self._revocations = revocations
        self._events = events
        self._jwks_fetches = jwks_fetches
        self._liveness = liveness

    def render(self, counts: StoreCounts | None) -> bytes:
        if counts is not None:
            self._metrics.observe_store(counts)
        self._metrics.observe_counts(
            revocations=self._revocations,
            events=self._events,
            jwks_fetches=self._jwks_fetches,
            liveness=self._liveness,
        )
        if self._checkpoints is not None:
            self._metrics.observe_checkpoints(self._checkpoints)
        if self._lost is not None:
            self._metrics.observe_lost(self._lost)
        if self._vault_token is not None:
            left = self._vault_token.expires_in()
            self._metrics.vault_token_expires.set(-1 if left is None else left)
        return self._metrics.render()

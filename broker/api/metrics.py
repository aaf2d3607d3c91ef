"""Prometheus metrics, in a registry owned by the app (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker.leases.store import StoreCounts


class Metrics:
    def __init__(self) -> None:
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
        self.revocations = Counter(
            "broker_revocation_jobs_total", "Revocation jobs by outcome", ["outcome"], registry=r
        )
        self.leases = Gauge(
            "broker_leases", "Live leases by role and state", ["role", "state"], registry=r
        )
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

    def observe_store(self, counts: StoreCounts) -> None:
        self.leases.clear()
        for (role, state), n in counts.leases.items():
            self.leases.labels(role=role, state=state).set(n)
        self.queue_depth.set(counts.queue_depth)
        self.oldest_job.set(counts.oldest_job_age_s)
        self.failed_jobs.set(counts.failed_jobs)

    def render(self) -> bytes:
        return generate_latest(self.registry)

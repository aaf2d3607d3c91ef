"""The injector's Prometheus metrics, in its own registry (no global state).

Counters are labelled by namespace, a value any caller of ``/mutate`` chooses: the review
checks it is a namespace name, and past ``MAX_NAMESPACES`` distinct ones the rest are
counted under ``OTHER`` so the series (and the memory behind them) stay bounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker.injector.model import Patch, Refusal, Skip

MAX_NAMESPACES = 500
OTHER = "_other"  # not a namespace name (no '_' in a DNS label): cannot be confused with one


class InjectorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self._namespaces: set[str] = set()
        self.requests = Counter(
            "broker_injector_admission_requests_total",
            "AdmissionReviews answered, by namespace",
            ["namespace"],
            registry=r,
        )
        self.injections = Counter(
            "broker_injector_injections_total",
            "Pods the agent was added to, by namespace",
            ["namespace"],
            registry=r,
        )
        self.completions = Counter(
            "broker_injector_reinvocation_patches_total",
            "Reinvocations that completed an injected pod (mounts for containers added "
            "since, the agent moved after a new native sidecar), by namespace",
            ["namespace"],
            registry=r,
        )
        self.refusals = Counter(
            "broker_injector_refusals_total",
            "Pods refused (invalid annotations, or the policy preview under strict), by namespace",
            ["namespace"],
            registry=r,
        )
        self.skips = Counter(
            "broker_injector_skips_total",
            "Reviews admitted unchanged, by reason",
            ["reason"],
            registry=r,
        )
        self.malformed = Counter(
            "broker_injector_malformed_reviews_total",
            "Requests to /mutate that were not an AdmissionReview (answered 400)",
            registry=r,
        )
        self.previews = Counter(
            "broker_injector_policy_previews_total",
            "Policy preview calls to the broker, by outcome (answered, unavailable)",
            ["outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "broker_injector_admission_seconds",
            "Time to answer an AdmissionReview, the policy preview included",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.tls_reloads = Gauge(
            "broker_injector_tls_reloads",
            "Serving certificate reloads since start, by outcome (loaded, failed)",
            ["outcome"],
            registry=r,
        )
        self.tls_not_after = Gauge(
            "broker_injector_tls_certificate_expiry_timestamp_seconds",
            "When the certificate being served expires (Unix time)",
            registry=r,
        )

    def _label(self, namespace: str) -> str:
        if namespace in self._namespaces:
            return namespace
        if len(self._namespaces) < MAX_NAMESPACES:
            self._namespaces.add(namespace)
            return namespace
        return OTHER

    def observe(self, namespace: str, outcome: Patch | Refusal | Skip, seconds: float) -> None:
        namespace = self._label(namespace)
        self.requests.labels(namespace=namespace).inc()
        if isinstance(outcome, Patch):
            (self.injections if outcome.first_pass else self.completions).labels(
                namespace=namespace
            ).inc()
        elif isinstance(outcome, Refusal):
            self.refusals.labels(namespace=namespace).inc()
        else:
            self.skips.labels(reason=outcome.reason).inc()
        self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

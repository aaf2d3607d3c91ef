"""Builds every component of the broker from its settings, and does no I/O doing it.

Nothing here connects, binds or reads a file: the objects are constructed and wired, and
``broker.app.Broker.start`` does the I/O in order. So every collaborator exists from the
start (none is filled in later), and a test can build the whole broker without a server.

Provider modules (boto3, the Kubernetes client) are imported only when their section is
configured.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

import aiohttp
from aiohttp import web

from broker.api.app import build_app
from broker.api.auth import OperatorAuthenticator
from broker.api.metrics import Metrics, Scraper
from broker.api.services import Admin
from broker.app.http import HttpServer
from broker.app.http_refusals import header_limit
from broker.app.services import (
    ActionService,
    ListingService,
    LockService,
    PolicyService,
    Readiness,
)
from broker.app.supervisor import Tick
from broker.app.ticks import (
    MAINTENANCE_S,
    SIGHTINGS_FLUSH_S,
    Maintenance,
    Reconciliation,
    Revocation,
    SightingsFlush,
)
from broker.audit.checkpoint import uncovered_limit
from broker.audit.external import file_checkpoints
from broker.audit.service import AuditVerification
from broker.audit.signing import CheckpointSigning
from broker.audit.writer import CheckpointWriter
from broker.clock import Clock, SystemClock
from broker.config import Settings
from broker.engines.checks import DirectChecks
from broker.events import TerminationSource
from broker.events.receiver import WebhookReceiver
from broker.identity import IdentityVerifier
from broker.issuance import CredentialService
from broker.issuance.tokens import InstanceTokens
from broker.leases import Database, Ledgers, TerminationRecords
from broker.leases.ending import CredentialCheck, LeaseEnder
from broker.leases.refusals import BoundedRefusals
from broker.liveness import LivenessCheck
from broker.liveness.sightings import Sightings
from broker.revocation.bulk import BulkTerminator
from broker.revocation.reconcile import Reconciler
from broker.revocation.terminator import Terminator
from broker.revocation.worker import RevocationWorker
from broker.vault import VaultClient
from broker.vault.transit import Transit

# How often the checkpoint writer looks whether a checkpoint is due: a bound on how late
# one comes after ``audit.checkpoint.every`` (or ``every_events``) is reached.
CHECKPOINT_TICK_S = 1.0

# How often counted repeats of refusals are written once their minute has closed.
REFUSALS_FLUSH_S = 15.0

if TYPE_CHECKING:
    from broker.aws.client import AwsClient
    from broker.kubernetes.client import KubernetesClient




@dataclass(frozen=True)
class Ticks:
    revocation: Tick
    reconcile: Tick
    sightings: Tick
    maintenance: Tick
    checkpoint: Tick
    refusals: Tick

    def all(self) -> tuple[Tick, ...]:
        return (
            self.revocation,
            self.reconcile,
            self.sightings,
            self.maintenance,
            self.checkpoint,
            self.refusals,
        )


@dataclass(frozen=True)
class Assembly:
    """Every component of one broker, wired, none started."""

    settings: Settings
    clock: Clock
    ledgers: Ledgers
    vault: VaultClient
    aws: AwsClient | None
    kubernetes: KubernetesClient | None
    http: aiohttp.ClientSession
    metrics: Metrics
    ender: LeaseEnder
    tokens: InstanceTokens
    verifier: IdentityVerifier
    sightings: Sightings
    worker: RevocationWorker
    terminate: Terminator
    reconciler: Reconciler
    reconcile: Reconciliation
    flush_sightings: SightingsFlush
    liveness: Mapping[str, LivenessCheck]
    sources: tuple[TerminationSource, ...]
    service: CredentialService
    refusals: BoundedRefusals
    operators: OperatorAuthenticator
    app: web.Application
    server: HttpServer
    ticks: Ticks
    signing: CheckpointSigning
    checkpoints: CheckpointWriter
    direct_checks: DirectChecks | None = None  # closed at stop (its checker connections)


def assemble(
    settings: Settings,
    *,
    clock: Clock | None = None,
    worker_id: str | None = None,
    checks: CredentialCheck | Literal["direct"] | None = None,
) -> Assembly:
    """The broker's components from ``settings``. Call it from a coroutine: the identity
    verifier's ``aiohttp.ClientSession`` belongs to the running loop (constructing one
    opens nothing; its connections open on the first JWKS fetch). ``checks``: the direct
    credential checks that tell a lease Vault forgot from one that is dead: ``"direct"``
    (what ``broker serve`` and ``broker dev`` run: PKI against the CRL, PostgreSQL roles
    with a configured checker, on this broker's Vault client), one of its own, or None."""
    clock = clock or SystemClock()
    database = Database(settings.store)
    key = settings.audit.hash_key
    ledgers = Ledgers.on(
        database, clock, token_key=key.get_secret_value().encode() if key is not None else None
    )
    vault = VaultClient(settings.vault, clock)
    engine_of = {name: role.engine for name, role in settings.roles.items()}
    metrics = Metrics(engine_of)
    # Every path that ends a lease tells "Vault forgot it" from "we revoked it" through it.
    direct_checks = None
    if checks == "direct":
        checks = direct_checks = DirectChecks(settings.roles, vault)
    ender = LeaseEnder(vault, ledgers.ending, clock, engine_of=engine_of, checks=checks)
    tokens = InstanceTokens(vault, ledgers.issuance, clock)
    aws = None
    if settings.aws is not None:
        from broker.aws.client import AwsClient  # boto3 loads only where AWS is used

        aws = AwsClient(settings.aws, clock)
    worker = RevocationWorker(
        settings.revocation,
        ledgers.jobs,
        vault,
        clock,
        on_terminated=tokens.forget,
        worker_id=worker_id,
        cloud=aws,
        ender=ender,
    )
    revocation = Tick(
        "revocation",
        settings.revocation.tick_s,
        Revocation(worker).run_once,
        at_start=True,
        on_stop=worker.stop_claiming,
    )
    terminate = Terminator(ledgers.termination, tokens, revocation.kick)
    sightings = Sightings()
    flush = SightingsFlush(sightings, ledgers.sightings, clock)
    reconciler = Reconciler(
        settings.reconcile,
        settings.revocation,
        roles=settings.roles,
        issuers=settings.identity.issuers,
        ledger=ledgers.reconcile,
        vault=vault,
        clock=clock,
        terminate=terminate,
        ender=ender,
    )
    reconcile = Reconciliation(reconciler, flush, metrics)
    http = aiohttp.ClientSession()
    verifier = IdentityVerifier(settings.identity, http, clock)
    # Admin refusals and lock refusals, audited, aggregated per minute per kind and source.
    refusals = BoundedRefusals(ledgers.admin, clock)
    operators = OperatorAuthenticator.from_settings(
        settings.admin,
        session=http,
        clock=clock,
        secret=key.get_secret_value().encode() if key is not None else None,
    )
    kubernetes = _kubernetes_client(settings)
    liveness = _liveness_checks(settings, clock, kubernetes)
    sources = _termination_sources(settings, terminate, ledgers.termination, kubernetes)
    service = CredentialService(
        roles=settings.roles,
        rules=settings.policy.rules,
        ledger=ledgers.issuance,
        vault=vault,
        tokens=tokens,
        clock=clock,
        deadline_s=settings.revocation.issuing_timeout_s / 2,
        cloud=aws,
        liveness=liveness,
        terminate=terminate,
        sightings=sightings,
        refusals=refusals,
        ender=ender,
    )
    events = None
    if settings.events.webhook is not None:
        events = WebhookReceiver(
            settings.events.webhook,
            replay=ledgers.replay,
            terminate=terminate,
            clock=clock,
            issuer_names=frozenset(i.name for i in settings.identity.issuers),
        )
    admin = Admin(
        reads=ListingService(ledgers.admin, vault=vault, clock=clock),
        actions=ActionService(
            ledgers.admin,
            terminate=terminate.request,
            reconcile=reconcile,
            bulk=BulkTerminator(
                ledgers.selection,
                tokens,
                revocation.kick,
                {name: role.engine for name, role in settings.roles.items()},
            ),
            resolutions=ledgers.ending,
        ),
        policy=PolicyService(
            ledgers.admin,
            verifier=verifier,
            roles=settings.roles,
            rules=settings.policy.rules,
            issuers=settings.identity.issuers,
            audience=settings.identity.audience,
            locks=ledgers.admin,
            clock=clock,
        ),
        locks=LockService(
            ledgers.admin,
            clock=clock,
            roles=list(settings.roles),
            issuers={i.name: i.issuer for i in settings.identity.issuers},
        ),
    )
    signing = CheckpointSigning(settings.audit, Transit(vault, settings.audit.transit.mount))
    checkpoints = CheckpointWriter(settings.audit.checkpoint, ledgers.audit, signing, clock)
    checkpoint_file = settings.audit.checkpoint.file
    audit = AuditVerification(
        ledgers.chain,
        check_signature=signing.signatures.check_async,
        external_checkpoints=file_checkpoints(checkpoint_file) if checkpoint_file else None,
        clock=clock,
        max_uncovered=uncovered_limit(timedelta(seconds=settings.audit.checkpoint.every)),
    )
    readiness = Readiness(database=database, vault=vault, counts=ledgers.admin)
    scraper = Scraper(
        metrics,
        revocations=worker,
        events={source.name: source for source in sources},
        jwks_fetches={cache.issuer.name: cache for cache in verifier.caches},
        liveness=service.liveness_outcomes,
        checkpoints=checkpoints,
        lost=ender.lost,
        vault_token=vault.own,
    )
    app = build_app(
        service,
        admin,
        events,
        readiness,
        verifier=verifier,
        metrics=metrics,
        scraper=scraper,
        operators=operators,
        refusals=refusals,
        max_body_bytes=settings.server.max_body_bytes,
        audit=audit,
        audit_events=ledgers.audit,
    )
    maintenance = Maintenance(vault, tokens, ledgers.replay, worker, verifier)
    ticks = Ticks(
        revocation=revocation,
        reconcile=Tick("reconcile", settings.reconcile.tick_s, reconcile.run_once),
        sightings=Tick("sightings", SIGHTINGS_FLUSH_S, flush.run_once),
        maintenance=Tick("maintenance", MAINTENANCE_S, maintenance.run_once),
        checkpoint=Tick("audit-checkpoint", CHECKPOINT_TICK_S, checkpoints.run_once),
        refusals=Tick("refusals", REFUSALS_FLUSH_S, refusals.flush),
    )
    return Assembly(
        settings=settings,
        clock=clock,
        ledgers=ledgers,
        vault=vault,
        aws=aws,
        kubernetes=kubernetes,
        http=http,
        metrics=metrics,
        ender=ender,
        tokens=tokens,
        verifier=verifier,
        sightings=sightings,
        worker=worker,
        terminate=terminate,
        reconciler=reconciler,
        reconcile=reconcile,
        flush_sightings=flush,
        liveness=liveness,
        sources=sources,
        service=service,
        refusals=refusals,
        operators=operators,
        app=app,
        server=HttpServer(
            app,
            settings.server.host,
            settings.server.port,
            settings.server.tls,
            max_header_bytes=header_limit(_max_token_bytes(settings)),
            counted=metrics,
        ),
        ticks=ticks,
        signing=signing,
        checkpoints=checkpoints,
        direct_checks=direct_checks,
    )


def _max_token_bytes(settings: Settings) -> int:
    """The largest token any issuer (a workload's, the operators') accepts: the HTTP
    server's header limit must let it through to the verifier."""
    sizes = [issuer.max_token_bytes for issuer in settings.identity.issuers]
    if settings.admin.oidc is not None:
        sizes.append(settings.admin.oidc.max_token_bytes)
    return max(sizes)


def _kubernetes_client(settings: Settings) -> KubernetesClient | None:
    if settings.kubernetes is None:
        return None
    from broker.kubernetes.client import KubernetesClient

    return KubernetesClient(settings.kubernetes)


def _liveness_checks(
    settings: Settings, clock: Clock, kubernetes: KubernetesClient | None
) -> dict[str, LivenessCheck]:
    """One check per issuer that asks for one."""
    checks: dict[str, LivenessCheck] = {}
    for issuer in settings.identity.issuers:
        if issuer.liveness.check == "kubernetes":
            from broker.liveness.kubernetes import KubernetesLiveness

            assert kubernetes is not None  # configuration validation requires it
            checks[issuer.name] = KubernetesLiveness(kubernetes, cache_s=issuer.liveness.cache_s)
        elif issuer.liveness.check == "aws_ec2":
            from broker.liveness.ec2 import Ec2Liveness

            assert settings.aws is not None  # configuration validation requires it
            checks[issuer.name] = Ec2Liveness(settings.aws, clock, cache_s=issuer.liveness.cache_s)
    return checks


def _termination_sources(
    settings: Settings,
    terminate: Terminator,
    ledger: TerminationRecords,
    kubernetes: KubernetesClient | None,
) -> tuple[TerminationSource, ...]:
    """The long-running termination sources configured."""
    sources: list[TerminationSource] = []
    if settings.events.sqs is not None:
        from broker.events.sqs import SqsTerminationSource

        sources.append(SqsTerminationSource(settings.events.sqs, terminate))
    if settings.kubernetes is not None and settings.kubernetes.watch:
        from broker.events.pod_watch import PodWatch

        issuer_name = settings.kubernetes.issuer
        known: Callable[[], Awaitable[set[str]]] | None = (
            (lambda: ledger.active_instance_ids(issuer_name)) if issuer_name is not None else None
        )
        assert kubernetes is not None  # built whenever the kubernetes section is present
        sources.append(PodWatch(settings.kubernetes, kubernetes, terminate, known))
    return tuple(sources)

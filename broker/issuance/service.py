"""Issue, renew and release credentials for a verified identity, and end its own instance.

The order of ``issue`` is the safety argument:

1. policy decides (pure) and templates are rendered: a refusal writes nothing;
2. the ``issuing`` lease row is written, in the transaction that checks the tombstone;
3. the instance token is taken from memory or minted, its accessor recorded first;
4. Vault is asked, with the instance token, so Vault ties the lease to the instance;
5. the lease row is completed; only then is the credential returned.

The engine plans the request once, before 2 (``Engine.plan``); 3 and 4 end in a value
(obtained, refused, unknown), and what a request that hands nothing out leaves behind
(the row failed or left ``issuing``, the lease taken back, the ``jti`` given back) is the
table in ``broker.issuance.settle``.

A crash after 4 and before 5 leaves an ``issuing`` row and a lease under a recorded token:
the revocation job (and, later, the reconciler) revoke it through that token.

Some credentials come from a cloud, not from Vault: Vault's answer (an OIDC token for the
instance) is exchanged at AWS STS in step 4, and the session that comes back has no Vault
lease. Its row carries, from step 2 on, a reference to what termination must deny at the
cloud instead (``external_ref``), so that even a crash mid-exchange leaves it known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, NoReturn, Protocol

from broker.aws import StsSession, WebIdentityRequest
from broker.clock import Clock, iso_z
from broker.engines import ENGINES, Plan, read_caller_params
from broker.engines.role import RoleSettings
from broker.errors import (
    BadRequest,
    BrokerError,
    InstanceTerminated,
    Locked,
    NotFound,
    NotPermitted,
    UpstreamRejected,
    UpstreamUnavailable,
)
from broker.events import Terminate
from broker.identity.model import Identity
from broker.identity.recorded import recorded_claims
from broker.issuance.ledger import IssuanceLedger
from broker.issuance.lifecycle import LeaseEnds
from broker.issuance.locks import RefusalAudit, audit_locked, lock_subject, refuse_renewal
from broker.issuance.settle import (
    Obtained,
    Outcome,
    Record,
    Refused,
    Settlement,
    Step,
    Unknown,
    Withheld,
    settle,
)
from broker.issuance.tokens import InstanceTokens
from broker.leases import IssueTicket, JobView, LeaseLimit, LeaseView
from broker.leases.ending import LeaseEnder
from broker.leases.states import LeaseState
from broker.liveness import LivenessCheck
from broker.liveness.sightings import Sightings
from broker.logs import note_request
from broker.policy import decide, render_params
from broker.policy.settings import Rule
from broker.vault import VaultClient

log = logging.getLogger(__name__)


class CloudExchange(Protocol):
    async def assume_role_with_web_identity(self, request: WebIdentityRequest) -> StsSession: ...


@dataclass(frozen=True)
class IssuedCredential:
    lease_id: str
    instance_id: str
    workload: str
    role: str
    kind: str
    data: Mapping[str, Any]
    issued_at: datetime
    expires_at: datetime
    renewable: bool
    leased: bool = True  # False: no Vault lease (a static kv secret), nothing to revoke
    lease_limit: Mapping[str, Any] | None = None  # what the role's lease limit did

    def response(self) -> dict[str, Any]:
        out = {
            "lease_id": self.lease_id,
            "instance_id": self.instance_id,
            "workload": self.workload,
            "role": self.role,
            "kind": self.kind,
            "data": dict(self.data),
            "issued_at": iso_z(self.issued_at),
            "expires_at": iso_z(self.expires_at),
            "renewable": self.renewable,
            "leased": self.leased,
        }
        if self.lease_limit is not None:
            out["lease_limit"] = dict(self.lease_limit)
        return out

    def __repr__(self) -> str:  # data holds the credential: never printed
        return f"IssuedCredential(lease_id={self.lease_id!r}, role={self.role!r}, data=***)"


def _ended_otherwise(replaced: list[tuple[str, LeaseState | None]]) -> dict[str, Any]:
    """Replaced leases Vault no longer knew, by the state recorded (``lost``, ``expired``)."""
    out: dict[str, list[str]] = {}
    for lease_id, state in replaced:
        if state is not None and state is not LeaseState.REVOKED:
            out.setdefault(state.value, []).append(lease_id)
    return out


class LivenessOutcomes:
    """One issuer's liveness answers at renewal since start: alive, gone, unknown."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def record(self, outcome: str) -> None:
        self._counts[outcome] += 1

    def counts(self) -> dict[str, int]:
        return dict(self._counts)


class CredentialService:
    def __init__(
        self,
        *,
        roles: Mapping[str, RoleSettings],
        rules: tuple[Rule, ...],
        ledger: IssuanceLedger,
        vault: VaultClient,
        tokens: InstanceTokens,
        clock: Clock,
        terminate: Terminate,
        sightings: Sightings,
        deadline_s: float = 60.0,
        cloud: CloudExchange | None = None,
        liveness: Mapping[str, LivenessCheck] | None = None,
        refusals: RefusalAudit | None = None,
        ender: LeaseEnder,
    ) -> None:
        self._roles = roles
        self._ends = LeaseEnds(roles=roles, ledger=ledger, vault=vault, ender=ender)
        self._refusals = refusals
        self._rules = rules
        self._ledger = ledger
        self._vault = vault
        self._tokens = tokens
        self._clock = clock
        self._cloud = cloud
        self._liveness = dict(liveness or {})  # by issuer name
        self._terminate = terminate
        self._sightings = sightings
        # by issuer name, for the metrics
        self.liveness_outcomes = {issuer: LivenessOutcomes() for issuer in self._liveness}
        # Bounds token, issue and TTL adjustment together; shorter than the revocation
        # worker's issuing_timeout_s so a job never gives up on a request still running.
        self._deadline_s = deadline_s
        # The issuing bound (twice the deadline): a credential not recorded by then is not
        # recorded at all, because the reconciler may then take it for unrecorded and revoke it.
        self._record_within = timedelta(seconds=deadline_s * 2)

    def _permit(self, identity: Identity, role: str, ttl: int | None) -> tuple[RoleSettings, int]:
        decision = decide(identity, role, ttl, roles=self._roles, rules=self._rules)
        if not decision.allowed:
            note_request(reason=decision.reason)  # for the refusal's log line, not the caller
            raise NotPermitted(f"role {role!r} is not permitted for this identity")
        return self._roles[role], decision.ttl

    def issued_kind(self, identity: Identity, role_name: str) -> str | None:
        """The kind of credential ``role_name`` gives ``identity``, or None where policy
        refuses it (an unknown role alike): asked before ``issue`` by a door that must
        refuse a request for another kind without issuing. No I/O; a lock, which only the
        store knows, still refuses in ``issue``."""
        if not decide(identity, role_name, None, roles=self._roles, rules=self._rules).allowed:
            return None
        return ENGINES[self._roles[role_name].engine].kind

    async def issue(
        self,
        identity: Identity,
        role_name: str,
        ttl: int | None,
        caller_params: Mapping[str, Any] | None = None,
    ) -> IssuedCredential:
        role, ttl_s = self._permit(identity, role_name, ttl)
        engine = ENGINES[role.engine]
        caller = read_caller_params(engine, role_name, role, caller_params or {})
        params = render_params(role.params, identity)
        plan = engine.plan(role_name, role, params, caller, ttl_s, identity.instance_id)
        limit = LeaseLimit(role.max_leases_per_instance, role.on_limit) if plan.leased else None
        try:
            ticket = await self._ledger.begin_issue(
                instance_id=identity.instance_id,
                issuer_name=identity.issuer_name,
                workload=identity.workload,
                role=role_name,
                kind=plan.kind,
                token_id=self._used_once(identity),
                limit=limit,
                external_ref=plan.session_ref.to_record() if plan.session_ref else None,
                vault_path=plan.request.path,
                lock_subject=lock_subject(identity, role_name),
                claims=recorded_claims(identity.claims),
            )
        except Locked as exc:
            await audit_locked(self._refusals, identity, role_name, exc, "issue")
            raise
        note_request(lease_id=ticket.lease_id)
        try:
            credential = await self._issue_recorded(identity, plan, ticket)
        finally:
            # Chosen under the lease limit: revoked whatever became of the new one (a
            # lease left ``revoking`` by a crash here is finished by the sweep).
            replaced = await self._ends.revoke_superseded(ticket.superseded)
        self._sightings.note(identity.instance_id)
        if limit is not None:
            credential = replace(
                credential,
                lease_limit={
                    "max_leases": limit.max_leases,
                    "on_limit": limit.on_limit,
                    "revoked": [lid for lid, st in replaced if st is LeaseState.REVOKED],
                    "revocation_pending": [lid for lid, st in replaced if st is None],
                    # Vault had forgotten them: ended, but not by this revocation.
                    **_ended_otherwise(replaced),
                },
            )
        return credential

    async def _issue_recorded(
        self, identity: Identity, plan: Plan, ticket: IssueTicket
    ) -> IssuedCredential:
        """Steps 3 to 5 for the ticket's ``issuing`` row: obtain, settle, complete."""
        lease_id = ticket.lease_id
        try:
            async with asyncio.timeout(self._deadline_s):
                outcome = await self._obtain(identity, plan)
                settlement = self._settle(plan, outcome)
                # Within the deadline, as the request that obtained the lease.
                taken_back = await self._take_back_for(settlement, outcome, lease_id)
        except TimeoutError:
            log.warning(
                "issuance passed its deadline; outcome in Vault unknown",
                extra={"lease_id": lease_id, "role": plan.role_name},
            )
            outcome = Unknown(UpstreamUnavailable("Vault did not answer in time; retry shortly"))
            settlement, taken_back = self._settle(plan, outcome), False
        if not isinstance(outcome, Obtained) or not settlement.hands_out:
            await self._give_up(identity, plan, lease_id, outcome, settlement, taken_back)

        issued_at = self._clock.now()
        expires_at, renewable = self._expiry(plan, outcome, issued_at)
        vault_lease_id = outcome.vault_lease_id
        try:
            # Shaped before it is recorded: an answer the broker cannot hand out
            # (vault_bad_response) is never recorded as issued.
            data = plan.shape(outcome.answer, outcome.session, expires_at)
        except BrokerError as exc:
            await self._withhold(identity, plan, lease_id, exc, Step.SHAPE, vault_lease_id)
        try:
            still_active = await self._ledger.complete_issue(
                lease_id,
                created_after=self._clock.now() - self._record_within,
                vault_lease_id=vault_lease_id,
                accessor=outcome.accessor,
                renewable=renewable,
                issued_at=issued_at,
                expires_at=expires_at,
                state=LeaseState(settlement.record.value),
                engine=self._roles[plan.role_name].engine,
                token_id=self._token_id(identity),
                lock_subject=lock_subject(identity, plan.role_name),
                credential_ref=plan.identifier(outcome.answer),
                issuing=ticket.issuing,
            )
        except Locked as exc:
            # A lock created while Vault was asked: not recorded, taken back now.
            await audit_locked(self._refusals, identity, plan.role_name, exc, "issue")
            await self._withhold(identity, plan, lease_id, exc, Step.LOCKED, vault_lease_id)
        except BrokerError as exc:
            # Not recorded, so not handed out: taken back from Vault now. If that fails
            # too, the ``issuing`` row and the recorded token let the reconciler find it.
            await self._withhold(identity, plan, lease_id, exc, Step.RECORD, vault_lease_id)
        if not still_active:
            # Recorded, so the revocation job confirms it; taking it back just saves time.
            terminated = InstanceTerminated(
                f"instance {identity.instance_id} was terminated while the credential was issued"
            )
            await self._withhold(
                identity, plan, lease_id, terminated, Step.TERMINATED, vault_lease_id
            )
        return IssuedCredential(
            lease_id=lease_id,
            instance_id=identity.instance_id,
            workload=identity.workload,
            role=plan.role_name,
            kind=plan.kind,
            data=data,
            issued_at=issued_at,
            expires_at=expires_at,
            renewable=renewable,
            leased=settlement.record is Record.ACTIVE,
        )

    async def _obtain(self, identity: Identity, plan: Plan) -> Outcome:
        """Steps 3 and 4: the instance token, Vault, the cloud exchange, and the lease
        fitted to the grant. Says what came of them; raises only TimeoutError (the
        caller's deadline)."""
        try:
            token = await self._tokens.for_lease(identity, plan.ttl)
            request = plan.request
            issued = await self._vault.issue(
                token.token, request.method, request.path, request.body
            )
            session = await self._exchange(plan, issued.data)
        except BrokerError as exc:
            return Unknown(exc) if exc.outcome_unknown else Refused(exc)
        duration, renewable = issued.lease_duration, issued.renewable
        if issued.lease_id and not request.ttl_applied and renewable and duration != plan.ttl:
            # The engine takes no TTL per request: set the lease to exactly what was
            # granted, or hand nothing out (fail closed).
            try:
                duration, renewable = await self._vault.renew_lease(issued.lease_id, plan.ttl)
            except BrokerError as exc:
                return Withheld(exc, Step.FIT, issued.lease_id, exc.outcome_unknown)
        return Obtained(
            accessor=token.accessor,
            answer=issued.data,
            vault_lease_id=issued.lease_id or None,
            duration=duration,
            renewable=renewable,
            session=session,
        )

    async def _exchange(self, plan: Plan, answer: Mapping[str, Any]) -> StsSession | None:
        """Exchange Vault's answer at the cloud when the role's mode says so."""
        request = plan.exchange(answer)
        if request is None:
            return None
        if self._cloud is None:  # configuration validation requires it; fail closed
            raise UpstreamRejected(
                "this role needs the broker's aws section", code="cloud_not_configured"
            )
        return await self._cloud.assume_role_with_web_identity(request)

    @staticmethod
    def _settle(plan: Plan, outcome: Outcome) -> Settlement:
        return settle(outcome, lease_expected=plan.leased, external=plan.session_ref is not None)

    @staticmethod
    def _expiry(plan: Plan, obtained: Obtained, issued_at: datetime) -> tuple[datetime, bool]:
        """When the credential ends, and whether its Vault lease renews."""
        if obtained.session is not None:
            return obtained.session.expiration, False
        if obtained.vault_lease_id is None:
            # No lease to say when it ends (Vault answers 0, or kv v1's refresh hint): the
            # credential itself may (an SSH certificate), else the broker's grant does.
            ends = plan.expires_at(obtained.answer) or issued_at + timedelta(seconds=plan.ttl)
            return ends, False
        return issued_at + timedelta(seconds=obtained.duration), obtained.renewable

    async def _withhold(
        self,
        identity: Identity,
        plan: Plan,
        lease_id: str,
        error: BrokerError,
        step: Step,
        vault_lease_id: str | None,
    ) -> NoReturn:
        """A credential obtained that is not handed out: settled, and its error raised."""
        outcome = Withheld(error, step, vault_lease_id)
        settlement = self._settle(plan, outcome)
        taken_back = await self._take_back_for(settlement, outcome, lease_id)
        await self._give_up(identity, plan, lease_id, outcome, settlement, taken_back)

    async def _give_up(
        self,
        identity: Identity,
        plan: Plan,
        lease_id: str,
        outcome: Outcome,
        settlement: Settlement,
        taken_back: bool,
    ) -> NoReturn:
        """Record a settlement that hands nothing out, and raise the caller's error."""
        if settlement.after_take_back(taken_back) is Record.FAILED:
            with contextlib.suppress(BrokerError):
                await self._ledger.fail_issue(
                    lease_id,
                    settlement.code,
                    release_token_id=self._token_id(identity) if settlement.release_jti else None,
                )
        # Otherwise Vault may have issued under the (recorded) instance token: the row
        # stays ``issuing`` so termination and reconciliation treat it as possibly live.
        if isinstance(outcome, Obtained):  # Vault answered without the lease it must carry
            raise UpstreamRejected(
                f"Vault issued role {plan.role_name!r} without a lease, so it could not be "
                "revoked; configure the Vault role to generate leases",
                code="vault_no_lease",
            )
        raise outcome.error

    async def _take_back_for(self, settlement: Settlement, outcome: Outcome, lease_id: str) -> bool:
        if settlement.take_back and isinstance(outcome, Withheld) and outcome.vault_lease_id:
            # After RECORD or TERMINATED the row may hold the Vault lease id (recorded, or
            # a commit in doubt): it is stamped before the take-back, or a path that later
            # finds Vault not knowing it would call it lost.
            recorded = outcome.step in (Step.RECORD, Step.TERMINATED)
            return await self._ends.take_back(
                outcome.vault_lease_id, lease_id=lease_id if recorded else None
            )
        return False

    @staticmethod
    def _used_once(identity: Identity) -> tuple[str, datetime] | None:
        """The token id an issuance or a self-termination uses up (and until when it must
        be remembered), where the issuer's replay rule applies."""
        if identity.replay_key is None:
            return None
        return identity.replay_key, identity.expires_at

    @staticmethod
    def _token_id(identity: Identity) -> tuple[str, str] | None:
        if identity.replay_key is None:
            return None
        return identity.issuer_name, identity.replay_key

    async def _own_lease(self, identity: Identity, lease_id: str) -> tuple[LeaseView, str]:
        """The caller's own lease and its instance's state. Another instance's lease, or
        one under the same instance id from another issuer, is indistinguishable from one
        that does not exist."""
        lease = await self._ledger.get_lease(lease_id)
        instance = await self._ledger.instance_state(lease.instance_id)
        if (
            lease.instance_id != identity.instance_id
            or instance is None
            or instance[1] != identity.issuer_name
        ):
            raise NotFound("no such lease", code="lease_not_found")
        note_request(role=lease.role)
        return lease, instance[0]

    async def renew(self, identity: Identity, lease_id: str, ttl: int | None) -> dict[str, Any]:
        lease, instance_state = await self._own_lease(identity, lease_id)
        if instance_state != "active":
            raise InstanceTerminated(f"instance {identity.instance_id} is terminated")
        if lease.state != LeaseState.ACTIVE:
            raise BadRequest(
                f"lease is {lease.state}; only an active lease can be renewed",
                code="lease_not_active",
            )
        if not lease.renewable or lease.vault_lease_id is None or lease.issued_at is None:
            raise BadRequest(
                "this lease is not renewable; request a new credential", code="lease_not_renewable"
            )
        # Policy is asked again: a role withdrawn since issue is not renewed.
        role, granted = self._permit(identity, lease.role, ttl)
        try:
            await self._ledger.refuse_if_locked(lock_subject(identity, lease.role))
        except Locked as exc:
            await audit_locked(
                self._refusals, identity, lease.role, exc, "renew", lease_id=lease_id
            )
            raise
        await self._require_alive(identity)
        cap = self._cap(identity, lease.role, role)
        now = self._clock.now()
        max_expires = lease.issued_at + timedelta(seconds=cap)
        room = int((max_expires - now).total_seconds())
        if room <= 0:
            raise BadRequest(
                "lease has reached its maximum TTL; request a new credential",
                code="lease_at_max_ttl",
            )
        increment = min(granted, room)
        try:
            duration, renewable = await self._vault.renew_lease(lease.vault_lease_id, increment)
        except UpstreamRejected:
            await self._ends.renewal_refused(lease)  # Vault forgot it: 409, recorded
            raise
        expires_at = now + timedelta(seconds=duration)
        locked = await self._ledger.set_lease_expiry(
            lease_id, expires_at, renewable, lock_subject(identity, lease.role)
        )
        if locked is not None:  # a lock created while Vault renewed: recorded, refused
            await refuse_renewal(self._refusals, identity, lease.role, locked, lease_id)
        self._sightings.note(identity.instance_id)
        return {
            "lease_id": lease_id,
            "expires_at": iso_z(expires_at),
            "renewable": renewable,
            "max_expires_at": iso_z(max_expires),
            "near_max_ttl": (max_expires - expires_at) < timedelta(seconds=min(cap / 10, 300)),
        }

    async def _require_alive(self, identity: Identity) -> None:
        """Where the issuer has a liveness check: an instance its source confirms gone is
        terminated instead of renewed. An unknown answer renews (and is counted)."""
        check = self._liveness.get(identity.issuer_name)
        if check is None:
            return
        alive = await check.alive(identity)
        outcome = "alive" if alive else "unknown" if alive is None else "gone"
        self.liveness_outcomes[identity.issuer_name].record(outcome)
        if alive is not False:
            return
        log.info(
            "instance confirmed gone at renewal; terminating it",
            extra={"instance_id": identity.instance_id, "issuer": identity.issuer_name},
        )
        await self._terminate(
            identity.instance_id,
            actor=f"liveness:{identity.issuer_name}",
            issuer=identity.issuer_name,
        )
        raise InstanceTerminated(
            f"instance {identity.instance_id} no longer exists at its source; "
            "its credentials are being revoked"
        )

    def _cap(self, identity: Identity, role_name: str, role: RoleSettings) -> int:
        decision = decide(identity, role_name, role.max_ttl, roles=self._roles, rules=self._rules)
        return decision.ttl

    async def terminate_self(self, identity: Identity, reason: str | None) -> JobView:
        """End the instance the verified token names, as that instance: the one terminate
        path, scoped to the token's issuer and workload (an instance id another issuer or
        workload presented first is refused, nothing changed), with the token id used
        once where the issuer's replay rule applies. Idempotent: the same job again."""
        return await self._terminate(
            identity.instance_id,
            actor=f"workload:{identity.issuer_name}",
            issuer=identity.issuer_name,
            workload=identity.workload,
            token_id=self._used_once(identity),
            reason=reason,
            self_terminated=True,
        )

    async def release(self, identity: Identity, lease_id: str) -> str:
        """What became of it: ``released``, ``lost``, ``expired`` or ``already ended``."""
        lease, _ = await self._own_lease(identity, lease_id)
        return await self._ends.release(lease)

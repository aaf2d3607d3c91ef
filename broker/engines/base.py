"""The interface every engine implements, and the checks shared by all of them.

An engine knows one Vault secrets engine: which path to call, which parameters a role may
template from the identity, which parameters a caller may send, how to turn Vault's answer
into the credential the caller gets, and whether that answer carries a Vault lease. It
does no I/O: ``broker.issuance`` calls Vault with the request the engine builds.

Adding an engine is one module with a subclass of ``Engine`` plus its entry in
``broker.engines.ENGINES``; config validation, the API and the OpenAPI document follow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from broker.aws import SessionRef, StsSession, WebIdentityRequest
from broker.errors import BadRequest, NotPermitted

if TYPE_CHECKING:  # for annotations only: a role checks itself against this interface
    from broker.engines.role import RoleSettings

# A caller parameter's check: takes the JSON value, returns the value to use, or raises
# ValueError with a message that says what to fix (never echoing the value).
CallerCheck = Callable[[Any], Any]


@dataclass(frozen=True)
class VaultRequest:
    method: str
    path: str  # already escaped, relative to /v1/
    body: dict[str, Any] | None
    ttl_applied: bool  # False when the engine cannot set a TTL per request


@dataclass(frozen=True)
class Plan:
    """Everything an engine decides about one request before anything is written or
    asked: made once, purely, from the role, the rendered templates and the caller's
    checked parameters. What can only follow Vault's answer (the cloud exchange, the
    credential's shape and expiry) stays with the engine, asked through the plan."""

    engine: Engine
    role: RoleSettings
    role_name: str
    instance_id: str
    request: VaultRequest  # carries the caller's checked parameters, where the mode takes any
    ttl: int  # the granted TTL, in seconds
    leased: bool  # Vault's answer must carry a lease the broker tracks, renews and revokes
    session_ref: SessionRef | None  # what termination denies at a cloud; None: nothing

    @property
    def kind(self) -> str:
        return self.engine.kind

    def exchange(self, answer: Mapping[str, Any]) -> WebIdentityRequest | None:
        return self.engine.exchange(self.role, self.instance_id, answer, self.ttl)

    def expires_at(self, answer: Mapping[str, Any]) -> datetime | None:
        return self.engine.expires_at(self.role, answer)

    def identifier(self, answer: Mapping[str, Any]) -> dict[str, str] | None:
        return self.engine.identifier(self.role, answer)

    def shape(
        self, answer: Mapping[str, Any], session: StsSession | None, expires_at: datetime
    ) -> dict[str, Any]:
        if session is not None:
            return self.engine.shape_session(self.role, session)
        self.engine.check_granted(self.role, answer, self.ttl)
        return self.engine.shape_expiring(self.role, answer, expires_at)


@dataclass(frozen=True)
class Mode:
    """What one mode of an engine (e.g. PKI ``issue`` or ``sign``) takes."""

    templates: frozenset[str] = frozenset()  # role params templated from the identity
    required_templates: frozenset[str] = frozenset()
    caller: Mapping[str, CallerCheck] = field(default_factory=dict)  # params a caller may send
    required_caller: frozenset[str] = frozenset()
    options: frozenset[str] = frozenset()  # fixed, untemplated role options
    required_options: frozenset[str] = frozenset()
    # Whether Vault answers with a lease the broker tracks, renews and revokes. A mode
    # without (a kv read, a GCP OAuth token) hands out a value no revocation takes back:
    # it is recorded as ``delivered`` and not counted against the lease limit.
    leased: bool = True


class Engine:
    name: ClassVar[str]  # the ``engine:`` value in a role
    kind: ClassVar[str]  # the credential kind callers see
    modes: ClassVar[Mapping[str, Mode]]  # the first is the default

    def mode(self, role: RoleSettings) -> Mode:
        return self.modes[role.mode or next(iter(self.modes))]

    def check_role(self, role: RoleSettings) -> None:
        """Engine-specific checks of a role's options at load time; raise ValueError."""

    def plan(
        self,
        role_name: str,
        role: RoleSettings,
        params: Mapping[str, str],
        caller: Mapping[str, Any],
        ttl: int,
        instance_id: str,
    ) -> Plan:
        """One request, decided before the ledger or Vault hears of it: ``params`` are the
        role's rendered templates, ``caller`` the caller's checked parameters. A refusal
        here (BadRequest, NotPermitted, UpstreamRejected for a path) writes nothing."""
        try:
            self.check_caller(role, params, caller)
        except ValueError as exc:
            raise BadRequest(str(exc), code="invalid_parameter") from None
        request = self.request(role, params, caller, ttl)
        leased = self.mode(role).leased
        try:
            ref = self.session_ref(role, params, instance_id)
        except ValueError as exc:
            raise NotPermitted(
                f"role {role_name!r} cannot be issued to this instance: {exc}",
                code="session_name_refused",
            ) from None
        return Plan(self, role, role_name, instance_id, request, ttl, leased, ref)

    def request(
        self,
        role: RoleSettings,
        params: Mapping[str, str],
        caller: Mapping[str, Any],
        ttl: int,
    ) -> VaultRequest:
        raise NotImplementedError

    def check_caller(
        self, role: RoleSettings, params: Mapping[str, str], caller: Mapping[str, Any]
    ) -> None:
        """Checks of caller parameters against the rendered templates (e.g. the names in
        a CSR); raise ValueError with a message that says what to fix."""

    def shape(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def identifier(self, role: RoleSettings, data: Mapping[str, Any]) -> dict[str, str] | None:
        """The credential's non-secret identifier in Vault's answer (a database username, a
        certificate serial), recorded with the lease: what an operator ends by hand if
        Vault forgets the lease, and what a direct check looks for. Never a secret; None
        (the default) when the engine has nothing to name."""
        return None

    def check_granted(self, role: RoleSettings, data: Mapping[str, Any], ttl: int) -> None:
        """Refuse (``NotPermitted``) a credential that would outlive the granted ``ttl``
        (the role's, a policy rule's cap, or the caller's) where nothing can end it sooner
        and Vault took no TTL (an OIDC token); by default there is nothing to check."""

    def shape_expiring(
        self, role: RoleSettings, data: Mapping[str, Any], expires_at: datetime
    ) -> dict[str, Any]:
        """The credential, for an engine whose answer must state its own expiry (an AWS
        key for ``credential_process``); by default ``shape``."""
        return self.shape(role, data)

    # -- credentials that come from a cloud, not from Vault ----------------------------

    def session_ref(
        self, role: RoleSettings, params: Mapping[str, str], instance_id: str
    ) -> SessionRef | None:
        """What termination must deny at a cloud for a lease of this role, known before
        anything is issued; None (the default): termination has nothing to do there.
        Raises ValueError if the instance cannot be named there."""
        return None

    def exchange(
        self, role: RoleSettings, instance_id: str, data: Mapping[str, Any], ttl: int
    ) -> WebIdentityRequest | None:
        """What to ask the cloud for with Vault's answer; None (the default): Vault's
        answer is the credential."""
        return None

    def shape_session(self, role: RoleSettings, session: StsSession) -> dict[str, Any]:
        """The credential, from the session ``exchange`` led to."""
        raise NotImplementedError

    def requires(self, role: RoleSettings) -> frozenset[str]:
        """The settings a role needs besides Vault, checked at load: ``aws`` (the broker's
        own AWS access) and ``entity`` (instance tokens with an identity entity). Nothing
        by default."""
        return frozenset()

    def revocable(self, role: RoleSettings) -> bool:
        """Whether revoking the Vault lease ends the credential. False for an AWS STS
        session: Vault's lease revocation does nothing at AWS, so releasing one must not
        free a slot under the lease limit while the session stays valid."""
        return True

    def expires_at(self, role: RoleSettings, data: Mapping[str, Any]) -> datetime | None:
        """When a credential without a Vault lease stops being valid, if it says so itself
        (an SSH certificate's ``valid_before``); None: the broker's grant says."""
        return None


def text_ref(data: Mapping[str, Any], **keys: str) -> dict[str, str] | None:
    """``{name: data[key]}`` for each ``name=key`` whose value is a non-empty string (at
    most 256 characters); None when none is. For ``Engine.identifier``."""
    out = {
        name: value
        for name, key in keys.items()
        if isinstance(value := data.get(key), str) and value and len(value) <= 256
    }
    return out or None


def validate_role(engine: Engine, role: RoleSettings) -> None:
    """Load-time checks of a role against its engine. Raises ValueError."""
    if role.mode is not None and role.mode not in engine.modes:
        raise ValueError(
            f"mode: engine {engine.name} has modes {', '.join(engine.modes)}; got {role.mode!r}"
        )
    mode = engine.mode(role)
    _names_within("params", engine, set(role.params), mode.templates, mode.required_templates)
    if role.request_params is not None:
        unknown = set(role.request_params) - set(mode.caller)
        if unknown:
            raise ValueError(
                f"request_params: engine {engine.name} lets a caller send "
                f"{', '.join(sorted(mode.caller)) or 'nothing'}; got {', '.join(sorted(unknown))}"
            )
        missing = mode.required_caller - set(role.request_params)
        if missing:
            raise ValueError(
                f"request_params: engine {engine.name} needs {', '.join(sorted(missing))} "
                "from the caller"
            )
    _names_within("options", engine, set(role.options), mode.options, mode.required_options)
    engine.check_role(role)


def _names_within(
    key: str, engine: Engine, given: set[str], allowed: frozenset[str], required: frozenset[str]
) -> None:
    unknown = given - allowed
    if unknown:
        raise ValueError(
            f"{key}: engine {engine.name} takes no {', '.join(sorted(unknown))}"
            f" (allowed: {', '.join(sorted(allowed)) or 'none'})"
        )
    missing = required - given
    if missing:
        raise ValueError(f"{key}: engine {engine.name} needs {', '.join(sorted(missing))}")


def caller_params_of(engine: Engine, role: RoleSettings) -> frozenset[str]:
    """The parameters a caller may send for this role: those the role lists, or by
    default those the engine's mode requires."""
    if role.request_params is not None:
        return frozenset(role.request_params)
    return engine.mode(role).required_caller


def read_caller_params(
    engine: Engine, role_name: str, role: RoleSettings, body: Mapping[str, Any]
) -> dict[str, Any]:
    """The caller's parameters from a request body (without ``role`` and ``ttl``), checked.
    Anything the role does not let the caller fill in is refused, never passed on."""
    allowed = caller_params_of(engine, role)
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(
            f"role {role_name!r} does not take {', '.join(sorted(unknown))} from a "
            f"request (it takes: {', '.join(sorted(allowed | {'role', 'ttl'}))})",
            code="unknown_parameter",
        )
    mode = engine.mode(role)
    missing = (mode.required_caller & allowed) - set(body)
    if missing:
        raise BadRequest(
            f"this role needs {', '.join(sorted(missing))} in the request", code="missing_parameter"
        )
    out: dict[str, Any] = {}
    for name, value in body.items():
        try:
            out[name] = mode.caller[name](value)
        except ValueError as exc:
            raise BadRequest(f"{name}: {exc}", code="invalid_parameter") from None
    return out

"""The broker's whole exception tree, and the HTTP status each maps to.

Every error a caller can see is a ``BrokerError`` with a stable ``code``. Foreign
exceptions (hvac, aiohttp, SQLAlchemy, PyJWT) are translated at the boundary of the
package that calls them; nothing above that boundary catches them.

    BrokerError
    ├── BadRequest                 400  malformed body, unknown field, bad ttl
    ├── TokenInvalid               401  identity token refused (code says why)
    ├── AdminUnauthorized          401  admin token missing or wrong
    ├── EventUnauthorized          401  event webhook: signature missing, wrong, stale or replayed
    ├── NotPermitted               403  policy refused the role for this identity
    │   └── Locked                 403  a lock refuses this identity or role (``lock_id``)
    ├── AdminForbidden             403  not an operator's token, or too small a scope
    ├── NotFound                   404  unknown lease/instance (or not the caller's)
    ├── InstanceTerminated         409  instance is tombstoned: nothing new is issued
    ├── LeaseLimitReached          409  the role's per-instance lease limit is reached
    ├── SelectionTooLarge          409  a bulk termination reaches more than its --max
    ├── LeaseNotLost               409  only a lost lease is marked resolved by an operator
    ├── UpstreamRejected           502  Vault refused a request the broker made
    ├── UpstreamUnavailable        503  Vault unreachable, sealed or timing out
    └── StoreUnavailable           503  the lease store cannot be reached

Messages say what to fix and never contain a token, credential or secret.
"""

from __future__ import annotations


class BrokerError(Exception):
    status: int = 500
    code: str = "internal_error"
    # The issuer an identity refusal is counted against (metrics), where it is known.
    issuer_name: str | None
    # Set where a call to Vault or a cloud fails: True when the request may have reached
    # it and taken effect (a timeout, a dropped connection), so its outcome is unknown.
    outcome_unknown: bool

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        outcome_unknown: bool = False,
        issuer_name: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.outcome_unknown = outcome_unknown
        self.issuer_name = issuer_name

    def details(self) -> dict[str, str]:
        """Fields the error body carries beside ``code`` and ``message``."""
        return {}


class BadRequest(BrokerError):
    status = 400
    code = "bad_request"


class TokenInvalid(BrokerError):
    status = 401
    code = "token_invalid"


class AdminUnauthorized(BrokerError):
    status = 401
    code = "admin_unauthorized"


class EventUnauthorized(BrokerError):
    status = 401
    code = "event_unauthorized"


class NotPermitted(BrokerError):
    status = 403
    code = "role_not_permitted"


class Locked(NotPermitted):
    """A lock refuses new credentials and renewals that match it; the body names it."""

    code = "locked"

    def __init__(self, lock_id: str) -> None:
        super().__init__(
            f"refused by lock {lock_id}: no new credential or renewal while it is in place "
            "(an operator removes it with 'brokerctl lock rm')"
        )
        self.lock_id = lock_id

    def details(self) -> dict[str, str]:
        return {"lock_id": self.lock_id}


class AdminForbidden(BrokerError):
    status = 403
    code = "admin_forbidden"


class NotFound(BrokerError):
    status = 404
    code = "not_found"


class InstanceTerminated(BrokerError):
    status = 409
    code = "instance_terminated"


class LeaseEnded(BrokerError):
    """Vault no longer knows the lease: it expired (``lease_expired``), or Vault forgot it
    before its expiry (``lease_lost``). Either way, a new credential is the way on."""

    status = 409
    code = "lease_expired"


class LeaseLimitReached(BrokerError):
    status = 409
    code = "lease_limit_reached"


class SelectionTooLarge(BrokerError):
    status = 409
    code = "selection_too_large"


class LeaseNotLost(BrokerError):
    """An operator marked a lease resolved that is not ``lost`` (nor resolved already)."""

    status = 409
    code = "lease_not_lost"


class UpstreamRejected(BrokerError):
    status = 502
    code = "vault_rejected"
    vault_errors: tuple[str, ...] = ()  # Vault's own error strings: for decisions, not callers
    http_status: int | None = None  # the upstream's status, where no code says more


class UpstreamUnavailable(BrokerError):
    status = 503
    code = "vault_unavailable"


class StoreUnavailable(BrokerError):
    status = 503
    code = "store_unavailable"


class RevocationWaiting(BrokerError):
    """Internal to revocation: a job must wait (for in-flight issuance), not fail. Never
    reaches a caller; a pass that only waited does not count as an attempt."""

    status = 503
    code = "revocation_waiting"


class ConfigError(Exception):
    """A configuration file or flag is wrong; the message names the key and what was expected."""


class StartupFailure(Exception):
    """The broker cannot start for a reason outside its configuration file: a port already
    in use, a lease store that does not answer. The message is the one line an operator
    reads; it says what is wrong where, and whether retrying can help."""

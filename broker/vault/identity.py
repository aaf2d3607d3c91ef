"""The broker's own Vault identity: how it logs in (a static token, AppRole, or a
Kubernetes/JWT service-account token read from a file), what it checks at start-up, and
how it stays logged in.

- Start-up: ``auth/token/lookup-self`` (a wrong, expired or revoked token stops start-up
  with one line naming the auth method and Vault's address), then
  ``sys/capabilities-self`` for the paths the broker needs: each missing capability is
  logged by path and capability. They are logged, not fatal: ``capabilities-self`` cannot
  see everything that decides a request (Sentinel/EGP policies, control groups), and a
  broker that refuses to start cannot revoke anything either; the ones issuance or
  revocation cannot do without are errors, the others (renewal, reconcile's listings)
  warnings.
- Upkeep: a login's token is replaced at 2/3 of its TTL (the token file is read afresh:
  projected tokens rotate); a renewable static token is renewed (``renew-self``) at 2/3 of
  what is left; a static token that can no longer be extended is reported as it nears its
  end (under a day, or a third of its TTL if that is less).
- Readiness asks ``valid``: the last ``lookup-self``'s answer, asked again at most every
  ``RECHECK_S`` seconds, or at once after a call made with the broker's token was refused
  (403). A login method logs in again there and then when Vault no longer knows its token.

The decisions (what a capabilities answer lacks, when to renew, when to report) are pure
functions; the class is the I/O around them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.errors import BrokerError, ConfigError, UpstreamRejected, UpstreamUnavailable
from broker.secret import Secret
from broker.vault.paths import vault_path
from broker.vault.settings import AppRoleAuth, TokenAuth, VaultSettings

log = logging.getLogger(__name__)

DAY_S = 86400
RECHECK_S = 30.0  # readiness asks Vault about the broker's token at most this often
WARN_EVERY_S = 3600.0  # an expiring token is reported at most this often
# What Vault answers, on lookup-self, for a token it does not know (or will not look up).
INVALID = ("permission denied", "invalid token", "bad token")

Call = Callable[..., Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Need:
    """A path the broker's token must reach, with what, and what fails without it."""

    path: str
    capabilities: tuple[str, ...]
    needed_to: str
    essential: bool  # issuance or revocation cannot do without it


def needs(token_role: str) -> tuple[Need, ...]:
    return (
        Need(f"auth/token/create/{token_role}", ("update",), "create instance tokens", True),
        Need("auth/token/revoke-accessor", ("update",), "revoke instance tokens", True),
        Need("sys/leases/revoke", ("update",), "revoke leases", True),
        Need("sys/leases/lookup", ("update",), "confirm revocations (look up leases)", True),
        Need("sys/leases/renew", ("update",), "renew leases", False),
        Need("sys/leases/lookup/*", ("list", "sudo"), "list Vault's leases (reconcile)", False),
        Need("sys/leases", ("read", "sudo"), "list irrevocable leases (reconcile)", False),
    )


@dataclass(frozen=True)
class Missing:
    need: Need
    lacking: tuple[str, ...]

    def line(self) -> str:
        return (
            f"the broker's Vault token lacks {'+'.join(self.lacking)} on "
            f"{self.need.path}: it cannot {self.need.needed_to}"
        )


def missing_capabilities(wanted: Sequence[Need], answer: Mapping[str, Any]) -> list[Missing]:
    """What ``sys/capabilities-self`` (its ``data``: path -> capabilities) says the token
    lacks. A path absent from the answer has nothing; ``deny`` takes everything away;
    ``root`` has everything."""
    found: list[Missing] = []
    for need in wanted:
        raw = answer.get(need.path)
        have = {str(c) for c in raw} if isinstance(raw, list) else set()
        if "root" in have and "deny" not in have:
            continue
        lacking = tuple(c for c in need.capabilities if "deny" in have or c not in have)
        if lacking:
            found.append(Missing(need, lacking))
    return found


def upkeep_in(ttl: int, *, login: bool, extendable: bool) -> float | None:
    """Seconds until the broker logs in again (a login method) or renews (a static token
    that can still be extended): 2/3 of the ``ttl`` left. None: nothing to do (a token
    that does not expire, or a static one that cannot be extended)."""
    if ttl <= 0 or not (login or extendable):
        return None
    return ttl * 2 / 3


def expiring_soon(left: float, creation_ttl: int) -> bool:
    """Whether a token that can no longer be extended, with ``left`` seconds to live, is
    to be reported: under a day, or under a third of its TTL if that is less."""
    threshold = min(DAY_S, creation_ttl / 3) if creation_ttl > 0 else DAY_S
    return left < threshold


def read_token_file(path: Path) -> str:
    """A login JWT from its file (a projected token: read at each login, it rotates)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"vault.auth.token_path {path}: cannot read it ({why})") from None
    if not text:
        raise ConfigError(f"vault.auth.token_path {path}: the file is empty")
    return text


class OwnToken:
    """The broker's own token: logged in, checked, kept alive. ``call`` is the Vault
    client's transport (``VaultClient._call``)."""

    def __init__(self, settings: VaultSettings, call: Call) -> None:
        self._settings = settings
        self._auth = settings.auth
        self._call = call
        self._token: Secret | None = None
        self._upkeep_at: float | None = None
        self._expires_at: float | None = None
        self._creation_ttl = 0
        self._extendable = True
        self._valid = True
        self._checked_at = float("-inf")
        self._suspect = False
        self._warned_at = float("-inf")
        self._lock = asyncio.Lock()
        self._unchecked = False  # Vault was out of reach at start-up: check at upkeep

    @property
    def token(self) -> Secret | None:
        return self._token

    def describe(self) -> str:
        """Which identity, for an operator: the auth method (and mount) and Vault's address."""
        auth = self._auth
        method = auth.method if isinstance(auth, TokenAuth) else f"{auth.method} at {auth.mount}"
        return f"auth method {method}, Vault {self._settings.addr}"

    @property
    def _is_login(self) -> bool:
        return not isinstance(self._auth, TokenAuth)

    # -- logging in ------------------------------------------------------------------

    async def login(self) -> None:
        auth = self._auth
        if isinstance(auth, TokenAuth):
            self._token = Secret(auth.token.get_secret_value())
            return
        if isinstance(auth, AppRoleAuth):
            body = {"role_id": auth.role_id, "secret_id": auth.secret_id.get_secret_value()}
        else:
            body = {"role": auth.role, "jwt": read_token_file(auth.token_path)}
        try:
            answer = await self._call(
                "POST", f"/v1/{vault_path('auth', auth.mount, 'login')}", token=None, json=body
            )
        except UpstreamRejected as exc:
            said = f": {exc.vault_errors[0][:200]}" if exc.vault_errors else ""
            err = UpstreamRejected(
                f"Vault refused the broker's login ({self.describe()}){said}", code=exc.code
            )
            err.vault_errors, err.http_status = exc.vault_errors, exc.http_status
            raise err from None
        info = answer.get("auth") or {}
        if not info.get("client_token"):
            raise UpstreamRejected("Vault's login answer has no token", code="vault_bad_response")
        self._token = Secret(str(info["client_token"]))
        ttl = int(info.get("lease_duration") or 0)
        self._adopt(ttl, creation_ttl=ttl)
        self._valid, self._suspect, self._checked_at = True, False, time.monotonic()
        log.info("logged in to Vault", extra={"auth": self._auth.method, "ttl_s": ttl})

    def _adopt(self, ttl: int, *, creation_ttl: int) -> None:
        now = time.monotonic()
        self._creation_ttl = creation_ttl
        self._expires_at = now + ttl if ttl > 0 else None
        wait = upkeep_in(ttl, login=self._is_login, extendable=self._extendable)
        self._upkeep_at = now + wait if wait is not None else None

    # -- start-up --------------------------------------------------------------------

    async def check(self) -> None:
        """Start-up: the token is valid (else ``vault_token_invalid``, one line), and may
        do what the broker needs (each gap logged). Vault unreachable here: logged, and the
        broker starts (readiness reports Vault). Only a static token (auth method
        ``token``) gets this far with Vault unreachable: a login method must log in first
        (``login``), which fails start-up when Vault does not answer."""
        try:
            data = await self._lookup()
        except UpstreamUnavailable:
            log.warning("could not check the broker's Vault token: Vault is unreachable")
            self._unchecked = True
            return
        self._unchecked = False
        if data is None:
            raise UpstreamRejected(
                f"Vault refused the broker's own token ({self.describe()}): it is wrong, "
                "expired or revoked (or its policies lack auth/token/lookup-self, which "
                "Vault's default policy grants)",
                code="vault_token_invalid",
            )
        if not self._is_login:
            self._extendable = bool(data.get("renewable"))
            self._adopt(int(data.get("ttl") or 0), creation_ttl=int(data.get("creation_ttl") or 0))
        self._warn_if_expiring()
        wanted = needs(self._settings.token_role)
        try:
            body = await self._call(
                "POST", "/v1/sys/capabilities-self", json={"paths": [n.path for n in wanted]}
            )
        except BrokerError:
            log.warning(
                "could not check the broker's Vault capabilities (sys/capabilities-self)"
            )
            return
        for gap in missing_capabilities(wanted, body.get("data") or body):
            log.log(
                logging.ERROR if gap.need.essential else logging.WARNING,
                gap.line(),
                extra={"vault_path": gap.need.path, "capabilities": ",".join(gap.lacking)},
            )

    async def _lookup(self) -> dict[str, Any] | None:
        """lookup-self's data, or None when Vault refuses the token (it is not valid)."""
        self._checked_at, self._suspect = time.monotonic(), False
        try:
            body = await self._call("GET", "/v1/auth/token/lookup-self", expected=INVALID)
        except UpstreamRejected as exc:
            if exc.code != "vault_permission_denied":
                raise
            self._valid, self._suspect = False, False
            return None
        self._valid = True
        data = body.get("data")
        return data if isinstance(data, dict) else {}

    # -- upkeep ----------------------------------------------------------------------

    def refused(self) -> None:
        """A call made with the broker's token was refused (403): look again."""
        self._suspect = True

    async def valid(self) -> bool:
        """False only on Vault's word that the token is not valid (readiness). While a
        login or a lookup is under way, the last answer: a probe does not wait for Vault."""
        if self._lock.locked():
            return self._valid
        if self._suspect or time.monotonic() - self._checked_at >= RECHECK_S:
            async with self._lock:
                if self._suspect or time.monotonic() - self._checked_at >= RECHECK_S:
                    await self._recheck()
        return self._valid

    async def _recheck(self) -> None:
        try:
            if await self._lookup() is None and self._is_login:
                await self.login()  # Vault forgot or revoked it: a new one at once
        except (BrokerError, ConfigError) as exc:
            log.warning("could not check the broker's Vault token", extra={"error": _why(exc)})

    async def maintain(self) -> None:
        """Periodic: log in again or renew when due; look again after a refusal; report
        a token that nears its end and cannot be extended."""
        async with self._lock:
            if self._unchecked:
                try:
                    await self.check()  # its TTL and capabilities, as at start-up
                except BrokerError as exc:
                    log.warning(
                        "could not check the broker's Vault token", extra={"error": _why(exc)}
                    )
            if self._suspect or not self._valid:
                await self._recheck()
            if self._upkeep_at is not None and time.monotonic() >= self._upkeep_at:
                try:
                    await (self.login() if self._is_login else self._renew())
                except (BrokerError, ConfigError) as exc:
                    log.warning(
                        "could not renew the broker's Vault login; retrying",
                        extra={"auth": self._auth.method, "error": _why(exc)},
                    )
            self._warn_if_expiring()

    async def _renew(self) -> None:
        body = await self._call("POST", "/v1/auth/token/renew-self", json={})
        info = body.get("auth") or {}
        ttl = int(info.get("lease_duration") or 0)
        left = self.expires_in()
        if not info.get("renewable") or (left is not None and ttl <= left + 1):
            self._extendable = False  # at its max TTL: renewing cannot extend it
        self._adopt(ttl, creation_ttl=self._creation_ttl)

    def expires_in(self) -> float | None:
        """Seconds the token has left, as last learnt; None: it does not expire."""
        if self._expires_at is None:
            return None
        return max(0.0, self._expires_at - time.monotonic())

    def _warn_if_expiring(self) -> None:
        left = self.expires_in()
        if left is None or self._is_login or self._extendable:
            return
        now = time.monotonic()
        if expiring_soon(left, self._creation_ttl) and now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "the broker's Vault token expires soon and cannot be renewed: "
                "give the broker a new one",
                extra={"expires_in_s": int(left)},
            )


def _why(exc: BaseException) -> str:
    """A failure's name for a log line: a broker error's code, else the exception's type
    (never its text, which could quote what was sent)."""
    return exc.code if isinstance(exc, BrokerError) else type(exc).__name__

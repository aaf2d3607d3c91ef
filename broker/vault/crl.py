"""A PKI mount's certificate revocation list, read to confirm directly that a certificate
is revoked when Vault no longer knows its lease (restored from an older snapshot, a
mount re-enabled): a serial on the CRL is dead whatever the lease table says.

``<mount>/cert/crl`` is one of the PKI engine's unauthenticated paths (the broker's
policy needs nothing for it); it answers the default issuer's CRL as PEM in JSON. The
broker never holds a certificate's key to ask anything else.

It shares the broker's ``VaultClient`` transport (its session and error translation); a
class of its own keeps the client's surface to the credential calls.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

from cryptography import x509

from broker.errors import UpstreamRejected
from broker.vault.client import VaultClient
from broker.vault.paths import vault_path

# Vault writes serials as colon-separated hex pairs ("1a:2b:..."); some tools write them
# with dashes, as bare hex, or as a decimal integer.
_HEX_PAIRS = re.compile(r"^[0-9a-fA-F]{1,2}([:-][0-9a-fA-F]{1,2})*\Z")
_HEX = re.compile(r"^(0x)?[0-9a-fA-F]+\Z")
_MAX_SERIAL_BITS = 20 * 8 + 8  # RFC 5280: at most 20 octets (some CAs add a sign octet)


def parse_serial(value: object) -> int:
    """A certificate serial as an integer, from Vault's ``aa:bb:...`` form, the same with
    dashes, bare hex (``0x`` allowed) or an integer. Raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a certificate serial is not a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip()
        if _HEX_PAIRS.match(text) and (":" in text or "-" in text):
            number = int("".join(p.rjust(2, "0") for p in re.split(r"[:-]", text)), 16)
        elif _HEX.match(text):
            number = int(text.lower().removeprefix("0x"), 16)
        else:
            raise ValueError("expected a certificate serial such as 1a:2b:3c")
    else:
        raise ValueError("expected a certificate serial such as 1a:2b:3c")
    if number < 0 or number.bit_length() > _MAX_SERIAL_BITS:
        raise ValueError("a certificate serial is a positive number of at most 20 octets")
    return number


def format_serial(number: int) -> str:
    """An integer serial in Vault's form: lower-case hex pairs joined by colons."""
    raw = number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")
    return ":".join(f"{b:02x}" for b in raw)


def pki_mount(path: str) -> str | None:
    """The PKI mount of a credential path (``pki/issue/web`` → ``pki``, ``team/pki/sign/x``
    → ``team/pki``); None if the path is no PKI issue or sign path."""
    segments = path.strip("/").split("/")
    for i in range(len(segments) - 2, 0, -1):
        if segments[i] in ("issue", "sign") and all(segments[:i]):
            return "/".join(segments[:i])
    return None


def revoked_serials(crl_pem: str) -> frozenset[int]:
    """Every serial a PEM CRL lists. Raises ValueError if it is not one."""
    try:
        crl = x509.load_pem_x509_crl(crl_pem.encode())
        return frozenset(entry.serial_number for entry in crl)
    except Exception:  # cryptography raises ValueError and its own parse errors alike
        raise ValueError("not a PEM certificate revocation list") from None


# How long a fetched CRL answers for its mount: a pass that meets many lost leases of one
# mount downloads and parses it once. A stale CRL can only miss a recent revocation (a
# serial never leaves the CRL before its certificate expires), which leaves a lease `lost`,
# never wrongly `revoked`.
CRL_MAX_AGE_S = 5.0


class Crl:
    def __init__(
        self,
        vault: VaultClient,
        *,
        max_age_s: float = CRL_MAX_AGE_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._vault = vault
        self._max_age_s = max_age_s
        self._now = monotonic
        self._cached: dict[str, tuple[float, frozenset[int]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def revoked(self, mount: str) -> frozenset[int]:
        """The serials on ``mount``'s (default issuer's) CRL, fetched at most
        ``max_age_s`` ago; concurrent askers of one mount share one fetch. A failed fetch
        is not remembered."""
        lock = self._locks.setdefault(mount, asyncio.Lock())
        async with lock:
            cached = self._cached.get(mount)
            if cached is not None and self._now() - cached[0] < self._max_age_s:
                return cached[1]
            serials = await self._fetch(mount)
            self._cached[mount] = (self._now(), serials)
            return serials

    async def _fetch(self, mount: str) -> frozenset[int]:
        body = await self._vault._call(  # noqa: SLF001 — the package's own transport
            "GET", f"/v1/{vault_path(*mount.split('/'), 'cert', 'crl')}"
        )
        data = body.get("data") or {}
        pem = str(data.get("certificate") or "")
        try:
            return revoked_serials(pem)
        except ValueError:
            raise UpstreamRejected(
                f"Vault returned no CRL for the PKI mount {mount!r}", code="vault_bad_response"
            ) from None

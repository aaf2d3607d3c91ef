"""Token verification, with every decision spelled out. Pure: no I/O, time is passed in.

The order matters. Size is checked before any parsing. The header is parsed by hand and
held to an allow-list (keys come only from configuration, so ``jwk``/``jku``/``x5u``/``x5c``
and ``crit`` are refused, as are encrypted and nested tokens). The issuer is chosen by an
exact match on the unverified ``iss``; from then on only that issuer's pinned algorithms
and keys are used, and the key's type must match the algorithm (no HMAC with a public
key, no RSA key under an EC algorithm). PyJWT then checks the signature and the
registered claims with every option set explicitly.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from broker.errors import TokenInvalid
from broker.identity.model import Identity
from broker.identity.settings import ALLOWED_ALGORITHMS, ClaimJoin, ClaimSpec, IssuerSettings

# Header parameters that may appear. Everything else (jwk, jku, x5u, x5c, crit, b64,
# cty, enc, zip, …) is refused: either it would let the token choose its own key or it
# changes how the token must be processed.
ALLOWED_HEADER_KEYS = frozenset({"alg", "kid", "typ", "x5t", "x5t#S256"})
MIN_RSA_BITS = 2048
# May hold '/' (SPIFFE IDs): instance ids reach Vault only as token metadata, never in a
# path, and the admin API takes them percent-encoded.
INSTANCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,253}\Z")
WORKLOAD_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,253}\Z")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*\Z")


def _finite_number(value: Any) -> bool:
    # JSON allows NaN and Infinity through Python's parser; every comparison with NaN is
    # False, which would silently skip a time check.
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) < 1e11
    )


def refuse(code: str, message: str) -> TokenInvalid:
    return TokenInvalid(message, code=code)


@dataclass(frozen=True)
class Unverified:
    """What can be read from a token before its signature is checked. Never trusted,
    only used to pick the issuer configuration and the key."""

    header: Mapping[str, Any]
    issuer: str
    alg: str
    kid: str | None
    payload: Mapping[str, Any]


def _b64decode(segment: str) -> bytes:
    if not _B64URL.match(segment):
        raise refuse("token_malformed", "the token is not three base64url segments")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise refuse("token_malformed", "the token is not three base64url segments") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise refuse("token_malformed", "the token has a duplicate JSON member")
        out[key] = value
    return out


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except TokenInvalid:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise refuse("token_malformed", f"the token {what} is not JSON") from None
    if not isinstance(value, dict):
        raise refuse("token_malformed", f"the token {what} is not a JSON object")
    return value


def inspect_token(raw: str, *, max_bytes: int) -> Unverified:
    """Parse what is needed to choose an issuer and a key. Refuses early and cheaply."""
    if len(raw) > max_bytes:
        raise refuse("token_too_large", f"the token is larger than {max_bytes} bytes")
    if not raw.isascii():
        raise refuse("token_malformed", "the token is not ASCII")
    parts = raw.split(".")
    if len(parts) == 5:
        raise refuse("token_encrypted", "encrypted tokens (JWE) are not accepted")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise refuse("token_malformed", "the token is not three base64url segments")
    header = _json_object(_b64decode(parts[0]), "header")
    extra = set(header) - ALLOWED_HEADER_KEYS
    if extra:
        # Name only fixed, known parameter names: never echo attacker-chosen text.
        known = sorted(
            k
            for k in extra
            if k in {"jwk", "jku", "x5u", "x5c", "crit", "cty", "b64", "enc", "zip"}
        )
        detail = ", ".join(known) if known else "an unknown parameter"
        raise refuse(
            "token_header_refused",
            f"the token header carries {detail}; "
            "keys come only from the issuer's configured key set",
        )
    # JWT-SVIDs may say JOSE; access tokens at+jwt.
    if header.get("typ") not in (None, "JWT", "jwt", "JOSE", "at+jwt", "application/at+jwt"):
        raise refuse("token_header_refused", "the token type is not JWT")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        raise refuse(
            "token_algorithm_refused",
            "the token's algorithm is not one the broker accepts "
            f"({', '.join(ALLOWED_ALGORITHMS)}); 'none' and HMAC never are",
        )
    if not parts[2]:
        raise refuse("token_malformed", "the token is not signed")
    if not _B64URL.match(parts[2]):
        # PyJWT would accept '=' padding: one token, several spellings. Refuse them.
        raise refuse("token_malformed", "the token is not three base64url segments")
    kid = header.get("kid")
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= 256):
        raise refuse("token_malformed", "the token's kid is not a short string")
    payload = _json_object(_b64decode(parts[1]), "payload")
    iss = payload.get("iss")
    if not isinstance(iss, str) or not iss:
        raise refuse("token_missing_claim", "the token has no 'iss' claim")
    return Unverified(header=header, issuer=iss, alg=alg, kid=kid, payload=payload)


def key_matches_algorithm(key: Any, alg: str) -> bool:
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS
    if alg == "ES256":
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    if alg == "ES384":
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def claim_at(claims: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = claims
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


_PART = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}\Z")


def valid_instance_id(value: str) -> bool:
    """The instance-id alphabet, and no '.' or '..' path segment: a proxy in front of the
    admin API that normalises paths must not be able to turn one id into another."""
    return bool(INSTANCE_ID_PATTERN.match(value)) and not any(
        seg in (".", "..") for seg in value.split("/")
    )


def _claim_text(claims: Mapping[str, Any], path: tuple[str, ...], what: str) -> str:
    value = claim_at(claims, path)
    if isinstance(value, bool) or value is None:
        raise refuse(
            "token_missing_claim", f"the token has no '{'.'.join(path)}' claim for the {what}"
        )
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str):
        raise refuse(
            "token_claim_invalid", f"the token's '{'.'.join(path)}' claim is not a valid {what}"
        )
    return value


def _mapped(claims: Mapping[str, Any], spec: ClaimSpec, what: str, pattern: re.Pattern[str]) -> str:
    if isinstance(spec, ClaimJoin):
        parts = []
        for path in spec.join:
            part = _claim_text(claims, path, what)
            # A part holding the separator could make two different claim sets one
            # value ("1-2" + "3" and "1" + "2-3"): refused, not joined ambiguously.
            if not _PART.match(part) or spec.separator in part:
                raise refuse(
                    "token_claim_invalid",
                    f"the token's '{'.'.join(path)}' claim is not a valid part of the {what}",
                )
            parts.append(part)
        value = spec.separator.join(parts)
        shown = "+".join(".".join(p) for p in spec.join)
    else:
        value = _claim_text(claims, spec, what)
        shown = ".".join(spec)
    if not pattern.match(value):
        raise refuse("token_claim_invalid", f"the token's '{shown}' claim is not a valid {what}")
    return value


_SPIFFE_ID = re.compile(r"^spiffe://([a-z0-9._-]{1,255})((?:/[A-Za-z0-9._-]+)+)\Z")


def _instance(claims: Mapping[str, Any], issuer: IssuerSettings) -> str:
    value = _mapped(claims, issuer.instance_claim, "instance id", INSTANCE_ID_PATTERN)
    if not valid_instance_id(value):
        raise refuse("token_claim_invalid", "the token's instance id has a '.' or '..' segment")
    return value


@dataclass(frozen=True)
class MappedClaims:
    """Who a set of claims names under an issuer's claim mapping."""

    subject: str
    instance_id: str
    workload: str


def map_claims(
    claims: Mapping[str, Any], issuer: IssuerSettings, *, instance_optional: bool = False
) -> MappedClaims:
    """The issuer's claim mapping alone: the subject, the instance id and the workload the
    claims name. It checks no signature, time, audience or kind rule: ``verify_signed``
    calls it on claims it has verified, a policy preview on claims an admin supplies. With
    ``instance_optional`` a missing instance claim maps to "" (a pod being admitted has no
    uid yet); one that is present but not a valid instance id is refused all the same."""
    subject = claims.get("sub")
    try:
        instance_id = _instance(claims, issuer)
    except TokenInvalid as exc:
        if not (instance_optional and exc.code == "token_missing_claim"):
            raise
        instance_id = ""
    return MappedClaims(
        subject=subject if isinstance(subject, str) else "",
        instance_id=instance_id,
        workload=_mapped(claims, issuer.workload_claim, "workload name", WORKLOAD_PATTERN),
    )


def _check_kind_before(unverified: Unverified, issuer: IssuerSettings) -> None:
    """Refusals that read best before the signature check, with a message that says what
    to do. (The token is refused either way.)"""
    if issuer.kind == "kubernetes":
        legacy = "kubernetes.io/serviceaccount/namespace" in unverified.payload
        if legacy or "exp" not in unverified.payload:
            raise refuse(
                "token_legacy_serviceaccount",
                "legacy service-account tokens never expire and are bound to no pod; mount a "
                "projected serviceAccountToken with the broker's audience instead",
            )


def _check_kind_after(claims: Mapping[str, Any], issuer: IssuerSettings) -> None:
    if issuer.kind == "kubernetes":
        pod = claim_at(claims, ("kubernetes.io", "pod"))
        if not isinstance(pod, Mapping) or not isinstance(pod.get("uid"), str):
            raise refuse(
                "token_not_pod_bound",
                "the service-account token is not bound to a pod; use a projected token",
            )
    elif issuer.kind == "spiffe":
        match = _SPIFFE_ID.match(str(claims.get("sub", "")))
        segments = match.group(2).split("/")[1:] if match else []
        if match is None or any(seg in (".", "..") for seg in segments):
            raise refuse("token_claim_invalid", "the token's 'sub' is not a SPIFFE ID")
        if match.group(1) != issuer.trust_domain:
            raise refuse(
                "token_wrong_trust_domain",
                f"the SPIFFE ID is not in trust domain {issuer.trust_domain}",
            )


_PYJWT_CODES: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.ExpiredSignatureError, "token_expired", "the token has expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "the token is not valid yet (nbf/iat)"),
    (
        jwt.InvalidAudienceError,
        "token_wrong_audience",
        "the token's 'aud' does not include the broker's audience",
    ),
    (jwt.InvalidIssuerError, "token_wrong_issuer", "the token's 'iss' is not this issuer"),
    (
        jwt.MissingRequiredClaimError,
        "token_missing_claim",
        "the token lacks a required claim (exp, iat, iss, aud)",
    ),
    (jwt.InvalidSignatureError, "token_bad_signature", "the token's signature does not verify"),
    (jwt.InvalidAlgorithmError, "token_algorithm_refused", "the token's algorithm is refused"),
    (jwt.DecodeError, "token_malformed", "the token could not be decoded"),
)


def verify_signed(
    raw: str,
    unverified: Unverified,
    issuer: IssuerSettings,
    key: Any,
    *,
    audience: str,
    now: datetime,
) -> Identity:
    """Check signature and claims of a token whose issuer and key were chosen already."""
    claims = verify_claims(raw, unverified, issuer, key, audience=audience, now=now)
    iat, exp, jti = claims["iat"], claims["exp"], claims.get("jti")
    mapped = map_claims(claims, issuer)
    return Identity(
        issuer_name=issuer.name,
        issuer=issuer.issuer,
        subject=mapped.subject,
        instance_id=mapped.instance_id,
        workload=mapped.workload,
        issued_at=datetime.fromtimestamp(iat, UTC),
        expires_at=datetime.fromtimestamp(exp, UTC),
        claims=MappingProxyType(claims),
        jti=jti,
        replay_key=jti if issuer.replay != "off" else None,
    )


def verify_claims(
    raw: str,
    unverified: Unverified,
    issuer: IssuerSettings,
    key: Any,
    *,
    audience: str,
    now: datetime,
) -> dict[str, Any]:
    """The signature, algorithm, key type, audience, issuer, times, lifetime and the kind's
    rules of a token whose issuer and key were chosen already: its verified claims, not
    yet mapped to an instance (an operator's token names a person, not an instance)."""
    if len(raw) > issuer.max_token_bytes:
        raise refuse("token_too_large", f"the token is larger than {issuer.max_token_bytes} bytes")
    if unverified.alg not in issuer.algorithms:
        raise refuse(
            "token_algorithm_refused",
            f"issuer {issuer.name} accepts only {', '.join(issuer.algorithms)}",
        )
    if not key_matches_algorithm(key, unverified.alg):
        raise refuse("token_key_mismatch", "the key named by the token does not fit its algorithm")
    _check_kind_before(unverified, issuer)
    try:
        claims = jwt.decode(
            raw,
            key=key,
            algorithms=[unverified.alg],
            audience=audience,
            issuer=issuer.issuer,
            leeway=issuer.leeway_s,
            options={
                "verify_signature": True,
                # Time is checked below against the injected clock, not PyJWT's.
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": True,
                "verify_iss": True,
                "require": ["exp", "iat", "iss", "aud"],
            },
        )
    except jwt.PyJWTError as exc:
        for kind, code, message in _PYJWT_CODES:
            if isinstance(exc, kind):
                raise refuse(code, message) from None
        raise refuse("token_invalid", "the token was refused") from None
    exp, iat, nbf = claims["exp"], claims["iat"], claims.get("nbf")
    if not all(_finite_number(v) for v in (exp, iat)) or (
        nbf is not None and not _finite_number(nbf)
    ):
        raise refuse("token_malformed", "the token's exp, iat and nbf must be finite numbers")
    nowts = now.timestamp()
    if exp + issuer.leeway_s < nowts:
        raise refuse("token_expired", "the token has expired")
    if iat - issuer.leeway_s > nowts:
        raise refuse("token_not_yet_valid", "the token was issued in the future")
    if nbf is not None and nbf - issuer.leeway_s > nowts:
        raise refuse("token_not_yet_valid", "the token is not valid yet (nbf)")
    if exp - iat > issuer.max_token_lifetime:
        raise refuse(
            "token_lifetime_too_long",
            f"the token is valid for longer than {issuer.max_token_lifetime}s; "
            "ask the issuer for a shorter-lived token",
        )
    _check_kind_after(claims, issuer)
    jti = claims.get("jti")
    if jti is not None and (not isinstance(jti, str) or not 0 < len(jti) <= 255):
        raise refuse("token_claim_invalid", "the token's jti is not a short string")
    if jti is None and issuer.replay == "require_jti_once":
        raise refuse(
            "token_missing_claim",
            "the token has no 'jti' claim; this issuer "
            "requires one so that each token is used once",
        )
    return claims

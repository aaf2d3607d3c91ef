"""Each identity source end to end: real keys, real signed tokens in the shape each issuer
really emits, keys fetched over HTTP from a loopback server (or read from a file), and the
whole ``Identity`` checked.

The verifier is the production ``IdentityVerifier`` with a ``FixedClock``; its key caches
get a monotonic clock the test moves (``JwksCache`` is swapped for a partial that injects
it), so cooldowns and cache lifetimes are exercised without sleeping.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

import broker.identity.verifier as verifier_module
from broker.clock import FixedClock
from broker.errors import TokenInvalid, UpstreamUnavailable
from broker.identity.jwks import JwksCache
from broker.identity.model import Identity
from broker.identity.settings import IdentitySettings, IssuerSettings
from broker.identity.verifier import IdentityVerifier
from tests.unit.identity.tokenkit import AUDIENCE, NOW, NOW_TS, RSA2048, Monotonic

UTC = dt.UTC
IAT = NOW_TS - 60
ISSUED = dt.datetime(2030, 6, 1, 11, 59, 0, tzinfo=UTC)  # NOW - 60 s

# ------------------------------------------------------------------ keys

RSA_B = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_A = ec.generate_private_key(ec.SECP256R1())
EC_B = ec.generate_private_key(ec.SECP256R1())
EC_C = ec.generate_private_key(ec.SECP256R1())
SPIFFE_CA = ec.generate_private_key(ec.SECP256R1())  # the X.509-SVID CA: never a JWT key


def jwk(key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = json.loads(RSAAlgorithm.to_jwk(public))
    else:
        data = json.loads(ECAlgorithm.to_jwk(public))
    data.pop("key_ops", None)
    if kid is not None:
        data["kid"] = kid
    data.update(extra)
    return data


def x509_ca_cert(key: ec.EllipticCurvePrivateKey) -> str:
    """A self-signed SPIFFE X.509 CA certificate, base64 DER as a bundle's x5c holds it."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2030, 1, 1, tzinfo=UTC))
        .not_valid_after(dt.datetime(2031, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def sign(payload: dict[str, Any], key: Any, alg: str, kid: str | None,
         **header: Any) -> str:
    headers: dict[str, Any] = dict(header)
    if kid is not None:
        headers["kid"] = kid
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


# ------------------------------------------------------------------ the loopback issuer


class Idp:
    """Serves whatever JSON document the test puts at a path; counts every request."""

    def __init__(self) -> None:
        self.docs: dict[str, Any] = {}
        self.hits: Counter[str] = Counter()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        if request.path not in self.docs:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response(self.docs[request.path])

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def idp() -> AsyncIterator[Idp]:
    server = Idp()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def mono() -> Monotonic:
    return Monotonic(5000.0)


@pytest.fixture
def make_verifier(monkeypatch: pytest.MonkeyPatch, session: aiohttp.ClientSession,
                  mono: Monotonic) -> Callable[..., IdentityVerifier]:
    # The verifier builds its caches itself; give them the test's monotonic clock.
    monkeypatch.setattr(verifier_module, "JwksCache", functools.partial(JwksCache,
                                                                        monotonic=mono))

    def make(*issuers: IssuerSettings) -> IdentityVerifier:
        settings = IdentitySettings(audience=AUDIENCE, issuers=issuers)
        return IdentityVerifier(settings, session, FixedClock(NOW))

    return make


async def refusal(verifier: IdentityVerifier, raw: str) -> str:
    with pytest.raises(TokenInvalid) as caught:
        await verifier.verify(raw)
    assert caught.value.status == 401
    return caught.value.code


async def unavailable(verifier: IdentityVerifier, raw: str) -> str:
    with pytest.raises(UpstreamUnavailable) as caught:
        await verifier.verify(raw)
    assert caught.value.status == 503
    return caught.value.code


# ================================================================== generic OIDC

DISCOVERY = "/.well-known/openid-configuration"
KEYS = "/oauth2/v1/keys"


def oidc_issuer(idp: Idp) -> IssuerSettings:
    return IssuerSettings(
        name="corp-idp",
        issuer=idp.base,
        discovery=True,
        algorithms=("RS256",),
        instance_claim={"join": [["tenant"], ["vm_id"]], "separator": ":"},
        workload_claim="client_id",
    )


def oidc_claims(idp: Idp) -> dict[str, Any]:
    return {
        "iss": idp.base,
        "aud": AUDIENCE,
        "sub": "00u1a2b3c4d5e6f7g8h9",
        "client_id": "reporting",
        "tenant": "acme",
        "vm_id": "vm-0042",
        "iat": IAT,
        "nbf": IAT,
        "exp": IAT + 900,
        "jti": "ID.9c3f1a0e-oidc",
    }


async def test_generic_oidc_discovery_finds_the_keys_and_yields_the_identity(
        idp: Idp, make_verifier: Callable[..., IdentityVerifier]) -> None:
    idp.docs[DISCOVERY] = {
        "issuer": idp.base,
        "jwks_uri": idp.url(KEYS),
        "authorization_endpoint": idp.url("/oauth2/v1/authorize"),
        "response_types_supported": ["code", "id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    idp.docs[KEYS] = {"keys": [jwk(RSA_B, "rot-2", alg="RS256", use="sig"),
                               jwk(RSA2048, "rot-1", alg="RS256", use="sig")]}
    settings = oidc_issuer(idp)
    verifier = make_verifier(settings)
    payload = oidc_claims(idp)

    identity = await verifier.verify(sign(payload, RSA2048, "RS256", "rot-1"))

    assert identity == Identity(
        issuer_name="corp-idp",
        issuer=idp.base,
        subject="00u1a2b3c4d5e6f7g8h9",
        instance_id="acme:vm-0042",
        workload="reporting",
        issued_at=ISSUED,
        expires_at=dt.datetime(2030, 6, 1, 12, 14, 0, tzinfo=UTC),
        claims=payload,
        jti="ID.9c3f1a0e-oidc",
        replay_key="ID.9c3f1a0e-oidc",
    )
    assert idp.hits == {DISCOVERY: 1, KEYS: 1}
    # The other key of the set works too, without another fetch.
    other = await verifier.verify(sign({**payload, "vm_id": "vm-7"}, RSA_B, "RS256", "rot-2"))
    assert other.instance_id == "acme:vm-7"
    assert idp.hits == {DISCOVERY: 1, KEYS: 1}


@pytest.mark.parametrize(
    "named",
    [{"issuer": "https://idp.attacker.example"}, {"issuer": "TRAILING/"}, {}],
    ids=["another-issuer", "issuer-with-trailing-slash", "no-issuer"],
)
async def test_discovery_document_naming_another_issuer_is_not_followed(
        named: dict[str, str], idp: Idp,
        make_verifier: Callable[..., IdentityVerifier]) -> None:
    if named.get("issuer") == "TRAILING/":
        named = {"issuer": idp.base + "/"}
    idp.docs[DISCOVERY] = {**named, "jwks_uri": idp.url(KEYS)}
    idp.docs[KEYS] = {"keys": [jwk(RSA2048, "rot-1", alg="RS256")]}
    verifier = make_verifier(oidc_issuer(idp))

    assert await unavailable(verifier, sign(oidc_claims(idp), RSA2048, "RS256",
                                            "rot-1")) == "jwks_unavailable"
    # The key set it pointed at was never fetched, so no key from it was used.
    assert idp.hits == {DISCOVERY: 1}
    assert verifier.caches[0].stats.outcomes == {"failure": 1}


async def test_generic_oidc_static_jwks_uri(idp: Idp,
                                            make_verifier: Callable[..., IdentityVerifier]
                                            ) -> None:
    idp.docs["/jwks.json"] = {"keys": [jwk(EC_A, "es-1", alg="ES256", use="sig")]}
    settings = IssuerSettings(name="login", issuer="https://login.corp.example",
                              jwks_uri=idp.url("/jwks.json"), algorithms=("ES256",),
                              instance_claim=["ext", "host_id"], workload_claim="azp",
                              replay="off")
    payload = {"iss": "https://login.corp.example", "aud": [AUDIENCE, "https://api.corp"],
               "sub": "batch", "azp": "batch-exporter", "ext": {"host_id": "h-17"},
               "iat": IAT, "exp": IAT + 300, "jti": "j-1"}

    identity = await make_verifier(settings).verify(sign(payload, EC_A, "ES256", "es-1"))

    assert identity == Identity(
        issuer_name="login", issuer="https://login.corp.example", subject="batch",
        instance_id="h-17", workload="batch-exporter", issued_at=ISSUED,
        expires_at=dt.datetime(2030, 6, 1, 12, 4, 0, tzinfo=UTC), claims=payload,
        jti="j-1", replay_key=None)
    assert idp.hits == {"/jwks.json": 1}


async def test_jwks_file_is_read_and_key_rotation_in_the_file_is_followed(
        tmp_path: Path, mono: Monotonic,
        make_verifier: Callable[..., IdentityVerifier]) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(EC_A, "f-1")]}))
    settings = IssuerSettings(name="airgap", issuer="https://airgap.internal",
                              jwks_file=path, algorithms=("ES256",),
                              instance_claim="host", workload_claim="sub",
                              jwks_cache_ttl_s=300, jwks_refresh_cooldown_s=30)
    verifier = make_verifier(settings)
    cache = verifier.caches[0]

    def payload(host: str) -> dict[str, Any]:
        return {"iss": "https://airgap.internal", "aud": AUDIENCE, "sub": "backup",
                "host": host, "iat": IAT, "exp": IAT + 600}

    def tok(key: Any, kid: str, host: str) -> str:
        return sign(payload(host), key, "ES256", kid)

    identity = await verifier.verify(tok(EC_A, "f-1", "db-1"))
    assert identity == Identity(
        issuer_name="airgap", issuer="https://airgap.internal", subject="backup",
        instance_id="db-1", workload="backup", issued_at=ISSUED,
        expires_at=dt.datetime(2030, 6, 1, 12, 9, 0, tzinfo=UTC), claims=payload("db-1"),
        jti=None, replay_key=None)

    # Rotation: f-1 out, f-2 in. Inside the cooldown the file is not read again.
    path.write_text(json.dumps({"keys": [jwk(EC_B, "f-2")]}))
    mono.advance(29)
    assert await refusal(verifier, tok(EC_B, "f-2", "db-2")) == "token_unknown_key"
    assert (await verifier.verify(tok(EC_A, "f-1", "db-1"))).instance_id == "db-1"
    assert cache.stats.attempts == 1

    # Past the cooldown the unknown kid causes one re-read: the new key is used, the old
    # one is gone.
    mono.advance(1)
    assert (await verifier.verify(tok(EC_B, "f-2", "db-2"))).instance_id == "db-2"
    assert await refusal(verifier, tok(EC_A, "f-1", "db-1")) == "token_unknown_key"
    assert cache.stats.attempts == 2

    # A rotation is also noticed when the cached set expires (TTL), with no unknown kid.
    path.write_text(json.dumps({"keys": [jwk(EC_C, "f-3")]}))
    mono.advance(300)
    assert await refusal(verifier, tok(EC_B, "f-2", "db-2")) == "token_unknown_key"
    assert cache.stats.attempts == 3
    assert (await verifier.verify(tok(EC_C, "f-3", "db-3"))).instance_id == "db-3"
    assert cache.stats.outcomes == {"success": 3}

    # The file vanishing keeps the last good keys in use.
    path.unlink()
    mono.advance(300)
    assert (await verifier.verify(tok(EC_C, "f-3", "db-3"))).instance_id == "db-3"
    assert cache.stats.outcomes == {"success": 3, "failure": 1}


# ================================================================== Kubernetes

K8S_ISS = "https://kubernetes.default.svc.cluster.local"
K8S_JWKS = "/openid/v1/jwks"
POD_UID = "5f0c3a4e-8c1b-4b8e-9a57-3f2d1c0b9e77"
SA_UID = "a8d6f1e2-2c4b-4f3a-b1d9-0e7c6b5a4d3c"


def k8s_issuer(idp: Idp, issuer: str = K8S_ISS) -> IssuerSettings:
    return IssuerSettings(name="cluster-a", issuer=issuer, kind="kubernetes",
                          jwks_uri=idp.url(K8S_JWKS), algorithms=("RS256",))


def projected(binding: dict[str, Any] | None) -> dict[str, Any]:
    """A TokenRequest / projected-volume token as kube-apiserver 1.30 emits it."""
    k8s: dict[str, Any] = {"namespace": "prod",
                           "serviceaccount": {"name": "api", "uid": SA_UID}}
    if binding is not None:
        k8s.update(binding)
    return {
        "aud": [AUDIENCE],
        "exp": IAT + 3600,
        "iat": IAT,
        "iss": K8S_ISS,
        "jti": "0d4c2b1a-7e6f-4a5b-8c9d-1e2f3a4b5c6d",
        "kubernetes.io": k8s,
        "nbf": IAT,
        "sub": "system:serviceaccount:prod:api",
    }


POD_BINDING = {
    "node": {"name": "ip-10-0-3-17.ec2.internal", "uid": "c2b7e9d4-1f3a-4e6b-8d2c-9a0b1c2d3e4f"},
    "pod": {"name": "api-6f7d8c9b5-x2x7q", "uid": POD_UID},
}


async def test_kubernetes_projected_token_maps_pod_uid_and_namespace_sa(
        idp: Idp, make_verifier: Callable[..., IdentityVerifier]) -> None:
    idp.docs[K8S_JWKS] = {"keys": [jwk(RSA2048, "Yx3bq", alg="RS256", use="sig")]}
    payload = projected(POD_BINDING)

    identity = await make_verifier(k8s_issuer(idp)).verify(
        sign(payload, RSA2048, "RS256", "Yx3bq", typ=None))

    assert identity == Identity(
        issuer_name="cluster-a",
        issuer=K8S_ISS,
        subject="system:serviceaccount:prod:api",
        instance_id=POD_UID,
        workload="prod/api",
        issued_at=ISSUED,
        expires_at=dt.datetime(2030, 6, 1, 12, 59, 0, tzinfo=UTC),
        claims=payload,
        jti="0d4c2b1a-7e6f-4a5b-8c9d-1e2f3a4b5c6d",
        # kind kubernetes defaults replay off: the kubelet reuses one token for a while.
        replay_key=None,
    )
    assert idp.hits == {K8S_JWKS: 1}


LEGACY = {
    "iss": "kubernetes/serviceaccount",
    "kubernetes.io/serviceaccount/namespace": "prod",
    "kubernetes.io/serviceaccount/secret.name": "api-token-7xk2p",
    "kubernetes.io/serviceaccount/service-account.name": "api",
    "kubernetes.io/serviceaccount/service-account.uid": SA_UID,
    "sub": "system:serviceaccount:prod:api",
}


async def test_kubernetes_legacy_secret_token_is_refused(
        idp: Idp, make_verifier: Callable[..., IdentityVerifier]) -> None:
    idp.docs[K8S_JWKS] = {"keys": [jwk(RSA2048, "Yx3bq", alg="RS256")]}
    # Legacy tokens always say iss "kubernetes/serviceaccount": refused as legacy where
    # that is the configured issuer...
    legacy_iss = make_verifier(k8s_issuer(idp, issuer="kubernetes/serviceaccount"))
    token = sign(LEGACY, RSA2048, "RS256", "Yx3bq", typ=None)
    assert await refusal(legacy_iss, token) == "token_legacy_serviceaccount"

    # ...and, with a helpful message, where the cluster's issuer is a URL (the usual case)
    # and a kubernetes issuer is configured at all.
    assert await refusal(make_verifier(k8s_issuer(idp)), token) == "token_legacy_serviceaccount"


async def test_kubernetes_token_without_exp_is_treated_as_legacy(
        idp: Idp, make_verifier: Callable[..., IdentityVerifier]) -> None:
    idp.docs[K8S_JWKS] = {"keys": [jwk(RSA2048, "Yx3bq", alg="RS256")]}
    payload = projected(POD_BINDING)
    del payload["exp"]
    assert await refusal(make_verifier(k8s_issuer(idp)),
                         sign(payload, RSA2048, "RS256", "Yx3bq")) == (
        "token_legacy_serviceaccount")


@pytest.mark.parametrize(
    "binding",
    [
        {"secret": {"name": "api-token", "uid": "e3d2c1b0-a9f8-4e7d-8c6b-5a4f3e2d1c0b"}},
        None,
        {"pod": {"name": "api-6f7d8c9b5-x2x7q"}},
    ],
    ids=["bound-to-secret", "unbound-token-request", "pod-without-uid"],
)
async def test_kubernetes_token_not_bound_to_a_pod_is_refused(
        binding: dict[str, Any] | None, idp: Idp,
        make_verifier: Callable[..., IdentityVerifier]) -> None:
    idp.docs[K8S_JWKS] = {"keys": [jwk(RSA2048, "Yx3bq", alg="RS256")]}
    token = sign(projected(binding), RSA2048, "RS256", "Yx3bq", typ=None)
    assert await refusal(make_verifier(k8s_issuer(idp)), token) == "token_not_pod_bound"


# ================================================================== SPIFFE

BUNDLE = "/bundle.json"
SPIRE_ISS = "https://oidc-discovery.example.org"
SVID = "spiffe://example.org/ns/prod/sa/api"


def spiffe_issuer(idp: Idp) -> IssuerSettings:
    # Each replica has its own SPIFFE ID in this deployment, so the instance is `sub`
    # (the spiffe kind has no default instance claim).
    return IssuerSettings(name="spire", issuer=SPIRE_ISS, kind="spiffe", instance_claim="sub",
                          trust_domain="example.org", spiffe_bundle_uri=idp.url(BUNDLE),
                          algorithms=("ES256", "RS256"), jwks_cache_ttl_s=300,
                          jwks_refresh_cooldown_s=30)


def bundle(*jwt_keys: dict[str, Any], hint: int = 60) -> dict[str, Any]:
    """A SPIFFE trust bundle as SPIRE serves it: the X.509 CA plus the JWT signing keys."""
    x509_entry = {**jwk(SPIFFE_CA, "x509-ca"), "use": "x509-svid",
                  "x5c": [x509_ca_cert(SPIFFE_CA)]}
    return {"keys": [x509_entry, *jwt_keys], "spiffe_sequence": 12,
            "spiffe_refresh_hint": hint}


def svid_claims(sub: str = SVID) -> dict[str, Any]:
    return {"aud": [AUDIENCE], "exp": IAT + 300, "iat": IAT, "iss": SPIRE_ISS, "sub": sub}


async def test_spiffe_jwt_svid_via_bundle(idp: Idp,
                                          make_verifier: Callable[..., IdentityVerifier]
                                          ) -> None:
    idp.docs[BUNDLE] = bundle(jwk(EC_A, "svid-1", use="jwt-svid"))
    verifier = make_verifier(spiffe_issuer(idp))
    payload = svid_claims()

    identity = await verifier.verify(sign(payload, EC_A, "ES256", "svid-1", typ="JWT"))

    assert identity == Identity(
        issuer_name="spire", issuer=SPIRE_ISS, subject=SVID, instance_id=SVID, workload=SVID,
        issued_at=ISSUED, expires_at=dt.datetime(2030, 6, 1, 12, 4, 0, tzinfo=UTC),
        claims=payload, jti=None, replay_key=None)

    # The X.509 CA entry is no JWT key: a token naming it is refused...
    assert await refusal(verifier, sign(payload, SPIFFE_CA, "ES256", "x509-ca")) == (
        "token_unknown_key")
    # ...and it does not count as a candidate: a kid-less token finds the single JWT key.
    assert (await verifier.verify(sign(payload, EC_A, "ES256", None))).workload == SVID
    # The JWT-SVID spec lets typ be "JOSE" as well as "JWT".
    assert (await verifier.verify(sign(payload, EC_A, "ES256", "svid-1", typ="JOSE"))
            ).instance_id == SVID
    assert idp.hits == {BUNDLE: 1}


async def test_spiffe_refresh_hint_shortens_the_cache(
        idp: Idp, mono: Monotonic, make_verifier: Callable[..., IdentityVerifier]) -> None:
    idp.docs[BUNDLE] = bundle(jwk(EC_A, "svid-1", use="jwt-svid"), hint=60)
    verifier = make_verifier(spiffe_issuer(idp))
    assert (await verifier.verify(sign(svid_claims(), EC_A, "ES256", "svid-1"))).workload == SVID

    # SPIRE rotates its JWT key; svid-1 stays valid in the cache until the hint runs out.
    idp.docs[BUNDLE] = bundle(jwk(EC_B, "svid-2", use="jwt-svid"), hint=60)
    mono.advance(59)
    assert (await verifier.verify(sign(svid_claims(), EC_A, "ES256", "svid-1"))).workload == SVID
    assert idp.hits == {BUNDLE: 1}
    mono.advance(1)  # 60 s: the hint, not the 300 s cache TTL, decides
    assert await refusal(verifier, sign(svid_claims(), EC_A, "ES256", "svid-1")) == (
        "token_unknown_key")
    assert idp.hits == {BUNDLE: 2}
    assert (await verifier.verify(sign(svid_claims(), EC_B, "ES256", "svid-2"))).workload == SVID
    assert idp.hits == {BUNDLE: 2}


async def test_spiffe_id_of_another_trust_domain_is_refused(
        idp: Idp, make_verifier: Callable[..., IdentityVerifier]) -> None:
    idp.docs[BUNDLE] = bundle(jwk(EC_A, "svid-1", use="jwt-svid"))
    token = sign(svid_claims("spiffe://evil.example.org/ns/prod/sa/api"), EC_A, "ES256",
                 "svid-1")
    assert await refusal(make_verifier(spiffe_issuer(idp)), token) == "token_wrong_trust_domain"


@pytest.mark.parametrize(
    "sub",
    ["spiffe://example.org", "spiffe://example.org/", "spiffe://example.org/a/../b",
     "spiffe://example.org/a/./b", "https://example.org/a", "spiffe://Example.org/a",
     "spiffe://example.org/a//b", "spiffe://example.org/a?x=1", "spiffe://user@example.org/a",
     "spiffe://example.org:443/a", ""],
    ids=["no-path", "root-path", "dot-dot", "dot", "https-scheme", "upper-case-domain",
         "empty-segment", "query", "userinfo", "port", "empty"],
)
async def test_malformed_spiffe_id_is_refused(sub: str, idp: Idp,
                                              make_verifier: Callable[..., IdentityVerifier]
                                              ) -> None:
    idp.docs[BUNDLE] = bundle(jwk(EC_A, "svid-1", use="jwt-svid"))
    token = sign(svid_claims(sub), EC_A, "ES256", "svid-1")
    assert await refusal(make_verifier(spiffe_issuer(idp)), token) == "token_claim_invalid"


async def test_spiffe_svid_without_iss_cannot_be_matched_to_an_issuer(
        idp: Idp, make_verifier: Callable[..., IdentityVerifier]) -> None:
    # SPIRE leaves 'iss' out unless its jwt_issuer is set: the broker needs it to pick the
    # issuer configuration, so such SVIDs are refused before any key is fetched.
    idp.docs[BUNDLE] = bundle(jwk(EC_A, "svid-1", use="jwt-svid"))
    payload = svid_claims()
    del payload["iss"]
    assert await refusal(make_verifier(spiffe_issuer(idp)),
                         sign(payload, EC_A, "ES256", "svid-1")) == "token_missing_claim"
    assert idp.hits == {}


@pytest.mark.parametrize("use", ["sig", None], ids=["use-sig", "no-use"])
async def test_spiffe_bundle_without_jwt_svid_keys_has_no_usable_key(
        use: str | None, idp: Idp, make_verifier: Callable[..., IdentityVerifier]) -> None:
    entry = jwk(EC_A, "svid-1") if use is None else jwk(EC_A, "svid-1", use=use)
    idp.docs[BUNDLE] = {"keys": [entry], "spiffe_refresh_hint": 60}
    verifier = make_verifier(spiffe_issuer(idp))
    assert await unavailable(verifier, sign(svid_claims(), EC_A, "ES256", "svid-1")) == (
        "jwks_unavailable")
    assert idp.hits == {BUNDLE: 1}
    assert verifier.caches[0].stats.outcomes == {"failure": 1}


# ================================================================== GitHub Actions

GH_ISS = "https://token.actions.githubusercontent.com"
GH_JWKS = "/.well-known/jwks"


def gh_issuer(idp: Idp) -> IssuerSettings:
    return IssuerSettings(name="github", issuer=GH_ISS, kind="github_actions",
                          jwks_uri=idp.url(GH_JWKS), algorithms=("RS256",))


def gh_claims() -> dict[str, Any]:
    return {
        "jti": "7b3c2a1d-5e4f-4a6b-9c8d-0e1f2a3b4c5d",
        "sub": "repo:octo-org/octo-repo:ref:refs/heads/main",
        "aud": AUDIENCE,
        "ref": "refs/heads/main",
        "sha": "d6cd1e2bd19e03a81132a23b2025920577f84e37",
        "repository": "octo-org/octo-repo",
        "repository_owner": "octo-org",
        "repository_owner_id": "65",
        "repository_visibility": "private",
        "repository_id": "74",
        "actor_id": "12",
        "actor": "octocat",
        "workflow": "deploy",
        "head_ref": "",
        "base_ref": "",
        "event_name": "push",
        "ref_type": "branch",
        "ref_protected": "true",
        "workflow_ref": "octo-org/octo-repo/.github/workflows/deploy.yml@refs/heads/main",
        "workflow_sha": "d6cd1e2bd19e03a81132a23b2025920577f84e37",
        "job_workflow_ref": "octo-org/octo-automation/.github/workflows/oidc.yml@refs/heads/main",
        "job_workflow_sha": "9f6b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b",
        "runner_environment": "github-hosted",
        "run_id": "6029393517",
        "run_number": "42",
        "run_attempt": "2",
        "iss": GH_ISS,
        "nbf": IAT - 5,
        "exp": IAT + 300,
        "iat": IAT,
    }


async def test_github_actions_token_maps_run_attempt_and_repository(
        idp: Idp, make_verifier: Callable[..., IdentityVerifier]) -> None:
    idp.docs[GH_JWKS] = {"keys": [jwk(RSA_B, "cc413527-173f-5a05-976e-9c52b1d7b431",
                                      alg="RS256", use="sig", x5t="Hyq4NATAjsKhC2Ok")]}
    payload = gh_claims()
    token = sign(payload, RSA_B, "RS256", "cc413527-173f-5a05-976e-9c52b1d7b431",
                 typ="JWT", x5t="Hyq4NATAjsKhC2Ok")

    identity = await make_verifier(gh_issuer(idp)).verify(token)

    assert identity == Identity(
        issuer_name="github",
        issuer=GH_ISS,
        subject="repo:octo-org/octo-repo:ref:refs/heads/main",
        instance_id="6029393517-2",
        # Owner and repository ids, not names: a name can be registered again.
        workload="65:74",
        issued_at=ISSUED,
        expires_at=dt.datetime(2030, 6, 1, 12, 4, 0, tzinfo=UTC),
        claims=payload,
        jti="7b3c2a1d-5e4f-4a6b-9c8d-0e1f2a3b4c5d",
        replay_key="7b3c2a1d-5e4f-4a6b-9c8d-0e1f2a3b4c5d",
    )


async def test_github_actions_token_without_run_attempt_is_refused(
        idp: Idp, make_verifier: Callable[..., IdentityVerifier]) -> None:
    idp.docs[GH_JWKS] = {"keys": [jwk(RSA_B, "gh-1", alg="RS256")]}
    payload = gh_claims()
    del payload["run_attempt"]
    assert await refusal(make_verifier(gh_issuer(idp)),
                         sign(payload, RSA_B, "RS256", "gh-1")) == "token_missing_claim"


# ================================================================== GCP

GOOGLE_ISS = "https://accounts.google.com"
GOOGLE_CERTS = "/oauth2/v3/certs"
SA_EMAIL = "123456789012-compute@developer.gserviceaccount.com"


def gcp_issuer(idp: Idp) -> IssuerSettings:
    return IssuerSettings(name="gce", issuer=GOOGLE_ISS, kind="gcp",
                          jwks_uri=idp.url(GOOGLE_CERTS), algorithms=("RS256",))


def gce_claims(full: bool = True) -> dict[str, Any]:
    """A metadata-server identity token (format=full adds the 'google' claim)."""
    payload: dict[str, Any] = {
        "aud": AUDIENCE,
        "azp": "104907837361246731195",
        "email": SA_EMAIL,
        "email_verified": True,
        "exp": IAT + 3600,  # Google's ID tokens live exactly one hour: the default maximum
        "iat": IAT,
        "iss": GOOGLE_ISS,
        "sub": "104907837361246731195",
    }
    if full:
        payload["google"] = {"compute_engine": {
            "instance_creation_timestamp": 1903000000,
            "instance_id": "2905631874365238291",
            "instance_name": "worker-3",
            "project_id": "acme-prod",
            "project_number": 123456789012,
            "zone": "europe-west1-b",
        }}
    return payload


async def test_gcp_compute_identity_token_maps_instance_id_and_email(
        idp: Idp, make_verifier: Callable[..., IdentityVerifier]) -> None:
    idp.docs[GOOGLE_CERTS] = {"keys": [
        jwk(RSA2048, "6f8f6b1e2d3c4b5a69788796a5b4c3d2e1f0a9b8", alg="RS256", use="sig"),
        jwk(RSA_B, "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678", alg="RS256", use="sig"),
    ]}
    payload = gce_claims()
    token = sign(payload, RSA2048, "RS256", "6f8f6b1e2d3c4b5a69788796a5b4c3d2e1f0a9b8",
                 typ="JWT")

    identity = await make_verifier(gcp_issuer(idp)).verify(token)

    assert identity == Identity(
        issuer_name="gce",
        issuer=GOOGLE_ISS,
        subject="104907837361246731195",
        instance_id="acme-prod:2905631874365238291",  # scoped to its project
        workload=SA_EMAIL,
        issued_at=ISSUED,
        expires_at=dt.datetime(2030, 6, 1, 12, 59, 0, tzinfo=UTC),
        claims=payload,
        jti=None,
        replay_key=None,
    )


async def test_gcp_standard_format_token_lacks_the_instance(
        idp: Idp, make_verifier: Callable[..., IdentityVerifier]) -> None:
    idp.docs[GOOGLE_CERTS] = {"keys": [jwk(RSA2048, "g-1", alg="RS256")]}
    token = sign(gce_claims(full=False), RSA2048, "RS256", "g-1")
    assert await refusal(make_verifier(gcp_issuer(idp)), token) == "token_missing_claim"

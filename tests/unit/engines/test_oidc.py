"""The oidc engine on Vault's identity-token answer: the path it reads, the roles it refuses
at load (wrong mount, any option or template, no entity alias), and the credential and
expiry it takes from the JWT, refusing an answer it cannot hand out without echoing it.
Pure: no Vault."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from broker.config import load_settings
from broker.dev.environment import dev_settings_dict, walkthrough
from broker.engines import ENGINES, read_caller_params
from broker.engines.oidc import check_granted, identity_token, read_token, token_claims
from broker.engines.role import RoleSettings
from broker.errors import BadRequest, ConfigError, NotPermitted, UpstreamRejected
from broker.secret import Secret
from broker.vault.bootstrap import OidcRole
from tests.unit.aws.settingskit import settings_with

OIDC = ENGINES["oidc"]
IAT = 1_800_000_000
CLAIMS = {
    "aud": "client-abc",
    "sub": "0b9e6c1e-entity",
    "iss": "http://127.0.0.1:8200/v1/identity/oidc",
    "iat": IAT,
    "exp": IAT + 300,
    "namespace": "root",
}
ROLE: dict[str, Any] = {"engine": "oidc", "mount": "identity", "vault_role": "cloud"}


def role(**kw: Any) -> RoleSettings:
    return RoleSettings.model_validate({**ROLE, **kw})


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt_of(claims: Any, *, payload: str | None = None) -> str:
    header = _b64(json.dumps({"alg": "RS256", "kid": "k1"}).encode())
    body = payload if payload is not None else _b64(json.dumps(claims).encode())
    return f"{header}.{body}.c2lnbmF0dXJl"


def answer(claims: Any = None, **extra: Any) -> dict[str, Any]:
    return {"token": jwt_of(CLAIMS if claims is None else claims), "ttl": 300, **extra}


def test_engine_identity():
    assert (OIDC.name, OIDC.kind, list(OIDC.modes)) == ("oidc", "oidc_token", ["token"])
    assert OIDC.modes["token"].leased is False
    assert OIDC.requires(role()) == frozenset({"entity"})


def test_request_reads_the_identity_token_path_with_no_ttl():
    req = OIDC.request(role(), {}, {}, 600)
    assert (req.method, req.path, req.body, req.ttl_applied) == (
        "GET",
        "identity/oidc/token/cloud",
        None,
        False,
    )


def test_the_aws_web_identity_mode_reads_the_same_path():
    aws = ENGINES["aws"]
    web = RoleSettings.model_validate(
        {
            "engine": "aws",
            "mode": "web_identity",
            "mount": "identity",
            "vault_role": "cloud",
            "default_ttl": "15m",
            "max_ttl": "15m",
            "on_limit": "refuse",
            "options": {"role_arn": "arn:aws:iam::123456789012:role/x"},
        }
    )
    assert aws.request(web, {}, {}, 900).path == OIDC.request(role(), {}, {}, 600).path


def test_plan_is_not_leased_and_names_nothing_at_a_cloud():
    plan = OIDC.plan("cloud", role(), {}, {}, 600, "i-1")
    assert (plan.kind, plan.leased, plan.session_ref) == ("oidc_token", False, None)


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"mount": "pki"}, "mount: the oidc engine reads tokens from Vault's identity engine"),
        ({"options": {"audience": "x"}}, "options: engine oidc takes no audience (allowed: none)"),
        ({"params": {"sub": "{workload}"}}, "params: engine oidc takes no sub (allowed: none)"),
        (
            {"request_params": ["audience"]},
            "request_params: engine oidc lets a caller send nothing",
        ),
        ({"mode": "jwt"}, "mode: engine oidc has modes token; got 'jwt'"),
    ],
)
def test_roles_refused_at_load(kw, message):
    with pytest.raises(ValidationError) as err:
        role(**kw)
    assert message in str(err.value)


def test_a_caller_can_send_nothing_but_role_and_ttl():
    with pytest.raises(BadRequest) as err:
        read_caller_params(OIDC, "cloud", role(), {"audience": "https://elsewhere"})
    assert err.value.code == "unknown_parameter"
    assert read_caller_params(OIDC, "cloud", role(), {}) == {}


def test_an_oidc_role_needs_instance_tokens_with_an_entity():
    with pytest.raises(ConfigError) as err:
        load_settings(settings_with({"cloud": ROLE}))
    assert (
        "vault.entity_alias: role 'cloud' reads an OIDC token from Vault's identity engine, "
        "which needs the instance token to have an entity; set entity_alias: workload"
    ) in str(err.value)
    s = load_settings(settings_with({"cloud": ROLE}, vault={"entity_alias": "workload"}))
    assert s.roles["cloud"].engine == "oidc"


def test_the_credential_and_expiry_come_from_the_token():
    data = answer(client_id="client-abc")
    credential, expires = read_token(data, 3600)
    assert credential == {
        "token": data["token"],
        "audience": "client-abc",
        "subject": "0b9e6c1e-entity",
        "issuer": "http://127.0.0.1:8200/v1/identity/oidc",
    }
    assert expires == datetime.fromtimestamp(IAT + 300, UTC)
    assert OIDC.shape(role(), data) == credential
    assert OIDC.expires_at(role(), data) == expires
    assert OIDC.identifier(role(), data) is None


def test_a_token_may_live_exactly_max_ttl_and_no_longer():
    assert read_token(answer(), 300)[1] == datetime.fromtimestamp(IAT + 300, UTC)
    with pytest.raises(UpstreamRejected) as err:
        read_token(answer(), 299)
    assert err.value.code == "vault_bad_response"
    assert "lives 300s, longer than the role's max_ttl of 299s" in err.value.message
    # The role's max_ttl is what the engine applies: a 24h Vault default is refused.
    long = answer({**CLAIMS, "exp": IAT + 86400})
    with pytest.raises(UpstreamRejected):
        OIDC.shape(role(max_ttl="1h", default_ttl="10m"), long)
    assert OIDC.expires_at(role(max_ttl="1h", default_ttl="10m"), long) is None


def test_a_token_may_live_exactly_the_granted_ttl_and_no_longer():
    """A policy rule's cap or a ttl asked for is a grant too: a token that cannot be
    revoked never outlives it."""
    check_granted(answer(), 300, 300)
    with pytest.raises(NotPermitted) as err:
        check_granted(answer(), 300, 299)
    assert err.value.code == "token_outlives_grant"
    assert "live 300s, longer than the 299s granted" in err.value.message
    assert "eyJ" not in err.value.message
    plan = OIDC.plan("cloud", role(max_ttl="5m", default_ttl="5m"), {}, {}, 60, "i-1")
    with pytest.raises(NotPermitted):
        plan.shape(answer(), None, datetime.fromtimestamp(IAT + 300, UTC))
    # The role's max_ttl is checked first: Vault's misconfiguration stays a 502.
    with pytest.raises(UpstreamRejected):
        check_granted(answer(), 299, 60)


def _without(name: str) -> dict[str, Any]:
    return {k: v for k, v in CLAIMS.items() if k != name}


@pytest.mark.parametrize(
    "data,what",
    [
        ({}, "returned no OIDC token"),
        ({"token": None}, "returned no OIDC token"),
        ({"token": 42}, "returned no OIDC token"),
        ({"token": "opaque-token"}, "returned no OIDC token"),
        ({"token": "a.b.c.d"}, "returned no OIDC token"),
        ({"token": jwt_of(None, payload="!!!")}, "payload is not base64url JSON"),
        ({"token": jwt_of(None, payload=_b64(b"\xff\xfe"))}, "payload is not base64url JSON"),
        ({"token": jwt_of(["not", "an", "object"])}, "payload is not a JSON object"),
        (answer(_without("aud")), "its aud is missing"),
        (answer({**CLAIMS, "aud": ["a", "b"]}), "its aud is missing or not a string"),
        (answer({**CLAIMS, "sub": ""}), "its sub is missing"),
        (answer(_without("iss")), "its iss is missing"),
        (answer(_without("exp")), "its exp is missing or not a time"),
        (answer({**CLAIMS, "exp": "soon"}), "its exp is missing or not a time"),
        (answer({**CLAIMS, "exp": True}), "its exp is missing or not a time"),
        (answer({**CLAIMS, "exp": 10**12}), "its exp is missing or not a time"),
        (answer(_without("iat")), "its iat is missing or not a time"),
        (answer({**CLAIMS, "exp": IAT}), "it expires before it was issued"),
        (answer(client_id="another-client"), "its aud is not the OIDC role's client_id"),
    ],
)
def test_unusable_answers_are_refused_without_echoing_them(data, what):
    with pytest.raises(UpstreamRejected) as err:
        OIDC.shape(role(), data)
    assert err.value.code == "vault_bad_response"
    assert what in err.value.message
    token = data.get("token")
    if isinstance(token, str):
        assert token not in err.value.message
        for part in token.split("."):
            assert len(part) < 8 or part not in err.value.message
    assert OIDC.expires_at(role(), data) is None


def test_the_token_travels_as_a_secret():
    token = identity_token(answer())
    assert isinstance(token, Secret) and "***" == f"{token}"
    assert token_claims(token)["sub"] == CLAIMS["sub"]


# -- broker dev -------------------------------------------------------------------------


def test_broker_dev_allows_dev_oidc_to_its_workloads_with_an_entity_per_workload():
    common = {
        "vault_addr": "http://127.0.0.1:8200",
        "broker_token": "t",
        "issuer": "https://issuer.example",
        "jwks_uri": "https://issuer.example/jwks.json",
        "store_url": "sqlite:///broker.db",
        "admin_token_sha256": "ab" * 32,
        "with_database": True,
    }
    s = load_settings(dev_settings_dict(**common, with_oidc=True))
    oidc = s.roles["dev-oidc"]
    assert (oidc.engine, oidc.mount, oidc.vault_role, oidc.max_ttl) == (
        "oidc",
        "identity",
        "dev-oidc",
        300,
    )
    assert s.vault.entity_alias == "workload"
    assert s.policy.rules[0].allow == ("dev-cert", "dev-db", "dev-oidc")
    # The harness's brokers (and any caller that does not ask) stay without it.
    plain = load_settings(dev_settings_dict(**common))
    assert ("dev-oidc" in plain.roles, plain.vault.entity_alias) == (False, "none")


def test_the_dev_walkthrough_names_dev_oidc_and_its_jwks():
    role = OidcRole("dev-oidc", "cid123", "http://127.0.0.1:8200/v1/identity/oidc")
    text = walkthrough(Path("/tmp/d"), "http://b", "http://127.0.0.1:8200", True, None, oidc=role)
    assert "dev-oidc : an OIDC token (JWT)" in text
    assert "aud cid123" in text and "iss http://127.0.0.1:8200/v1/identity/oidc" in text
    assert "http://127.0.0.1:8200/v1/identity/oidc/.well-known/keys" in text
    assert '{"role":"dev-oidc"}' in text
    assert "dev-oidc :" not in walkthrough(Path("/tmp/d"), "http://b", "http://v", True, None)

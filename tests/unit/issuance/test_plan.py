"""Planning: for each engine and mode, the one value the engine decides before anything is
written or asked (Vault path and body, the granted TTL, whether a lease is expected, what
termination denies at a cloud), and the refusals that write nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from broker.aws import SessionRef, session_name_for
from broker.engines import ENGINES, Plan, VaultRequest, read_caller_params
from broker.engines.role import RoleSettings
from broker.errors import BadRequest, NotPermitted
from broker.identity.model import Identity
from broker.policy import render_params
from tests.harness.pki import build_csr

ARN = "arn:aws:iam::123456789012:role/broker-web"
STS = {"default_ttl": "15m", "max_ttl": "15m", "on_limit": "refuse"}
CSR = build_csr(cn="payments.workload.internal")
PUBLIC_KEY = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def identity(instance_id: str = "i-0abc") -> Identity:
    return Identity(issuer_name="dev", issuer="https://issuer.example", subject="payments",
                    instance_id=instance_id, workload="payments",
                    issued_at=datetime(2024, 1, 1, tzinfo=UTC),
                    expires_at=datetime(2024, 1, 1, 1, tzinfo=UTC), claims={})


def role(**kw: Any) -> RoleSettings:
    return RoleSettings.model_validate(kw)


def plan_for(name: str, settings: RoleSettings, body: dict[str, Any], ttl: int,
             who: Identity | None = None) -> Plan:
    """As the issuance service plans: caller parameters read, templates rendered, then
    the engine's plan."""
    who = who or identity()
    engine = ENGINES[settings.engine]
    caller = read_caller_params(engine, name, settings, body)
    params = render_params(settings.params, who)
    return engine.plan(name, settings, params, caller, ttl, who.instance_id)


DB = role(engine="database", mount="database", vault_role="dev-db")
RABBIT = role(engine="rabbitmq", mount="rabbitmq", vault_role="app")
PKI_ISSUE = role(engine="pki", mount="pki", vault_role="workload",
                 params={"common_name": "{workload}.workload.internal"})
PKI_SIGN = role(engine="pki", mode="sign", mount="pki", vault_role="workload",
                params={"common_name": "{workload}.workload.internal"})
SSH = role(engine="ssh", mount="ssh", vault_role="workload",
           params={"valid_principals": "{workload}", "key_id": "{issuer_name}:{instance_id}"})
KV2 = role(engine="kv", mount="secret", vault_role="unused",
           params={"path": "apps/{workload}/config"})
KV1 = role(engine="kv", mode="v1", mount="kv", vault_role="unused",
           params={"path": "apps/{workload}"})
IAM_USER = role(engine="aws", mode="iam_user", mount="aws", vault_role="deploy")
ASSUMED = role(engine="aws", mode="assumed_role", mount="aws", vault_role="deploy",
               options={"role_arn": ARN}, params={"role_session_name": "{instance_id}"}, **STS)
ASSUMED_DENIED = role(engine="aws", mode="assumed_role", mount="aws", vault_role="deploy",
                      options={"role_arn": ARN, "deny_on_revoke": True},
                      params={"role_session_name": "{instance_id}"}, **STS)
FEDERATION = role(engine="aws", mode="federation_token", mount="aws", vault_role="deploy", **STS)
WEB_IDENTITY = role(engine="aws", mode="web_identity", mount="identity", vault_role="aws",
                    options={"role_arn": ARN}, **STS)
GCP_TOKEN = role(engine="gcp", mode="roleset_token", mount="gcp", vault_role="rs")
GCP_KEY = role(engine="gcp", mode="roleset_key", mount="gcp", vault_role="rs")
OIDC = role(engine="oidc", mount="identity", vault_role="cloud")
AZURE = role(engine="azure", mount="azure", vault_role="app",
             options={"tenant_id": "contoso.onmicrosoft.com"})

PKI_BODY = {"common_name": "payments.workload.internal", "ttl": "300s", "format": "pem",
            "exclude_cn_from_sans": False}
CASES = [
    # (role name, settings, caller body, ttl) -> request, lease expected, session ref
    (("db", DB, {}, 600),
     VaultRequest("GET", "database/creds/dev-db", None, False), True, None),
    (("mq", RABBIT, {}, 600),
     VaultRequest("GET", "rabbitmq/creds/app", None, False), True, None),
    (("cert", PKI_ISSUE, {}, 300),
     VaultRequest("POST", "pki/issue/workload", PKI_BODY, True), True, None),
    (("csr", PKI_SIGN, {"csr": CSR}, 300),
     VaultRequest("POST", "pki/sign/workload", {**PKI_BODY, "csr": CSR.strip() + "\n"}, True),
     True, None),
    (("ssh", SSH, {"public_key": PUBLIC_KEY + " me@laptop"}, 120),
     VaultRequest("POST", "ssh/sign/workload",
                  {"public_key": PUBLIC_KEY, "cert_type": "user", "valid_principals": "payments",
                   "key_id": "dev:i-0abc", "ttl": "120s"}, True),
     False, None),
    (("kv2", KV2, {}, 600),
     VaultRequest("GET", "secret/data/apps/payments/config", None, False), False, None),
    (("kv1", KV1, {}, 600),
     VaultRequest("GET", "kv/apps/payments", None, False), False, None),
    (("iam", IAM_USER, {}, 600),
     VaultRequest("GET", "aws/creds/deploy", None, False), True, None),
    (("sts", ASSUMED, {}, 900),
     VaultRequest("POST", "aws/sts/deploy",
                  {"ttl": "900s", "role_arn": ARN, "role_session_name": "i-0abc"}, True),
     True, None),
    (("sts-denied", ASSUMED_DENIED, {}, 900),
     VaultRequest("POST", "aws/sts/deploy",
                  {"ttl": "900s", "role_arn": ARN, "role_session_name": "i-0abc"}, True),
     True, SessionRef(ARN, "i-0abc")),
    (("fed", FEDERATION, {}, 900),
     VaultRequest("POST", "aws/sts/deploy", {"ttl": "900s"}, True), True, None),
    (("web", WEB_IDENTITY, {}, 900),
     VaultRequest("GET", "identity/oidc/token/aws", None, True), True,
     SessionRef(ARN, session_name_for("i-0abc"))),
    (("gtoken", GCP_TOKEN, {}, 600),
     VaultRequest("GET", "gcp/roleset/rs/token", None, False), False, None),
    (("gkey", GCP_KEY, {}, 600),
     VaultRequest("POST", "gcp/roleset/rs/key",
                  {"key_algorithm": "KEY_ALG_RSA_2048",
                   "key_type": "TYPE_GOOGLE_CREDENTIALS_FILE", "ttl": "600s"}, True),
     True, None),
    (("az", AZURE, {}, 600),
     VaultRequest("GET", "azure/creds/app", None, False), True, None),
    (("oidc", OIDC, {}, 600),
     VaultRequest("GET", "identity/oidc/token/cloud", None, False), False, None),
]
IDS = ["database", "rabbitmq", "pki-issue", "pki-sign", "ssh-sign", "kv-v2", "kv-v1",
       "aws-iam-user", "aws-assumed-role", "aws-assumed-role-deny-on-revoke",
       "aws-federation-token", "aws-web-identity", "gcp-roleset-token", "gcp-roleset-key",
       "azure", "oidc"]


@pytest.mark.parametrize("given,request_,leased,session_ref", CASES, ids=IDS)
def test_each_engine_plans_its_request_once(given, request_, leased, session_ref):
    name, settings, body, ttl = given
    engine = ENGINES[settings.engine]
    assert plan_for(name, settings, body, ttl) == Plan(
        engine=engine, role=settings, role_name=name, instance_id="i-0abc",
        request=request_, ttl=ttl, leased=leased, session_ref=session_ref)


def test_every_engine_is_planned_above():
    assert {c[0][1].engine for c in CASES} == set(ENGINES)


def test_the_plan_names_the_credential_kind_of_its_engine():
    assert plan_for("db", DB, {}, 600).kind == "database_login"
    assert plan_for("web", WEB_IDENTITY, {}, 900).kind == "aws_credentials"


def test_only_a_web_identity_plan_exchanges_vaults_answer_at_sts():
    token = "a.b.c"
    assert plan_for("sts", ASSUMED, {}, 900).exchange({"token": token}) is None
    request = plan_for("web", WEB_IDENTITY, {}, 900).exchange({"token": token})
    assert (request.role_arn, request.session_name, request.duration_s) == (
        ARN, session_name_for("i-0abc"), 900)
    assert request.token.reveal() == token


# -- refusals: each raised by planning, before the ledger hears of the request -----------

def test_a_csr_asking_for_a_name_the_role_does_not_template_is_a_bad_request():
    with pytest.raises(BadRequest) as err:
        plan_for("csr", PKI_SIGN, {"csr": build_csr(cn="other.example")}, 300)
    assert err.value.code == "invalid_parameter"
    assert err.value.message.startswith("csr: it asks for CN names this role does not issue")


def test_a_session_name_sts_would_refuse_is_a_bad_request():
    with pytest.raises(BadRequest) as err:
        plan_for("sts", ASSUMED, {}, 900, identity("i"))
    assert (err.value.code, err.value.message) == (
        "invalid_parameter",
        "the role_session_name this identity renders is not an STS session name "
        "(2 to 64 characters)")


def test_an_sts_ttl_below_the_minimum_is_a_bad_request():
    with pytest.raises(BadRequest) as err:
        plan_for("sts", FEDERATION, {}, 600)
    assert err.value.code == "ttl_below_minimum"


def test_an_instance_that_cannot_name_an_sts_session_is_not_permitted():
    with pytest.raises(NotPermitted) as err:
        plan_for("web", WEB_IDENTITY, {}, 900, identity("a=b"))
    assert err.value.code == "session_name_refused"
    assert err.value.message.startswith("role 'web' cannot be issued to this instance: ")

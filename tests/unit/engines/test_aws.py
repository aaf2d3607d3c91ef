"""The aws engine on Vault's documented answers, STS's documented XML, the IAM deny policy
and the credential_process JSON an AWS SDK reads. Pure: no Vault, no AWS."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import botocore.credentials
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.aws import SessionRef, StsSession, WebIdentityRequest, session_name_for
from broker.aws import iam_policy as ip
from broker.aws.sts import parse_error, parse_session, web_identity_form
from broker.config import load_settings
from broker.engines import ENGINES
from broker.engines.role import RoleSettings
from broker.errors import BadRequest, ConfigError, UpstreamRejected
from broker.secret import Secret

AWS = ENGINES["aws"]
ARN = "arn:aws:iam::123456789012:role/broker-web"
EXPIRES = datetime(2026, 11, 27, 10, 15, 0, tzinfo=UTC)
STS = {"default_ttl": "15m", "max_ttl": "15m", "on_limit": "refuse"}


def role(mode: str, **kw: Any) -> RoleSettings:
    base: dict[str, Any] = {"engine": "aws", "mode": mode, "mount": "aws", "vault_role": "deploy"}
    if mode != "iam_user":
        base.update(STS)
    if mode == "web_identity":
        base.update(mount="identity", vault_role="aws", options={"role_arn": ARN})
    base.update(kw)
    return RoleSettings.model_validate(base)


# -- requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings,params,expected",
    [
        (role("iam_user"), {}, ("GET", "aws/creds/deploy", None, False)),
        (
            role(
                "assumed_role",
                options={"role_arn": ARN},
                params={"role_session_name": "{instance_id}"},
            ),
            {"role_session_name": "i-0abc"},
            (
                "POST",
                "aws/sts/deploy",
                {"ttl": "900s", "role_arn": ARN, "role_session_name": "i-0abc"},
                True,
            ),
        ),
        (role("assumed_role"), {}, ("POST", "aws/sts/deploy", {"ttl": "900s"}, True)),
        (role("federation_token"), {}, ("POST", "aws/sts/deploy", {"ttl": "900s"}, True)),
        (role("web_identity"), {}, ("GET", "identity/oidc/token/aws", None, True)),
    ],
    ids=[
        "iam-user-creds",
        "assumed-role-arn-session",
        "assumed-role-bare",
        "federation-token",
        "web-identity-oidc-token",
    ],
)
def test_each_mode_asks_vault_the_documented_path(settings, params, expected):
    req = AWS.request(settings, params, {}, 900)
    assert (req.method, req.path, req.body, req.ttl_applied) == expected


@pytest.mark.parametrize("mode", ["assumed_role", "federation_token", "web_identity"])
def test_sts_modes_refuse_a_ttl_below_sts_minimum(mode):
    with pytest.raises(BadRequest) as err:
        AWS.request(role(mode), {}, {}, 600)
    assert err.value.code == "ttl_below_minimum"


# -- Vault's documented answers → credential_process ----------------------------------


@pytest.mark.parametrize(
    "mode,data,expected_token",
    [
        (
            "iam_user",
            {
                "access_key": "AKIAEXAMPLE000000001",
                "secret_key": "xlCs/secret",
                "session_token": None,
            },
            None,
        ),
        (
            "iam_user",
            {
                "access_key": "AKIAEXAMPLE000000001",
                "secret_key": "xlCs/secret",
                "security_token": None,
            },
            None,
        ),
        (
            "assumed_role",
            {
                "access_key": "ASIAEXAMPLE000000001",
                "secret_key": "xlCs/secret",
                "session_token": "FwoG-token",
                "arn": "arn:aws:sts::123456789012:assumed-role/DeveloperRole/i-1",
            },
            "FwoG-token",
        ),
        (
            "assumed_role",
            {
                "access_key": "ASIAEXAMPLE000000001",
                "secret_key": "xlCs/secret",
                "security_token": "FwoG-token",
                "arn": "arn:aws:sts::1:x",
            },
            "FwoG-token",
        ),
        (
            "federation_token",
            {
                "access_key": "ASIAEXAMPLE000000001",
                "secret_key": "xlCs/secret",
                "session_token": "FwoG-token",
            },
            "FwoG-token",
        ),
    ],
    ids=[
        "iam-user",
        "iam-user-pre-1.13",
        "assumed-role",
        "assumed-role-pre-1.13",
        "federation-token",
    ],
)
def test_vault_answers_become_credential_process_json(mode, data, expected_token):
    shaped = AWS.shape_expiring(role(mode), data, EXPIRES)
    assert shaped == {
        "Version": 1,
        "AccessKeyId": data["access_key"],
        "SecretAccessKey": "xlCs/secret",
        "SessionToken": expected_token,
        "Expiration": "2026-11-27T10:15:00Z",
    }


@pytest.mark.parametrize(
    "mode,data",
    [
        ("iam_user", {"access_key": "AKIAEXAMPLE000000001"}),
        ("iam_user", {"access_key": 5, "secret_key": "s"}),
        ("iam_user", {"access_key": "AKIA", "secret_key": "s", "session_token": "t"}),
        ("assumed_role", {"access_key": "ASIA", "secret_key": "s", "session_token": None}),
    ],
    ids=["no-secret", "not-a-string", "iam-user-with-token", "sts-without-token"],
)
def test_unusable_vault_answers_are_refused_without_echo(mode, data):
    with pytest.raises(UpstreamRejected) as err:
        AWS.shape_expiring(role(mode), data, EXPIRES)
    assert err.value.code == "vault_bad_response"
    assert "xlCs" not in str(err.value) and "AKIA" not in str(err.value)


@pytest.mark.parametrize("token", ["FwoG-token", None], ids=["sts-session", "iam-user-key"])
def test_an_aws_sdk_reads_the_shape_as_credential_process_output(tmp_path, token):
    expires = datetime.now(UTC) + timedelta(minutes=15)
    out = tmp_path / "creds.json"
    out.write_text(
        json.dumps(
            AWS.shape_expiring(
                role("assumed_role" if token else "iam_user"),
                {"access_key": "ASIAEXAMPLE000000001", "secret_key": "sk", "session_token": token},
                expires,
            )
        )
    )
    provider = botocore.credentials.ProcessProvider(
        "default", lambda: {"profiles": {"default": {"credential_process": f"cat {out}"}}}
    )
    creds = provider.load().get_frozen_credentials()
    assert (creds.access_key, creds.secret_key, creds.token) == (
        "ASIAEXAMPLE000000001",
        "sk",
        token,
    )


def test_a_session_from_sts_has_the_same_shape():
    session = StsSession(
        "ASIAEXAMPLE000000001",
        Secret("sk"),
        Secret("tok"),
        EXPIRES,
        "AROAEXAMPLE:i-1",
        "arn:aws:sts::123456789012:assumed-role/r/i-1",
    )
    assert AWS.shape_session(role("web_identity"), session) == {
        "Version": 1,
        "AccessKeyId": "ASIAEXAMPLE000000001",
        "SecretAccessKey": "sk",
        "SessionToken": "tok",
        "Expiration": "2026-11-27T10:15:00Z",
    }
    assert "sk" not in repr(session) and "tok" not in repr(session)


# -- sessions, their names and what termination denies ------------------------------


@pytest.mark.parametrize(
    "instance,expected",
    [
        ("i-0123456789abcdef0", "i-0123456789abcdef0"),
        ("my-project:1234567890", "my-project=1234567890"),
        ("default/web-7d9c", "default,web-7d9c"),
        ("run_42.1@ci+x", "run_42.1@ci+x"),
        ("ab", "ab"),
        ("x" * 64, "x" * 64),
    ],
    ids=["ec2", "gcp-colon", "k8s-slash", "sts-punctuation", "shortest", "longest"],
)
def test_session_names_are_instance_ids_mapped_one_to_one(instance, expected):
    assert session_name_for(instance) == expected


@pytest.mark.parametrize(
    "instance",
    ["a", "x" * 65, "has=equals", "has,comma", "sp ace", "ünïcode", "new\nline", ""],
    ids=[
        "too-short",
        "too-long",
        "equals-is-reserved",
        "comma-is-reserved",
        "space",
        "unicode",
        "newline",
        "empty",
    ],
)
def test_instance_ids_without_an_unambiguous_session_name_are_refused(instance):
    with pytest.raises(ValueError):
        session_name_for(instance)


@given(
    st.text(alphabet="ab:/=,-", min_size=2, max_size=10),
    st.text(alphabet="ab:/=,-", min_size=2, max_size=10),
)
def test_two_instances_never_share_a_session_name(a, b):
    try:
        na, nb = session_name_for(a), session_name_for(b)
    except ValueError:
        return
    assert (na == nb) == (a == b)


def test_session_refs_name_the_role_and_the_instance():
    web = role("web_identity")
    assert AWS.session_ref(web, {}, "proj:42") == SessionRef(ARN, "proj=42")
    denied = role(
        "assumed_role",
        options={"role_arn": ARN, "deny_on_revoke": True},
        params={"role_session_name": "app-{instance_id}"},
    )
    assert AWS.session_ref(denied, {"role_session_name": "app-i-1"}, "i-1") == SessionRef(
        ARN, "app-i-1"
    )
    assert AWS.session_ref(role("iam_user"), {}, "i-1") is None
    assert AWS.session_ref(role("federation_token"), {}, "i-1") is None
    ref = SessionRef(ARN, "i-1")
    assert ref.to_record() == {"kind": "aws_sts_session", "role_arn": ARN, "session_name": "i-1"}
    assert SessionRef.from_record(ref.to_record()) == ref and ref.role_name == "broker-web"


def test_the_oidc_token_is_exchanged_with_the_roles_session_policy():
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::bucket/*"}
        ],
    }
    web = role(
        "web_identity",
        options={
            "role_arn": ARN,
            "session_policy": policy,
            "policy_arns": ["arn:aws:iam::aws:policy/ReadOnlyAccess"],
        },
    )
    req = AWS.exchange(web, "proj:42", {"client_id": "c", "token": "h.p.s", "ttl": 300}, 900)
    assert req == WebIdentityRequest(
        role_arn=ARN,
        session_name="proj=42",
        token=Secret("h.p.s"),
        duration_s=900,
        policy=json.dumps(policy, separators=(",", ":")),
        policy_arns=("arn:aws:iam::aws:policy/ReadOnlyAccess",),
    )
    assert "h.p.s" not in repr(req)
    assert web_identity_form(req) == {
        "Action": "AssumeRoleWithWebIdentity",
        "Version": "2011-06-15",
        "RoleArn": ARN,
        "RoleSessionName": "proj=42",
        "WebIdentityToken": "h.p.s",
        "DurationSeconds": "900",
        "Policy": json.dumps(policy, separators=(",", ":")),
        "PolicyArns.member.1.arn": "arn:aws:iam::aws:policy/ReadOnlyAccess",
    }
    assert AWS.exchange(role("iam_user"), "i-1", {}, 900) is None
    with pytest.raises(UpstreamRejected) as err:
        AWS.exchange(web, "i-1", {"client_id": "c"}, 900)
    assert err.value.code == "vault_bad_response"


# -- role validation ------------------------------------------------------------------

BAD_ROLES = [
    ({"mode": "assumed_role", "default_ttl": "1h", "max_ttl": "1h"}, "15m"),
    ({"mode": "federation_token", "on_limit": "revoke_oldest"}, "on_limit"),
    ({"mode": "web_identity", "mount": "aws"}, "mount: identity"),
    ({"mode": "web_identity", "options": {}}, "options: engine aws needs role_arn"),
    (
        {"mode": "web_identity", "options": {"role_arn": "arn:aws:iam::1:user/x"}},
        "options.role_arn",
    ),
    (
        {"mode": "web_identity", "options": {"role_arn": ARN, "session_policy": {"a": 1}}},
        "options.session_policy: expected",
    ),
    (
        {
            "mode": "web_identity",
            "options": {
                "role_arn": ARN,
                "session_policy": {"Version": "2012-10-17", "Statement": [{"Sid": "x" * 2100}]},
            },
        },
        "longer than STS's 2048",
    ),
    (
        {"mode": "web_identity", "options": {"role_arn": ARN, "policy_arns": ["nope"]}},
        "options.policy_arns",
    ),
    (
        {"mode": "web_identity", "params": {"role_session_name": "{instance_id}"}},
        "params: engine aws takes no role_session_name",
    ),
    (
        {
            "mode": "assumed_role",
            "options": {"role_arn": ARN, "deny_on_revoke": True},
            "params": {"role_session_name": "{workload}"},
        },
        "holding {instance_id}",
    ),
    (
        {
            "mode": "assumed_role",
            "options": {"deny_on_revoke": True},
            "params": {"role_session_name": "{instance_id}"},
        },
        "needs options.role_arn",
    ),
    ({"mode": "assumed_role", "options": {"deny_on_revoke": "yes"}}, "true or false"),
    (
        {"mode": "assumed_role", "params": {"role_session_name": "app {instance_id}"}},
        "params.role_session_name",
    ),
    ({"mode": "iam_user", "options": {"role_arn": ARN}}, "options: engine aws takes no"),
]


@pytest.mark.parametrize(
    "change,message",
    BAD_ROLES,
    ids=[
        "sts-ttl-not-15m",
        "sts-revoke-oldest",
        "web-identity-not-identity-mount",
        "web-identity-no-arn",
        "arn-not-a-role",
        "session-policy-not-a-policy",
        "session-policy-too-long",
        "policy-arns-malformed",
        "web-identity-no-templates",
        "deny-without-instance-id",
        "deny-without-arn",
        "deny-not-bool",
        "session-name-space",
        "iam-user-no-options",
    ],
)
def test_roles_that_cannot_work_are_refused_at_load(change, message):
    data: dict[str, Any] = {"engine": "aws", "mount": "aws", "vault_role": "deploy", **STS}
    if change.get("mode") == "web_identity":
        data.update(mount="identity", vault_role="aws", options={"role_arn": ARN})
    data.update(change)
    with pytest.raises(ValueError) as err:
        RoleSettings.model_validate(data)
    assert message in str(err.value)


def test_a_session_name_template_too_long_for_sts_is_refused_per_request():
    settings = role("assumed_role", params={"role_session_name": "app-{instance_id}"})
    AWS.check_caller(settings, {"role_session_name": "app-i-1"}, {})
    with pytest.raises(ValueError):
        AWS.check_caller(settings, {"role_session_name": "app-" + "x" * 61}, {})


# -- configuration of the broker's own AWS access ------------------------------------


def settings_with(roles: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "vault": {
            "addr": "http://127.0.0.1:8200",
            "auth": {"method": "token", "token": "t"},
            **top.pop("vault", {}),
        },
        "identity": {
            "audience": "a",
            "issuers": [
                {
                    "name": "dev",
                    "issuer": "https://issuer.example",
                    "jwks_uri": "https://issuer.example/k",
                    "instance_claim": "iid",
                    "workload_claim": "wl",
                }
            ],
        },
        "roles": roles,
        "admin": {"token_sha256": "0" * 64},
        **top,
    }


WEB = {
    "engine": "aws",
    "mode": "web_identity",
    "mount": "identity",
    "vault_role": "aws",
    "options": {"role_arn": ARN},
    **STS,
}


def test_web_identity_roles_need_the_aws_section_and_entity_aliases():
    assert AWS.requires(RoleSettings.model_validate(WEB)) == {"aws", "entity"}
    assert AWS.requires(role("iam_user")) == frozenset()
    with pytest.raises(ConfigError) as err:
        load_settings(settings_with({"web": WEB}, vault={"entity_alias": "workload"}))
    assert "  (top level): aws: role 'web' exchanges tokens at AWS STS" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_settings(settings_with({"web": WEB}, aws={}))
    assert "vault.entity_alias: role 'web' reads an OIDC token" in str(err.value)
    s = load_settings(settings_with({"web": WEB}, aws={}, vault={"entity_alias": "workload"}))
    assert s.aws is not None and s.aws.sts_url == "https://sts.us-east-1.amazonaws.com"
    assert s.aws.credentials.method == "chain"


@pytest.mark.parametrize(
    "aws,line",
    [
        ({"sts_endpoint": "http://sts.example.com"}, "aws.sts_endpoint: expected https://"),
        ({"iam_endpoint": "https://iam.example.com/path"}, "aws.iam_endpoint: expected http(s)"),
        ({"region": "mars"}, "aws.region: expected an AWS region"),
        ({"revoked_sessions_policy": "no spaces"}, "aws.revoked_sessions_policy: expected"),
        (
            {
                "credentials": {
                    "method": "static",
                    "access_key_id": "short",
                    "secret_access_key": "s",
                }
            },
            "aws.credentials.static.access_key_id",
        ),
        ({"credentials": {"method": "keys"}}, "aws.credentials"),
    ],
    ids=[
        "sts-plain-http-off-loopback",
        "iam-endpoint-with-path",
        "region",
        "policy-name",
        "access-key-id",
        "unknown-method",
    ],
)
def test_bad_aws_settings_name_the_key(aws, line):
    with pytest.raises(ConfigError) as err:
        load_settings(settings_with({"web": WEB}, aws=aws, vault={"entity_alias": "workload"}))
    assert line in str(err.value)


def test_static_aws_keys_are_secret_in_settings():
    s = load_settings(
        settings_with(
            {"web": WEB},
            vault={"entity_alias": "workload"},
            aws={
                "sts_endpoint": "http://127.0.0.1:5000",
                "iam_endpoint": "http://127.0.0.1:5000/",
                "credentials": {
                    "method": "static",
                    "access_key_id": "AKIAIOSFODNN7EXAMPLE",
                    "secret_access_key": "wJalrXUtnFEMI/K7MDENG",
                },
            },
        )
    )
    assert s.aws is not None and s.aws.iam_endpoint == "http://127.0.0.1:5000"
    assert "wJalrXUtnFEMI" not in repr(s)


# -- STS's XML ------------------------------------------------------------------------

# AWS's documented AssumeRoleWithWebIdentity answer (STS API reference), trimmed.
STS_ANSWER = b"""<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>amzn1.account.AF6RHO7KZU5XRVQJGXK6HB56KR2A</SubjectFromWebIdentityToken>
    <Audience>client.5498841531868486423.1548@apps.example.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/FederatedWebIdentityRole/app1</Arn>
      <AssumedRoleId>AROACLKWSDQRAOEXAMPLE:app1</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <Expiration>2014-10-24T23:00:23Z</Expiration>
      <AccessKeyId>ASgeIAIOSFODNN7EXAMPLE</AccessKeyId>
    </Credentials>
    <Provider>www.amazon.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"""


def test_the_documented_sts_answer_parses_into_a_session():
    s = parse_session(STS_ANSWER)
    assert (
        s.access_key_id,
        s.secret_access_key.reveal(),
        s.session_token.reveal(),
        s.expiration,
        s.assumed_role_id,
        s.arn,
    ) == (
        "ASgeIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY",
        "AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE",
        datetime(2014, 10, 24, 23, 0, 23, tzinfo=UTC),
        "AROACLKWSDQRAOEXAMPLE:app1",
        "arn:aws:sts::123456789012:assumed-role/FederatedWebIdentityRole/app1",
    )


STS_ERROR = b"""<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>InvalidIdentityToken</Code>
    <Message>Couldn't retrieve verification key from your identity provider</Message></Error>
  <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
</ErrorResponse>"""


@pytest.mark.parametrize(
    "body,code,retryable",
    [
        (STS_ERROR, "InvalidIdentityToken", False),
        (
            STS_ERROR.replace(b"InvalidIdentityToken", b"IDPCommunicationError"),
            "IDPCommunicationError",
            True,
        ),
        (STS_ERROR.replace(b"InvalidIdentityToken", b"<x/>"), "unknown", False),
        (STS_ERROR.replace(b"InvalidIdentityToken", b"Bad Code; rm -rf"), "unknown", False),
        (b"<html>502 Bad Gateway</html>", "unknown", False),
        (b"not xml", "unknown", False),
    ],
    ids=["invalid-token", "idp-unreachable", "nested-code", "odd-code", "proxy-page", "garbage"],
)
def test_sts_errors_yield_only_a_trusted_code(body, code, retryable):
    err = parse_error(body)
    assert (err.code, err.retryable) == (code, retryable)


@pytest.mark.parametrize(
    "body,what",
    [
        (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><r>&a;</r>', "carries a DTD"),
        (b"<r>" + b"x" * (64 * 1024) + b"</r>", "too large"),
        (b"<AssumeRoleWithWebIdentityResponse><oops", "not XML"),
        (b"<GetCallerIdentityResponse/>", "not an AssumeRoleWithWebIdentity response"),
        (
            STS_ANSWER.replace(
                b"<SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>", b""
            ),
            "SecretAccessKey is missing",
        ),
        (STS_ANSWER.replace(b"2014-10-24T23:00:23Z", b"tomorrow"), "Expiration is not"),
        (STS_ANSWER.replace(b"2014-10-24T23:00:23Z", b"2014-10-24T23:00:23"), "no time zone"),
        (STS_ANSWER.replace(b"ASgeIAIOSFODNN7EXAMPLE", b"AS<b>x</b>"), "AccessKeyId"),
        (STS_ANSWER.replace(b"AROACLKWSDQRAOEXAMPLE:app1", b"AROA"), "AssumedRoleId"),
    ],
    ids=[
        "dtd",
        "oversized",
        "truncated",
        "other-action",
        "no-secret",
        "bad-expiry",
        "naive-expiry",
        "malformed-key-id",
        "malformed-role-id",
    ],
)
def test_unusable_sts_answers_are_refused_without_echo(body, what):
    with pytest.raises(UpstreamRejected) as err:
        parse_session(body)
    assert err.value.code == "aws_sts_bad_response" and what in str(err.value)
    assert b"wJalr" not in str(err.value).encode()


# -- the IAM deny policy --------------------------------------------------------------

NOW = datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)
FOREIGN = {"Sid": "OperatorsOwn", "Effect": "Deny", "Action": "s3:*", "Resource": "*"}


def deny(hour: str, userids: list[str], before: str) -> dict[str, Any]:
    return {
        "Sid": f"BrokerRevoked{hour}",
        "Effect": "Deny",
        "Action": "*",
        "Resource": "*",
        "Condition": {
            "StringEquals": {"aws:userid": userids},
            "DateLessThan": {"aws:TokenIssueTime": before},
        },
    }


def test_a_first_deny_creates_the_policy():
    doc = ip.with_denied(None, "AROA1:i-1", NOW + timedelta(minutes=5), NOW)
    assert doc == {
        "Version": "2012-10-17",
        "Statement": [deny("2026112710", ["AROA1:i-1"], "2026-11-27T10:05:00Z")],
    }
    assert ip.denies(doc, "AROA1:i-1", NOW + timedelta(minutes=5))
    assert not ip.denies(doc, "AROA1:i-1", NOW + timedelta(minutes=6))
    assert not ip.denies(doc, "AROA1:i-2", NOW)


def test_denies_of_one_hour_merge_and_keep_the_latest_time():
    doc = {
        "Version": "2012-10-17",
        "Statement": [FOREIGN, deny("2026112710", ["AROA1:i-1"], "2026-11-27T10:20:00Z")],
    }
    out = ip.with_denied(doc, "AROA1:i-0", NOW + timedelta(minutes=10), NOW)
    assert out["Statement"] == [
        FOREIGN,
        deny("2026112710", ["AROA1:i-0", "AROA1:i-1"], "2026-11-27T10:20:00Z"),
    ]
    later = ip.with_denied(out, "AROA1:i-2", NOW + timedelta(minutes=30), NOW)
    assert later["Statement"][1] == deny(
        "2026112710", ["AROA1:i-0", "AROA1:i-1", "AROA1:i-2"], "2026-11-27T10:30:00Z"
    )
    assert doc["Statement"][1]["Condition"]["StringEquals"]["aws:userid"] == ["AROA1:i-1"]


def test_a_new_hour_adds_a_statement_and_expired_ones_are_dropped():
    doc = {
        "Version": "2012-10-17",
        "Statement": [
            deny("2026112621", ["AROA1:old"], "2026-11-26T21:59:00Z"),  # ended 12h15m+ ago
            deny("2026112622", ["AROA1:recent"], "2026-11-26T22:10:00Z"),
            FOREIGN,
        ],
    }
    out = ip.with_denied(doc, "AROA1:i-3", NOW + timedelta(hours=1), NOW + timedelta(minutes=20))
    assert out["Statement"] == [
        deny("2026112622", ["AROA1:recent"], "2026-11-26T22:10:00Z"),
        FOREIGN,
        deny("2026112711", ["AROA1:i-3"], "2026-11-27T11:00:00Z"),
    ]


def test_a_policy_past_iams_size_quota_is_refused():
    doc = None
    with pytest.raises(ip.PolicyTooLarge):
        for i in range(1000):
            doc = ip.with_denied(doc, f"AROAEXAMPLEEXAMPLE12:i-{i:08d}", NOW, NOW)
    assert doc is not None and ip.size(doc) <= ip.ROLE_POLICY_MAX_CHARS


@pytest.mark.parametrize(
    "stmt",
    [
        {**deny("2026112710", ["AROA1:i-1"], "2026-11-27T10:05:00Z"), "Effect": "Allow"},
        {**deny("2026112710", ["AROA1:i-1"], "2026-11-27T10:05:00Z"), "Action": "s3:*"},
        {**deny("2026112710", ["AROA1:i-1"], "2026-11-27T10:05:00Z"), "Sid": "Other"},
        {
            **deny("2026112710", ["AROA1:i-1"], "2026-11-27T10:05:00Z"),
            "Condition": {
                "StringEquals": {"aws:userid": ["AROA1:i-1"]},
                "DateLessThan": {"aws:TokenIssueTime": "2026-11-27T10:05:00Z"},
                "Bool": {"aws:SecureTransport": "true"},
            },
        },
    ],
    ids=["allow", "narrower-action", "not-ours", "extra-condition"],
)
def test_only_an_unconditional_deny_of_ours_counts_as_in_place(stmt):
    doc = {"Version": "2012-10-17", "Statement": [stmt]}
    assert not ip.denies(doc, "AROA1:i-1", NOW)


@pytest.mark.parametrize(("mode", "revocable"), [
    ("iam_user", True), ("assumed_role", False), ("federation_token", False),
    ("web_identity", False),
], ids=["iam_user", "assumed_role", "federation_token", "web_identity"])
def test_only_an_iam_user_ends_when_its_vault_lease_is_revoked(mode, revocable):
    # An STS session outlives Vault's lease revocation: releasing one must not free a slot
    # under the lease limit (the service refuses it with lease_not_revocable).
    assert ENGINES["aws"].revocable(role(mode)) is revocable

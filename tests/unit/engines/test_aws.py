"""The aws engine on Vault's documented answers and the credential_process JSON an AWS SDK
reads: its modes, Vault paths, the roles it refuses at load and the sessions it names. What
it hands to the AWS provider (``broker.aws``) is tested in tests/unit/aws. Pure: no Vault,
no AWS."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import botocore.credentials
import pytest

from broker.aws import SessionRef, StsSession, WebIdentityRequest
from broker.aws.sts import web_identity_form
from broker.config import load_settings
from broker.engines import ENGINES
from broker.engines.role import RoleSettings
from broker.errors import BadRequest, ConfigError, UpstreamRejected
from broker.secret import Secret
from tests.unit.aws.settingskit import ARN, STS, WEB, settings_with

AWS = ENGINES["aws"]
EXPIRES = datetime(2026, 11, 27, 10, 15, 0, tzinfo=UTC)


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


# -- the sessions a role names and the token it exchanges ----------------------------


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


# -- what an aws role needs of the rest of the configuration -------------------------


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


@pytest.mark.parametrize(("mode", "revocable"), [
    ("iam_user", True), ("assumed_role", False), ("federation_token", False),
    ("web_identity", False),
], ids=["iam_user", "assumed_role", "federation_token", "web_identity"])
def test_only_an_iam_user_ends_when_its_vault_lease_is_revoked(mode, revocable):
    # An STS session outlives Vault's lease revocation: releasing one must not free a slot
    # under the lease limit (the service refuses it with lease_not_revocable).
    assert ENGINES["aws"].revocable(role(mode)) is revocable

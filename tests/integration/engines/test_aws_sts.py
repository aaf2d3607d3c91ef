"""The aws engine's web_identity path end to end, on real components on loopback: OpenBao
signs an OIDC token for the instance (its token has an identity entity through the token
role's entity alias), the broker exchanges it at STS (moto) for a session the AWS SDK
uses, and termination denies that session in the IAM role's inline policy (moto's IAM)."""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest

from broker.logs import JsonFormatter
from broker.vault.bootstrap import (
    OidcRole,
    configure_oidc_role,
    ensure_workload_entity,
    token_auth_accessor,
)
from broker.vault.client import entity_alias_name
from tests.harness.api import bearer, issue, terminate, wait_job
from tests.harness.moto import ACCESS_KEY_ID, ACCOUNT, SECRET_ACCESS_KEY, MotoServer, StsDoor
from tests.harness.proxy import FaultProxy

OIDC_ROLE = "aws-web"
DENY_POLICY = "broker-revoked-sessions"
SESSION_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "sts:GetCallerIdentity", "Resource": "*"}],
}


@dataclass
class Oidc:
    role: OidcRole
    entity_id: str  # the dev issuer's `payments` workload, created ahead of its first token
    provider_arn: str


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def sts_door(moto):
    door = StsDoor(moto.url)
    await door.start()
    yield door
    await door.stop()


@pytest.fixture(scope="module")
def oidc(bao, vault, vault_setup, moto) -> Oidc:
    role = configure_oidc_role(bao.addr, bao.root_token, OIDC_ROLE, ttl="5m")
    status, _ = vault.call(
        "POST",
        "sys/policies/acl/broker-instance-aws",
        {"policy": f'path "identity/oidc/token/{OIDC_ROLE}" {{ capabilities = ["read"] }}'},
    )
    assert status == 204
    entity = ensure_workload_entity(bao.addr, bao.root_token, entity_alias_name("dev", "payments"))
    provider = moto.client("iam").create_open_id_connect_provider(
        Url=role.issuer, ClientIDList=[role.client_id], ThumbprintList=["0" * 40]
    )
    return Oidc(role, entity, provider["OpenIDConnectProviderArn"])


def iam_role(moto, oidc: Oidc) -> dict[str, Any]:
    """An IAM role whose trust policy admits only this OIDC role's tokens for the workload's
    entity (what production pins; moto does not evaluate it)."""
    host = oidc.provider_arn.split("oidc-provider/", 1)[1]
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Federated": oidc.provider_arn},
                "Action": "sts:AssumeRoleWithWebIdentity",
                "Condition": {
                    "StringEquals": {
                        f"{host}:aud": oidc.role.client_id,
                        f"{host}:sub": oidc.entity_id,
                    }
                },
            }
        ],
    }
    name = "broker-web-" + secrets.token_hex(4)
    return moto.client("iam").create_role(
        RoleName=name, AssumeRolePolicyDocument=json.dumps(trust)
    )["Role"]


async def aws_broker(
    make_broker,
    bao,
    vault_setup,
    moto,
    role_arn: str,
    *,
    sts_url: str,
    iam_url: str | None = None,
    store: str = "postgresql",
    **role: Any,
):
    roles = {
        "web-aws": {
            "engine": "aws",
            "mode": "web_identity",
            "mount": "identity",
            "vault_role": OIDC_ROLE,
            "default_ttl": "15m",
            "max_ttl": "15m",
            "on_limit": "refuse",
            "max_leases_per_instance": 5,
            "options": {"role_arn": role_arn, "session_policy": SESSION_POLICY},
            **role,
        }
    }
    return await make_broker(
        store,
        extra_roles=roles,
        overrides={
            "vault": {
                "addr": bao.addr,
                "auth": {"method": "token", "token": vault_setup.broker_token},
                "instance_policies": ["broker-instance", "broker-instance-aws"],
                "entity_alias": "workload",
            },
            "aws": {
                "region": "us-east-1",
                "sts_endpoint": sts_url,
                "iam_endpoint": iam_url or moto.url,
                "credentials": {
                    "method": "static",
                    "access_key_id": ACCESS_KEY_ID,
                    "secret_access_key": SECRET_ACCESS_KEY,
                },
            },
        },
    )


def _deny_policy(moto, role_name: str) -> dict[str, Any] | None:
    iam = moto.client("iam")
    try:
        return iam.get_role_policy(RoleName=role_name, PolicyName=DENY_POLICY)["PolicyDocument"]
    except iam.exceptions.NoSuchEntityException:
        return None


def _stamp(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@pytest.mark.parametrize("store", ["postgresql", "sqlite"])
async def test_a_web_identity_session_is_usable_and_denied_on_termination(
    make_broker, bao, vault, vault_setup, moto, sts_door, oidc, http, caplog, store
):
    caplog.set_level(logging.DEBUG)
    role = iam_role(moto, oidc)
    b = await aws_broker(
        make_broker, bao, vault_setup, moto, role["Arn"], sts_url=sts_door.url, store=store
    )
    instance, session_name = "gke-proj:4242", "gke-proj=4242"  # ':' maps one-to-one to '='
    sts_door.forms.clear()

    status, cred = await issue(http, b, instance, "web-aws")
    assert status == 201, cred
    data = cred["data"]
    assert (cred["kind"], cred["renewable"], cred["leased"], cred["instance_id"]) == (
        "aws_credentials",
        False,
        True,
        instance,
    )
    assert (
        set(data) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration"}
        and data["Version"] == 1
    )
    expires = datetime.fromisoformat(cred["expires_at"])
    assert _stamp(data["Expiration"]) == expires.replace(microsecond=0)
    lifetime = (expires - datetime.fromisoformat(cred["issued_at"])).total_seconds()
    assert 895 <= lifetime <= 900  # STS's minimum, which the role pins

    # The AWS SDK uses it: the caller is the IAM role, in a session named for the instance.
    sts = moto.client(
        "sts",
        aws_access_key_id=data["AccessKeyId"],
        aws_secret_access_key=data["SecretAccessKey"],
        aws_session_token=data["SessionToken"],
    )
    me = sts.get_caller_identity()
    userid = f"{role['RoleId']}:{session_name}"
    assert (me["Arn"], me["UserId"], me["Account"]) == (
        f"arn:aws:sts::{ACCOUNT}:assumed-role/{role['RoleName']}/{session_name}",
        userid,
        ACCOUNT,
    )

    # What reached STS: the instance's OIDC token, signed by OpenBao for the workload's
    # entity, with the role's session policy and the 15-minute duration.
    [form] = sts_door.forms
    token = form.pop("WebIdentityToken")
    assert form == {
        "Action": "AssumeRoleWithWebIdentity",
        "Version": "2011-06-15",
        "RoleArn": role["Arn"],
        "RoleSessionName": session_name,
        "DurationSeconds": "900",
        "Policy": json.dumps(SESSION_POLICY, separators=(",", ":")),
    }
    keys = jwt.PyJWKClient(f"{bao.addr}/v1/identity/oidc/.well-known/keys")
    claims = jwt.decode(
        token,
        keys.get_signing_key_from_jwt(token).key,
        algorithms=["RS256"],
        audience=oidc.role.client_id,
        issuer=oidc.role.issuer,
    )
    assert (claims["sub"], claims["exp"] - claims["iat"]) == (oidc.entity_id, 300)
    [tok] = b.rows("instance_tokens")
    status, looked = vault.call("POST", "auth/token/lookup-accessor", {"accessor": tok["accessor"]})
    assert status == 200 and looked["data"]["entity_id"] == oidc.entity_id
    status, alias = vault.call("GET", f"identity/entity/id/{oidc.entity_id}")
    assert [(a["name"], a["mount_accessor"]) for a in alias["data"]["aliases"]] == [
        ("dev:payments", token_auth_accessor(bao.addr, bao.root_token))
    ]

    # Recorded as a live lease with no Vault lease and the session to deny; no secret.
    [lease] = b.rows("leases")
    assert (lease["state"], lease["vault_lease_id"], lease["renewable"]) == ("active", None, False)
    ref = lease["external_ref"]  # a JSON column: raw SQLite rows give its text
    assert (json.loads(ref) if isinstance(ref, str) else ref) == {
        "kind": "aws_sts_session",
        "role_arn": role["Arn"],
        "session_name": session_name,
    }
    dump = repr(
        [
            b.rows(t)
            for t in ("instances", "instance_tokens", "leases", "revocation_jobs", "audit_events")
        ]
    )
    for secret in (data["SecretAccessKey"], data["SessionToken"], token):
        assert secret not in dump

    # One session cannot be revoked alone; a lease limit refuses rather than pretends.
    async with http.delete(
        f"{b.url}/v1/leases/{cred['lease_id']}", headers=bearer(b.token(instance))
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "lease_not_revocable"
    assert _deny_policy(moto, role["RoleName"]) is None

    before = datetime.now(UTC).replace(microsecond=0)
    shown = await terminate(http, b, instance)
    after = datetime.now(UTC)
    assert (shown["state"], shown["job"]["state"]) == ("terminated", "done")
    assert [x["state"] for x in shown["leases"]] == ["revoked"]
    assert shown["leases"][0]["external_ref"] == {
        "kind": "aws_sts_session",
        "role_arn": role["Arn"],
        "session_name": session_name,
    }

    policy = _deny_policy(moto, role["RoleName"])
    assert policy is not None
    [stmt] = policy["Statement"]
    at = _stamp(stmt["Condition"]["DateLessThan"]["aws:TokenIssueTime"])
    # Before now plus the clock-skew allowance: covers every session issued so far.
    assert before + timedelta(minutes=5) <= at <= after + timedelta(minutes=5)
    assert policy == {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": f"BrokerRevoked{at:%Y%m%d%H}",
                "Effect": "Deny",
                "Action": "*",
                "Resource": "*",
                "Condition": {
                    "StringEquals": {"aws:userid": [userid]},
                    "DateLessThan": {"aws:TokenIssueTime": f"{at:%Y-%m-%dT%H:%M:%SZ}"},
                },
            }
        ],
    }
    assert datetime.fromisoformat(cred["issued_at"]) < at  # the session was issued before it

    status, body = await issue(http, b, instance, "web-aws")
    assert (status, body["error"]["code"]) == (409, "instance_terminated")

    fmt = JsonFormatter()
    text = "\n".join(fmt.format(r) for r in caplog.records if r.name.startswith("broker"))
    for secret in (
        data["SecretAccessKey"],
        data["SessionToken"],
        token,
        token.split(".")[2],
        SECRET_ACCESS_KEY,
    ):
        assert secret not in text


async def test_denies_of_several_instances_share_the_roles_policy(
    make_broker, bao, vault_setup, moto, sts_door, oidc, http
):
    role = iam_role(moto, oidc)
    b = await aws_broker(make_broker, bao, vault_setup, moto, role["Arn"], sts_url=sts_door.url)
    for instance in ("i-share-1", "i-share-2"):
        status, cred = await issue(http, b, instance, "web-aws")
        assert status == 201, cred
    status, body = await issue(http, b, "i-share-1", "web-aws")
    assert status == 201, body
    for instance in ("i-share-1", "i-share-2"):
        shown = await terminate(http, b, instance)
        assert shown["job"]["state"] == "done"
        assert {x["state"] for x in shown["leases"]} == {"revoked"}
    [stmt] = _deny_policy(moto, role["RoleName"])["Statement"]
    assert stmt["Condition"]["StringEquals"]["aws:userid"] == [
        f"{role['RoleId']}:i-share-1",
        f"{role['RoleId']}:i-share-2",
    ]


@pytest.mark.parametrize(
    "failure,status,code,row",
    [
        ((403, "InvalidIdentityToken"), 502, "aws_sts_rejected", "failed"),
        ((400, "IDPCommunicationError"), 503, "aws_unavailable", "failed"),
        ((503, "ServiceUnavailable"), 503, "aws_unavailable", "failed"),
    ],
    ids=["token-refused", "idp-unreachable", "sts-down"],
)
async def test_sts_refusals_issue_nothing_and_say_why(
    make_broker, bao, vault_setup, moto, sts_door, oidc, http, failure, status, code, row
):
    role = iam_role(moto, oidc)
    b = await aws_broker(make_broker, bao, vault_setup, moto, role["Arn"], sts_url=sts_door.url)
    sts_door.fail_with = failure
    try:
        got, body = await issue(http, b, "i-sts-" + code.replace("_", "-"), "web-aws")
    finally:
        sts_door.fail_with = None
    assert (got, body["error"]["code"]) == (status, code)
    [lease] = b.rows("leases")
    assert (lease["state"], lease["error_code"]) == (row, code)


async def test_instance_ids_without_a_session_name_are_refused_before_anything(
    make_broker, bao, vault_setup, moto, sts_door, oidc, http
):
    role = iam_role(moto, oidc)
    b = await aws_broker(make_broker, bao, vault_setup, moto, role["Arn"], sts_url=sts_door.url)
    status, body = await issue(http, b, "i-" + "0" * 70, "web-aws")  # STS takes at most 64
    assert (status, body["error"]["code"]) == (403, "session_name_refused")
    assert b.rows("leases") == [] and b.rows("instance_tokens") == []


async def test_the_lease_limit_refuses_a_session_it_could_not_revoke(
    make_broker, bao, vault_setup, moto, sts_door, oidc, http
):
    role = iam_role(moto, oidc)
    b = await aws_broker(
        make_broker,
        bao,
        vault_setup,
        moto,
        role["Arn"],
        sts_url=sts_door.url,
        max_leases_per_instance=1,
    )
    assert (await issue(http, b, "i-limit", "web-aws"))[0] == 201
    status, body = await issue(http, b, "i-limit", "web-aws")
    assert (status, body["error"]["code"]) == (409, "lease_limit_reached")


async def test_termination_waits_for_iam_and_marks_revoked_only_once_denied(
    make_broker, bao, vault_setup, moto, sts_door, oidc, http
):
    role = iam_role(moto, oidc)
    proxy = FaultProxy("127.0.0.1", moto.port)
    await proxy.start()
    try:
        b = await aws_broker(
            make_broker,
            bao,
            vault_setup,
            moto,
            role["Arn"],
            sts_url=sts_door.url,
            iam_url=proxy.url,
        )
        status, body = await issue(http, b, "i-iam-down", "web-aws")
        assert status == 201, body
        proxy.cut()
        shown = await terminate(http, b, "i-iam-down", until=("aws_unavailable",))
        # Waiting out its backoff, or already in its next attempt (the last error stays
        # while it runs): either way, not finished.
        assert shown["state"] == "terminating"
        assert shown["job"]["state"] in ("pending", "running")
        assert [x["state"] for x in shown["leases"]] == ["active"]
        assert _deny_policy(moto, role["RoleName"]) is None
        proxy.restore()
        shown = await wait_job(http, b, "i-iam-down")
        assert (shown["job"]["state"], [x["state"] for x in shown["leases"]]) == (
            "done",
            ["revoked"],
        )
        [stmt] = _deny_policy(moto, role["RoleName"])["Statement"]
        assert stmt["Condition"]["StringEquals"]["aws:userid"] == [f"{role['RoleId']}:i-iam-down"]
    finally:
        await proxy.stop()


async def test_a_session_whose_outcome_is_unknown_is_denied_before_it_is_abandoned(
    make_broker, bao, vault_setup, moto, sts_door, oidc, http
):
    """A broker that died between writing the issuing row and recording STS's answer leaves
    the row with the session it was asking for: termination denies it all the same."""
    role = iam_role(moto, oidc)
    b = await aws_broker(make_broker, bao, vault_setup, moto, role["Arn"], sts_url=sts_door.url)
    ref = {"kind": "aws_sts_session", "role_arn": role["Arn"], "session_name": "i-crashed"}
    ticket = await b.broker.components.ledgers.issuance.begin_issue(
        instance_id="i-crashed",
        issuer_name="dev",
        workload="payments",
        role="web-aws",
        kind="aws_credentials",
        external_ref=ref,
    )
    shown = await terminate(http, b, "i-crashed")
    assert shown["job"]["state"] == "done"
    assert [(x["lease_id"], x["state"]) for x in shown["leases"]] == [
        (ticket.lease_id, "abandoned")
    ]
    [stmt] = _deny_policy(moto, role["RoleName"])["Statement"]
    assert stmt["Condition"]["StringEquals"]["aws:userid"] == [f"{role['RoleId']}:i-crashed"]


async def test_a_session_expired_before_termination_needs_no_deny(
    make_broker, bao, vault_setup, moto, sts_door, oidc, http
):
    role = iam_role(moto, oidc)
    b = await aws_broker(make_broker, bao, vault_setup, moto, role["Arn"], sts_url=sts_door.url)
    ref = {"kind": "aws_sts_session", "role_arn": role["Arn"], "session_name": "i-old"}
    store = b.broker.components.ledgers.issuance
    ticket = await store.begin_issue(
        instance_id="i-old",
        issuer_name="dev",
        workload="payments",
        role="web-aws",
        kind="aws_credentials",
        external_ref=ref,
    )
    issued = datetime.now(UTC) - timedelta(hours=1)
    assert await store.complete_issue(
        ticket.lease_id,
        vault_lease_id=None,
        accessor="none",
        renewable=False,
        issued_at=issued,
        expires_at=issued + timedelta(minutes=15),
    )
    shown = await terminate(http, b, "i-old")
    assert (shown["job"]["state"], [x["state"] for x in shown["leases"]]) == ("done", ["revoked"])
    assert _deny_policy(moto, role["RoleName"]) is None

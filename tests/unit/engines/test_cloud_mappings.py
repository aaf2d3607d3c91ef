"""GCP and Azure: mapped on the answers HashiCorp documents for its GCP and Azure secrets
engines (neither is in OpenBao, so neither is exercised end to end here). Each test names
the documented request and feeds the documented response shape; an answer that does not
fit is refused with ``vault_bad_response`` and no credential value in the message."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from pydantic import ValidationError

from broker.engines import ENGINES
from broker.engines.role import RoleSettings
from broker.errors import UpstreamRejected

GCP = ENGINES["gcp"]
AZURE = ENGINES["azure"]

# -- GCP ------------------------------------------------------------------------------


def gcp_role(mode: str | None, vault_role: str = "my-token-roleset") -> RoleSettings:
    return RoleSettings(engine="gcp", mode=mode, mount="gcp", vault_role=vault_role)


# A key file as Google issues it (``TYPE_GOOGLE_CREDENTIALS_FILE``), with fake values.
KEY_FILE = {
    "type": "service_account",
    "project_id": "mygcpproject",
    "private_key_id": "c6bd986da9fac6d71178db41d1741cbe751a5080",
    "private_key": "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANfake\n-----END PRIVATE KEY-----\n",
    "client_email": "vaultmy-key-roles-1537400046@mygcpproject.iam.gserviceaccount.com",
    "client_id": "104153795442349318347",
    "auth_uri": "https://accounts.google.com/o/oauth2/auth",
    "token_uri": "https://oauth2.googleapis.com/token",
}
KEY_DATA = base64.b64encode(json.dumps(KEY_FILE).encode()).decode()
# The documented token answer (``data`` of GET gcp/roleset/:roleset/token).
TOKEN_ANSWER = {
    "token": "ya29.c.Elp5Be3ga87...",
    "expires_at_seconds": 1537400046,
    "token_ttl": 3599,
}
TOKEN_SHAPE = {
    "type": "access_token",
    "access_token": "ya29.c.Elp5Be3ga87...",
    "token_type": "Bearer",
    "expires_at": "2018-09-19T23:34:06Z",
}


@pytest.mark.parametrize(
    "mode,method,path,body,ttl_applied",
    [
        (None, "GET", "gcp/roleset/my-token-roleset/token", None, False),
        ("roleset_token", "GET", "gcp/roleset/my-token-roleset/token", None, False),
        ("static_account_token", "GET", "gcp/static-account/my-token-roleset/token", None, False),
        (
            "impersonated_account_token",
            "GET",
            "gcp/impersonated-account/my-token-roleset/token",
            None,
            False,
        ),
        (
            "roleset_key",
            "POST",
            "gcp/roleset/my-token-roleset/key",
            {
                "key_algorithm": "KEY_ALG_RSA_2048",
                "key_type": "TYPE_GOOGLE_CREDENTIALS_FILE",
                "ttl": "900s",
            },
            True,
        ),
        (
            "static_account_key",
            "POST",
            "gcp/static-account/my-token-roleset/key",
            {
                "key_algorithm": "KEY_ALG_RSA_2048",
                "key_type": "TYPE_GOOGLE_CREDENTIALS_FILE",
                "ttl": "900s",
            },
            True,
        ),
    ],
    ids=[
        "default-is-roleset-token",
        "roleset-token",
        "static-account-token",
        "impersonated-account-token",
        "roleset-key",
        "static-account-key",
    ],
)
def test_gcp_request_per_mode(mode, method, path, body, ttl_applied):
    req = GCP.request(gcp_role(mode), {}, {}, 900)
    assert (req.method, req.path, req.body, req.ttl_applied) == (method, path, body, ttl_applied)


@pytest.mark.parametrize(
    "mode,leased",
    [
        ("roleset_token", False),
        ("static_account_token", False),
        ("impersonated_account_token", False),
        ("roleset_key", True),
        ("static_account_key", True),
    ],
    ids=[
        "roleset-token",
        "static-account-token",
        "impersonated-account-token",
        "roleset-key",
        "static-account-key",
    ],
)
def test_gcp_tokens_are_not_leased_and_keys_are(mode, leased):
    assert GCP.mode(gcp_role(mode)).leased is leased


def test_gcp_engine_identity():
    assert (GCP.name, GCP.kind, list(GCP.modes)) == (
        "gcp",
        "gcp_credential",
        [
            "roleset_token",
            "static_account_token",
            "impersonated_account_token",
            "roleset_key",
            "static_account_key",
        ],
    )


@pytest.mark.parametrize(
    "mode",
    ["roleset_token", "static_account_token", "impersonated_account_token"],
    ids=["roleset", "static-account", "impersonated-account"],
)
def test_gcp_documented_token_answer_becomes_an_access_token(mode):
    assert GCP.shape(gcp_role(mode), TOKEN_ANSWER) == TOKEN_SHAPE


@pytest.mark.parametrize(
    "answer",
    [
        # The plugin's own answer: key_algorithm and key_type as GCP names them.
        {
            "private_key_data": KEY_DATA,
            "key_algorithm": "KEY_ALG_RSA_2048",
            "key_type": "TYPE_GOOGLE_CREDENTIALS_FILE",
        },
        # The API page's sample, which swaps the two values: neither is relied on.
        {
            "private_key_data": KEY_DATA,
            "key_algorithm": "TYPE_GOOGLE_CREDENTIALS_FILE",
            "key_type": "KEY_ALG_RSA_2048",
        },
    ],
    ids=["plugin-answer", "documented-sample"],
)
@pytest.mark.parametrize(
    "mode", ["roleset_key", "static_account_key"], ids=["roleset", "static-account"]
)
def test_gcp_key_answer_becomes_the_decoded_key_file(mode, answer):
    assert GCP.shape(gcp_role(mode), answer) == {
        "type": "service_account_key",
        "credentials": KEY_FILE,
    }


def _b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.b64encode(raw).decode()


BAD_TOKEN = [
    ({}, "token is missing or not a string", "empty"),
    ({"expires_at_seconds": 1537400046}, "token is missing or not a string", "no-token"),
    (
        {"token": "", "expires_at_seconds": 1537400046},
        "token is missing or not a string",
        "empty-token",
    ),
    (
        {"token": ["ya29.LEAK"], "expires_at_seconds": 1537400046},
        "token is missing or not a string",
        "token-list",
    ),
    (
        {"token": "ya29.LEAK"},
        "expires_at_seconds is missing or not a time in epoch seconds",
        "no-expiry",
    ),
    (
        {"token": "ya29.LEAK", "expires_at_seconds": "1537400046"},
        "expires_at_seconds is missing or not a time in epoch seconds",
        "expiry-string",
    ),
    (
        {"token": "ya29.LEAK", "expires_at_seconds": 1537400046.5},
        "expires_at_seconds is missing or not a time in epoch seconds",
        "expiry-float",
    ),
    (
        {"token": "ya29.LEAK", "expires_at_seconds": True},
        "expires_at_seconds is missing or not a time in epoch seconds",
        "expiry-bool",
    ),
    (
        {"token": "ya29.LEAK", "expires_at_seconds": -1},
        "expires_at_seconds is missing or not a time in epoch seconds",
        "expiry-negative",
    ),
    (
        {"token": "ya29.LEAK", "expires_at_seconds": 10**20},
        "expires_at_seconds is missing or not a time in epoch seconds",
        "expiry-overflow",
    ),
    (
        {"token": "ya29.LEAK", "expires_at_seconds": 1537400046000},
        "expires_at_seconds is missing or not a time in epoch seconds",
        "expiry-milliseconds",
    ),
]
BAD_KEY = [
    ({}, "private_key_data is missing or not a string", "empty"),
    ({"private_key_data": None}, "private_key_data is missing or not a string", "null"),
    (
        {"private_key_data": {"private_key": "LEAK"}},
        "private_key_data is missing or not a string",
        "object",
    ),
    (
        {"private_key_data": "not base64 LEAK!"},
        "private_key_data is not a base64 JSON key file",
        "not-base64",
    ),
    (
        {"private_key_data": _b64(b"LEAK key")},
        "private_key_data is not a base64 JSON key file",
        "not-json",
    ),
    (
        {"private_key_data": _b64(b"\xff\xfeLEAK")},
        "private_key_data is not a base64 JSON key file",
        "not-utf8",
    ),
    ({"private_key_data": "LÉAK"}, "private_key_data is not a base64 JSON key file", "not-ascii"),
    (
        {"private_key_data": _b64(b"MIIJqQIBAzCCCW8GCSqGSIb3DQEHAaCCCWAEgglc")},  # a PKCS#12 file
        "private_key_data is not a base64 JSON key file",
        "pkcs12",
    ),
    (
        {"private_key_data": _b64(b"[" * 100_000)},
        "private_key_data is not a base64 JSON key file",
        "nested-too-deep",
    ),
    (
        {"private_key_data": _b64(["LEAK"])},
        "private_key_data is not a service-account key file",
        "json-list",
    ),
    (
        {"private_key_data": _b64({**KEY_FILE, "type": "authorized_user"})},
        "private_key_data is not a service-account key file",
        "user-credentials",
    ),
    (
        {"private_key_data": _b64({k: v for k, v in KEY_FILE.items() if k != "private_key"})},
        "private_key is missing or not a string",
        "no-private-key",
    ),
    (
        {"private_key_data": _b64({**KEY_FILE, "client_email": 7})},
        "client_email is missing or not a string",
        "client-email-number",
    ),
]


@pytest.mark.parametrize(
    "mode,answer,what",
    [
        *(("roleset_token", a, w) for a, w, _ in BAD_TOKEN),
        *(("roleset_key", a, w) for a, w, _ in BAD_KEY),
    ],
    ids=[f"token-{i}" for _, _, i in BAD_TOKEN] + [f"key-{i}" for _, _, i in BAD_KEY],
)
def test_gcp_malformed_answer_is_a_clear_upstream_error(mode, answer, what):
    with pytest.raises(UpstreamRejected) as err:
        GCP.shape(gcp_role(mode), answer)
    assert err.value.code == "vault_bad_response"
    assert err.value.status == 502
    assert err.value.message == (
        f"Vault's GCP answer is not usable: {what}; check the GCP secrets engine and the "
        "Vault role's secret type"
    )
    # Nothing of the answer travels with the error: no chained decode error either.
    assert "LEAK" not in err.value.message and err.value.__cause__ is None
    assert err.value.__suppress_context__ or err.value.__context__ is None


@pytest.mark.parametrize(
    "role,message",
    [
        (
            {"mode": "token"},
            "mode: engine gcp has modes roleset_token, static_account_token, "
            "impersonated_account_token, roleset_key, static_account_key; got 'token'",
        ),
        (
            {"params": {"scopes": "{workload}"}},
            "params: engine gcp takes no scopes (allowed: none)",
        ),
        (
            {"options": {"key_algorithm": "KEY_ALG_RSA_1024"}},
            "options: engine gcp takes no key_algorithm (allowed: none)",
        ),
        (
            {"request_params": ["ttl_override"]},
            "request_params: engine gcp lets a caller send nothing; got ttl_override",
        ),
    ],
    ids=["unknown-mode", "templated-param", "option", "caller-param"],
)
def test_gcp_role_refused_at_load(role, message):
    with pytest.raises(ValidationError) as err:
        RoleSettings(engine="gcp", mount="gcp", vault_role="r", **role)
    assert message in str(err.value)


# -- Azure ----------------------------------------------------------------------------

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SUBSCRIPTION = "a1b2c3d4-0000-4000-8000-123456789abc"
# The documented answer (``data`` of GET azure/creds/:name).
AZURE_ANSWER = {
    "client_id": "408bf248-dd4e-4be5-919a-7f6207a307ab",
    "client_secret": "9PfdaDP9qcf98ggw8WSttfVreFcN4q9c4m4x",
}


def azure_role(**options: Any) -> RoleSettings:
    return RoleSettings(
        engine="azure",
        mount="azure",
        vault_role="my-role",
        options={"tenant_id": TENANT, **options},
    )


def test_azure_request_reads_the_creds_path_without_a_ttl():
    req = AZURE.request(azure_role(), {}, {}, 600)
    assert (req.method, req.path, req.body, req.ttl_applied) == (
        "GET",
        "azure/creds/my-role",
        None,
        False,
    )
    assert (AZURE.name, AZURE.kind, AZURE.mode(azure_role()).leased) == (
        "azure",
        "azure_service_principal",
        True,
    )


@pytest.mark.parametrize(
    "options,expected",
    [
        (
            {},
            {
                "AZURE_CLIENT_ID": "408bf248-dd4e-4be5-919a-7f6207a307ab",
                "AZURE_CLIENT_SECRET": "9PfdaDP9qcf98ggw8WSttfVreFcN4q9c4m4x",
                "AZURE_TENANT_ID": TENANT,
            },
        ),
        (
            {"subscription_id": SUBSCRIPTION},
            {
                "AZURE_CLIENT_ID": "408bf248-dd4e-4be5-919a-7f6207a307ab",
                "AZURE_CLIENT_SECRET": "9PfdaDP9qcf98ggw8WSttfVreFcN4q9c4m4x",
                "AZURE_TENANT_ID": TENANT,
                "AZURE_SUBSCRIPTION_ID": SUBSCRIPTION,
            },
        ),
    ],
    ids=["tenant", "tenant-and-subscription"],
)
def test_azure_documented_answer_becomes_environment_credentials(options, expected):
    assert AZURE.shape(azure_role(**options), AZURE_ANSWER) == expected


def test_azure_answer_fields_beyond_the_documented_ones_are_dropped():
    answer = {**AZURE_ANSWER, "client_secret_key_id": "k", "internal": {"x": 1}}
    assert set(AZURE.shape(azure_role(), answer)) == {
        "AZURE_CLIENT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_TENANT_ID",
    }


@pytest.mark.parametrize(
    "answer,field",
    [
        ({}, "client_id"),
        ({"client_secret": "s3cr3t-value"}, "client_id"),
        ({"client_id": "408bf248-dd4e-4be5-919a-7f6207a307ab"}, "client_secret"),
        (
            {"client_id": "408bf248-dd4e-4be5-919a-7f6207a307ab", "client_secret": ""},
            "client_secret",
        ),
        (
            {
                "client_id": "408bf248-dd4e-4be5-919a-7f6207a307ab",
                "client_secret": ["s3cr3t-value"],
            },
            "client_secret",
        ),
        ({"client_id": 408, "client_secret": "s3cr3t-value"}, "client_id"),
    ],
    ids=["empty", "no-client-id", "no-secret", "empty-secret", "secret-list", "client-id-number"],
)
def test_azure_malformed_answer_is_a_clear_upstream_error(answer, field):
    with pytest.raises(UpstreamRejected) as err:
        AZURE.shape(azure_role(), answer)
    assert (err.value.code, err.value.status) == ("vault_bad_response", 502)
    assert err.value.message == (
        f"Vault's Azure answer is not usable: {field} is missing or not a string; check "
        "the Azure secrets engine"
    )
    assert "s3cr3t" not in err.value.message


@pytest.mark.parametrize(
    "options",
    [
        {"tenant_id": TENANT},
        {"tenant_id": TENANT.upper()},
        {"tenant_id": "contoso.onmicrosoft.com"},
        {"tenant_id": "corp.example.co.uk", "subscription_id": SUBSCRIPTION},
    ],
    ids=["guid", "guid-upper", "onmicrosoft-domain", "custom-domain-and-subscription"],
)
def test_azure_role_accepted(options):
    role = RoleSettings(engine="azure", mount="azure", vault_role="r", options=options)
    assert role.options == options


@pytest.mark.parametrize(
    "options,message",
    [
        ({}, "options: engine azure needs tenant_id"),
        (
            {"tenant_id": "not a tenant"},
            "options.tenant_id: expected the directory (tenant) id, "
            "a GUID, or one of its domains such as contoso.onmicrosoft.com",
        ),
        ({"tenant_id": "72f988bf-86f1-41af-91ab"}, "options.tenant_id: expected"),
        ({"tenant_id": 42}, "options.tenant_id: expected"),
        ({"tenant_id": "contoso"}, "options.tenant_id: expected"),
        (
            {"tenant_id": TENANT, "subscription_id": "prod"},
            "options.subscription_id: expected the subscription id, a GUID",
        ),
        (
            {"tenant_id": TENANT, "client_secret": "x"},
            "options: engine azure takes no client_secret (allowed: subscription_id, tenant_id)",
        ),
    ],
    ids=[
        "no-tenant",
        "tenant-words",
        "tenant-short-guid",
        "tenant-number",
        "tenant-bare-name",
        "subscription-not-guid",
        "unknown-option",
    ],
)
def test_azure_role_refused_at_load(options, message):
    with pytest.raises(ValidationError) as err:
        RoleSettings(engine="azure", mount="azure", vault_role="r", options=options)
    assert message in str(err.value)

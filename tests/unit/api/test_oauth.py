"""RFC 8693 token exchange, the pure part: the form read and checked, each kind's token
response, and each refusal's OAuth error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import pytest

from broker.api import oauth
from broker.api.oauth import ACCESS_TOKEN, FORM, GRANT_TYPE, ID_TOKEN, JWT
from broker.engines import ENGINES
from broker.errors import (
    BadRequest,
    BrokerError,
    InstanceTerminated,
    LeaseLimitReached,
    Locked,
    NotPermitted,
    StoreUnavailable,
    TokenInvalid,
    UpstreamRejected,
    UpstreamUnavailable,
)
from broker.issuance.service import IssuedCredential

BASE = {"grant_type": GRANT_TYPE, "subject_token": "eyJ.a.b", "subject_token_type": JWT,
        "audience": "dev-db"}


def _form(pairs: Any) -> bytes:
    return urlencode(pairs).encode()


def _refused(body: bytes, content_type: str = FORM) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        oauth.read_request(content_type, body)
    return caught.value


# -- the form ------------------------------------------------------------------------------


def test_a_minimal_request_is_read() -> None:
    got = oauth.read_request(FORM, _form(BASE))
    assert (got.subject_token, got.subject_token_type, got.role, got.requested_token_type) == (
        "eyJ.a.b", JWT, "dev-db", None)
    assert "eyJ" not in repr(got)


def test_what_google_auth_sends_is_read() -> None:
    """google-auth's identity_pool credentials: audience, requested_token_type access_token,
    an empty scope it leaves out, and (for workforce pools) a Google ``options`` field."""
    body = _form({**BASE, "requested_token_type": ACCESS_TOKEN, "scope": "a b",
                  "options": "%7B%22userProject%22%3A%20%22x%22%7D"})
    got = oauth.read_request(FORM, body)
    assert (got.role, got.requested_token_type) == ("dev-db", ACCESS_TOKEN)
    assert not oauth.needs_kind(got.requested_token_type)


@pytest.mark.parametrize("token_type", [JWT, ID_TOKEN, ACCESS_TOKEN],
                         ids=["jwt", "id_token", "access_token"])
def test_each_subject_token_type_is_accepted(token_type: str) -> None:
    assert oauth.read_request(FORM, _form({**BASE, "subject_token_type": token_type}))


def test_resource_names_the_role_as_audience_does() -> None:
    no_aud = {k: v for k, v in BASE.items() if k != "audience"}
    assert oauth.read_request(FORM, _form({**no_aud, "resource": "dev-cert"})).role == "dev-cert"
    both = {**BASE, "resource": "dev-db"}
    assert oauth.read_request(FORM, _form(both)).role == "dev-db"


def test_an_empty_parameter_counts_as_not_sent() -> None:
    got = oauth.read_request(FORM, _form({**BASE, "resource": "", "requested_token_type": "",
                                          "actor_token": ""}))
    assert (got.role, got.requested_token_type) == ("dev-db", None)


def test_whitespace_around_the_subject_token_is_not_part_of_it() -> None:
    """As a bearer header's value: a token file written with ``echo`` ends in a newline,
    which google-auth's file source sends as read."""
    got = oauth.read_request(FORM, _form({**BASE, "subject_token": " eyJ.a.b\n"}))
    assert got.subject_token == "eyJ.a.b"
    assert _refused(_form({**BASE, "subject_token": " \n"})).code == "missing_parameter"


def test_unknown_parameters_are_ignored_even_repeated() -> None:
    body = _form([*BASE.items(), ("x-extra", "1"), ("x-extra", "2")])
    assert oauth.read_request(FORM, body).role == "dev-db"


@pytest.mark.parametrize(("pairs", "code"), [
    ({k: v for k, v in BASE.items() if k != "grant_type"}, "missing_parameter"),
    ({**BASE, "grant_type": ""}, "missing_parameter"),
    ({**BASE, "grant_type": "client_credentials"}, "unsupported_grant_type"),
    ({**BASE, "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"},
     "unsupported_grant_type"),
    ({k: v for k, v in BASE.items() if k != "subject_token"}, "missing_parameter"),
    ({k: v for k, v in BASE.items() if k != "subject_token_type"}, "missing_parameter"),
    ({**BASE, "subject_token_type": "urn:ietf:params:oauth:token-type:saml2"},
     "unsupported_token_type"),
    ({**BASE, "subject_token_type": "jwt"}, "unsupported_token_type"),
    ({k: v for k, v in BASE.items() if k != "audience"}, "missing_parameter"),
    ({**BASE, "resource": "dev-cert"}, "conflicting_target"),
    ({**BASE, "actor_token": "eyJ.x.y"}, "actor_token_refused"),
    ({**BASE, "actor_token_type": JWT}, "actor_token_refused"),
    ({**BASE, "requested_token_type": "urn:ietf:params:oauth:token-type:saml2"},
     "unsupported_token_type"),
    ({**BASE, "requested_token_type": "urn:credential-broker:token-type:nothing"},
     "unsupported_token_type"),
], ids=["no_grant_type", "empty_grant_type", "client_credentials", "jwt_bearer",
        "no_subject_token", "no_subject_token_type", "saml2_subject", "bare_jwt_subject",
        "no_audience_or_resource", "audience_and_resource_differ", "actor_token",
        "actor_token_type", "requested_saml2", "requested_unknown_kind"])
def test_a_bad_request_is_refused_with_its_code(pairs: Any, code: str) -> None:
    exc = _refused(_form(pairs))
    assert exc.code == code
    assert "eyJ" not in exc.message


@pytest.mark.parametrize("name", oauth.PARAMETERS)
def test_a_repeated_parameter_is_refused(name: str) -> None:
    body = _form([*BASE.items(), (name, "x"), (name, "y")])
    exc = _refused(body)
    assert (exc.code, exc.message) == ("repeated_parameter",
                                       f"the parameter {name} is sent more than once")


def test_a_parameter_repeated_with_the_same_value_is_refused() -> None:
    assert _refused(_form([*BASE.items(), ("audience", "dev-db")])).code == "repeated_parameter"


@pytest.mark.parametrize(("content_type", "body", "code"), [
    ("application/json", b'{"grant_type": "x"}', "unsupported_media_type"),
    ("application/octet-stream", _form(BASE), "unsupported_media_type"),
    ("multipart/form-data", _form(BASE), "unsupported_media_type"),
    (FORM, b"grant_type=\xff\xfe", "malformed_form"),
    (FORM, b"grant_type=%ff", "malformed_form"),
    (FORM, b"&".join(b"f%d=1" % i for i in range(oauth.MAX_FIELDS + 1)), "malformed_form"),
    (FORM, b"", "missing_parameter"),
], ids=["json", "no_content_type", "multipart", "not_utf8", "percent_not_utf8",
        "too_many_fields", "empty_body"])
def test_a_body_that_is_not_a_form_is_refused(content_type: str, body: bytes, code: str) -> None:
    assert _refused(body, content_type).code == code


# -- the target and the requested type --------------------------------------------------


@pytest.mark.parametrize("role", ["dev-db", "a", "x" * 63])
def test_a_role_name_is_a_target(role: str) -> None:
    assert oauth.target(role) == role


@pytest.mark.parametrize("role", ["../sys/raw", "Dev-DB", "dev-db\n", "x" * 64,
                                  "https://sts.example/dev-db", "-dev"])
def test_a_name_that_cannot_be_a_role_is_refused_as_a_refused_role(role: str) -> None:
    with pytest.raises(NotPermitted) as caught:
        oauth.target(role)
    assert oauth.refusal(caught.value) == oauth.refusal(NotPermitted("role 'x' is not permitted"))


@pytest.mark.parametrize(("requested", "kind"), [
    (None, "database_login"),
    (ACCESS_TOKEN, "database_login"),
    (ACCESS_TOKEN, "oidc_token"),
    ("urn:credential-broker:token-type:database_login", "database_login"),
    (JWT, "oidc_token"),
], ids=["none", "access_token_for_a_login", "access_token_for_oidc", "own_type", "jwt_oidc"])
def test_a_requested_type_the_role_issues_is_accepted(requested: str | None, kind: str) -> None:
    oauth.check_requested(requested, kind)


@pytest.mark.parametrize(("requested", "kind"), [
    (JWT, "database_login"),
    ("urn:credential-broker:token-type:x509_certificate", "database_login"),
    ("urn:credential-broker:token-type:oidc_token", "oidc_token"),
    (ID_TOKEN, "oidc_token"),
], ids=["jwt_for_a_login", "certificate_for_a_login", "broker_urn_for_oidc", "id_token"])
def test_a_requested_type_the_role_does_not_issue_is_refused(requested: str, kind: str) -> None:
    """As an unknown role is, byte for byte: else the answer names the roles a caller may
    have and their kinds; the code stays for the log line."""
    with pytest.raises(NotPermitted) as caught:
        oauth.check_requested(requested, kind)
    assert caught.value.code == "requested_token_type_unavailable"
    assert oauth.refusal(caught.value) == oauth.refusal(NotPermitted("no such role"))


def test_a_role_this_door_cannot_serve_is_answered_as_an_unknown_one() -> None:
    got = oauth.unservable(BadRequest("this role needs csr in the request",
                                      code="missing_parameter"))
    assert got.code == "missing_parameter"
    assert oauth.refusal(got) == oauth.refusal(NotPermitted("no such role"))


def test_a_requested_type_for_a_role_not_permitted_is_invalid_target() -> None:
    with pytest.raises(NotPermitted) as caught:
        oauth.check_requested(JWT, None)
    assert oauth.refusal(caught.value).error == "invalid_target"


# -- the token response ---------------------------------------------------------------------

T0 = datetime(2026, 12, 3, 8, 0, 0, tzinfo=UTC)


def _credential(kind: str, data: dict[str, Any], seconds: float = 600,
                renewable: bool = True) -> IssuedCredential:
    return IssuedCredential(lease_id="l-" + "ab" * 16, instance_id="i-1", workload="payments",
                            role="some-role", kind=kind, data=data, issued_at=T0,
                            expires_at=T0 + timedelta(seconds=seconds), renewable=renewable)


def _lease(kind: str, seconds: float = 600, renewable: bool = True) -> dict[str, Any]:
    return {"lease_id": "l-" + "ab" * 16, "renewable": renewable,
            "expires_at": (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z"),
            "kind": kind, "role": "some-role"}


def _urn(kind: str) -> str:
    return "urn:credential-broker:token-type:" + kind


PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("oidc_token", "oidc_token",
     {"token": "eyJh.b.c", "audience": "sts", "subject": "ent-1", "issuer": "https://bao"},
     {"access_token": "eyJh.b.c", "issued_token_type": JWT, "token_type": "Bearer",
      "audience": "sts", "subject": "ent-1", "issuer": "https://bao"}),
    ("database_login", "database_login", {"username": "v-u", "password": "pw"},
     {"access_token": "pw", "issued_token_type": _urn("database_login"), "token_type": "N_A",
      "username": "v-u"}),
    ("rabbitmq_login", "rabbitmq_login", {"username": "v-r", "password": "pw"},
     {"access_token": "pw", "issued_token_type": _urn("rabbitmq_login"), "token_type": "N_A",
      "username": "v-r"}),
    ("x509_issue", "x509_certificate",
     {"certificate": PEM, "private_key": "KEY", "private_key_type": "ec", "ca_chain": [PEM],
      "issuing_ca": PEM, "serial_number": "1a:2b", "expiration": 1764748800},
     {"access_token": PEM, "issued_token_type": _urn("x509_certificate"), "token_type": "N_A",
      "private_key": "KEY", "private_key_type": "ec", "ca_chain": [PEM], "issuing_ca": PEM,
      "serial_number": "1a:2b", "expiration": 1764748800}),
    ("x509_sign", "x509_certificate", {"certificate": PEM, "serial_number": "1a:2b"},
     {"access_token": PEM, "issued_token_type": _urn("x509_certificate"), "token_type": "N_A",
      "serial_number": "1a:2b"}),
    ("ssh_certificate", "ssh_certificate",
     {"signed_key": "ssh-ed25519-cert-v01@openssh.com AAAA", "serial_number": "7",
      "expiration": 1764748800},
     {"access_token": "ssh-ed25519-cert-v01@openssh.com AAAA",
      "issued_token_type": _urn("ssh_certificate"), "token_type": "N_A", "serial_number": "7",
      "expiration": 1764748800}),
    ("aws_credentials", "aws_credentials",
     {"Version": 1, "AccessKeyId": "AKIA", "SecretAccessKey": "sk", "SessionToken": "st",
      "Expiration": "2026-12-03T08:10:00Z"},
     {"access_token": "sk", "issued_token_type": _urn("aws_credentials"), "token_type": "N_A",
      "Version": 1, "AccessKeyId": "AKIA", "SessionToken": "st",
      "Expiration": "2026-12-03T08:10:00Z"}),
    ("azure_service_principal", "azure_service_principal",
     {"AZURE_CLIENT_ID": "cid", "AZURE_CLIENT_SECRET": "cs", "AZURE_TENANT_ID": "tid"},
     {"access_token": "cs", "issued_token_type": _urn("azure_service_principal"),
      "token_type": "N_A", "AZURE_CLIENT_ID": "cid", "AZURE_TENANT_ID": "tid"}),
    ("gcp_access_token", "gcp_credential",
     {"type": "access_token", "access_token": "ya29.x", "token_type": "Bearer",
      "expires_at": "2026-12-03T08:10:00Z"},
     {"access_token": "ya29.x", "issued_token_type": _urn("gcp_credential"),
      "token_type": "Bearer", "type": "access_token"}),
    ("gcp_key_file", "gcp_credential",
     {"type": "service_account_key",
      "credentials": {"type": "service_account", "private_key": "K", "client_email": "a@b"}},
     {"access_token": '{"client_email":"a@b","private_key":"K","type":"service_account"}',
      "issued_token_type": _urn("gcp_credential"), "token_type": "N_A",
      "type": "service_account_key"}),
    ("kv_v2", "static_secret",
     {"values": {"b": "2", "a": "1"}, "version": 3, "created_time": "2026-01-01T00:00:00Z"},
     {"access_token": '{"a":"1","b":"2"}', "issued_token_type": _urn("static_secret"),
      "token_type": "N_A", "version": 3, "created_time": "2026-01-01T00:00:00Z"}),
]


@pytest.mark.parametrize(("kind", "data", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_each_kind_answers_with_its_primary_secret(kind: str, data: dict[str, Any],
                                                  expected: dict[str, Any]) -> None:
    got = oauth.token_response(_credential(kind, data))
    assert got == {**expected, "expires_in": 600, **_lease(kind)}


def test_every_engine_kind_has_a_token_type() -> None:
    """A new engine without a row here would answer a token exchange with a 500."""
    assert {engine.kind for engine in ENGINES.values()} <= set(oauth.ISSUED)
    assert oauth.ISSUED_TOKEN_TYPES == {JWT, *(_urn(k) for k in oauth.ISSUED
                                               if k != "oidc_token")}


@pytest.mark.parametrize(("seconds", "expires_in"), [
    (600, 600), (599.2, 600), (0.4, 1), (0, 1), (-5, 1), (3600.000001, 3601)],
    ids=["whole", "fraction_rounds_up", "under_a_second", "zero", "past", "just_over"])
def test_expires_in_is_whole_seconds_rounded_up_and_at_least_one(seconds: float,
                                                                 expires_in: int) -> None:
    got = oauth.token_response(_credential("database_login", {"password": "p"}, seconds))
    assert got["expires_in"] == expires_in and isinstance(got["expires_in"], int)


def test_a_data_field_never_replaces_a_member() -> None:
    data = {"password": "p", "lease_id": "l-forged", "role": "admin", "token_type": "Bearer",
            "expires_in": 99999, "kind": "x", "renewable": False, "scope": "all"}
    got = oauth.token_response(_credential("database_login", data))
    assert got == {"access_token": "p", "issued_token_type": _urn("database_login"),
                   "token_type": "N_A", "expires_in": 600, **_lease("database_login")}


def test_a_credential_without_renewal_says_so() -> None:
    got = oauth.token_response(_credential("oidc_token", {"token": "t"}, renewable=False))
    assert got["renewable"] is False


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "expected"), [
    (TokenInvalid("the token has expired", code="token_expired"),
     (400, "invalid_request", "the token has expired", "token_expired")),
    (TokenInvalid("replayed", code="token_replayed"),
     (400, "invalid_request", "replayed", "token_replayed")),
    (BadRequest("grant_type is required", code="missing_parameter"),
     (400, "invalid_request", "grant_type is required", "missing_parameter")),
    (BadRequest("only one grant", code="unsupported_grant_type"),
     (400, "unsupported_grant_type", "only one grant", "unsupported_grant_type")),
    (InstanceTerminated("the instance is terminated"),
     (409, "invalid_request", "the instance is terminated", "instance_terminated")),
    (LeaseLimitReached("too many"), (409, "invalid_request", "too many", "lease_limit_reached")),
    (UpstreamRejected("Vault refused"),
     (502, "temporarily_unavailable", "Vault refused", "vault_rejected")),
    (UpstreamUnavailable("Vault is sealed"),
     (503, "temporarily_unavailable", "Vault is sealed", "vault_unavailable")),
    (StoreUnavailable("no store"), (503, "temporarily_unavailable", "no store",
                                    "store_unavailable")),
    (BrokerError("boom"), (500, "server_error", "boom", "internal_error")),
], ids=["expired", "replayed", "missing", "grant", "terminated", "lease_limit", "vault_502",
        "vault_503", "store_503", "internal"])
def test_each_refusal_maps_to_an_oauth_error(exc: BrokerError,
                                             expected: tuple[int, str, str, str]) -> None:
    got = oauth.refusal(exc)
    assert (got.status, got.error, got.description, got.broker_error) == expected
    assert got.body() == {"error": expected[1], "error_description": expected[2],
                          "broker_error": expected[3]}


@pytest.mark.parametrize("exc", [
    NotPermitted("role 'dev-db' is not permitted for this identity"),
    NotPermitted("role 'nope' is not permitted for this identity"),
    NotPermitted("role 'x' cannot be issued to this instance: y", code="session_name_refused"),
    Locked("lk-123"),
], ids=["refused", "unknown", "session_name", "locked"])
def test_unknown_refused_and_locked_roles_get_one_identical_answer(exc: NotPermitted) -> None:
    got = oauth.refusal(exc)
    assert got == oauth.OAuthRefusal(400, "invalid_target", oauth.TARGET_REFUSED,
                                     "role_not_permitted")
    assert "lk-123" not in str(got.body())


def test_an_error_description_is_only_the_characters_rfc_6749_allows() -> None:
    got = oauth.refusal(BadRequest('bad "x" \\ caf\u00e9\n', code="c")).description
    assert got == "bad 'x' ? caf??"
    assert all(0x20 <= ord(c) <= 0x7E and c not in '"\\' for c in got)


def test_a_body_too_large_is_invalid_request_with_413() -> None:
    assert oauth.too_large().body() == {"error": "invalid_request",
                                        "error_description": "the request body is too large",
                                        "broker_error": "payload_too_large"}
    assert oauth.too_large().status == 413

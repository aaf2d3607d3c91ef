"""Engines: which Vault path, which body, and what of Vault's answer reaches the caller."""

from __future__ import annotations

import pytest

from broker.engines import ENGINES
from broker.engines.role import RoleSettings
from broker.errors import UpstreamRejected
from broker.vault.paths import vault_path

PKI = RoleSettings(engine="pki", mount="pki", vault_role="dev-cert",
                   params={"common_name": "{workload}.workload.internal"})
DB = RoleSettings(engine="database", mount="database", vault_role="dev-db")


def test_pki_issue_request_carries_only_the_templated_name_and_ttl():
    req = ENGINES["pki"].request(PKI, {"common_name": "payments.workload.internal"}, {}, 300)
    assert (req.method, req.path, req.ttl_applied) == ("POST", "pki/issue/dev-cert", True)
    assert req.body == {"common_name": "payments.workload.internal", "ttl": "300s",
                        "format": "pem", "exclude_cn_from_sans": False}


def test_pki_response_keeps_the_certificate_fields_only():
    data = {"certificate": "C", "private_key": "K", "private_key_type": "ec",
            "ca_chain": ["A"], "issuing_ca": "A", "serial_number": "01", "expiration": 5,
            "unexpected": "dropped"}
    shaped = ENGINES["pki"].shape(PKI, data)
    assert shaped == {k: v for k, v in data.items() if k != "unexpected"}


def test_database_request_and_response():
    req = ENGINES["database"].request(DB, {}, {}, 600)
    assert (req.method, req.path, req.body, req.ttl_applied) == (
        "GET", "database/creds/dev-db", None, False)
    assert ENGINES["database"].shape(DB, {"username": "u", "password": "p", "x": 1}) == {
        "username": "u", "password": "p"}


@pytest.mark.parametrize("segments,expected", [
    (("pki", "issue", "dev-cert"), "pki/issue/dev-cert"),
    (("auth", "token", "create", "broker-instance"), "auth/token/create/broker-instance"),
    (("kv", "a@b:c"), "kv/a%40b%3Ac"),
], ids=["plain", "token-role", "escaped"])
def test_vault_path_joins_and_escapes(segments, expected):
    assert vault_path(*segments) == expected


@pytest.mark.parametrize("segment", ["..", "a/b", "", "a..b", "-lead", "a b", "a\n", "x" * 300,
                                     "%2e%2e", "a?b", "a#b"],
                         ids=["dotdot", "slash", "empty", "inner-dotdot", "leading-dash",
                              "space", "newline", "too-long", "encoded-dotdot", "query",
                              "fragment"])
def test_vault_path_refuses_segments_that_could_reach_another_path(segment):
    with pytest.raises(UpstreamRejected) as err:
        vault_path("pki", "issue", segment)
    assert err.value.code == "vault_path_refused"

"""An OIDC token cannot be recalled, so it may not live longer than what the broker granted
for it: not the role's ``max_ttl`` only, but a policy rule's ``max_ttl`` cap and a ttl the
caller asked for. Otherwise a rule granting a workload a minute hands out the Vault OIDC
role's five minutes, which no termination ends. Refused, recorded ``failed``, never
quoting the token, at either door."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from broker.api.oauth import GRANT_TYPE, JWT
from tests.harness.api import issue
from tests.integration.engines.test_oidc import ROLE, oidc_broker


def _capped(minutes_rule: str) -> dict[str, Any]:
    return {
        "rules": [
            {
                "name": "payments",
                "issuer": "dev",
                "match": [{"identity": "workload", "regex": "payments"}],
                "allow": ["dev-cert", "dev-oidc"],
                "max_ttl": minutes_rule,
            }
        ]
    }


def _refused_and_failed(b: Any, status: int, body: Any) -> None:
    assert (status, body["error"]["code"]) == (403, "token_outlives_grant"), body
    assert "eyJ" not in body["error"]["message"]
    [row] = [r for r in b.rows("leases") if r["role"] == "dev-oidc"]
    assert (row["state"], row["error_code"]) == ("failed", "token_outlives_grant")
    # Nothing of the JWT withheld is kept (any JWT's header starts eyJ).
    dump = repr([b.rows(t) for t in ("leases", "audit_events", "instance_tokens")])
    assert "eyJ" not in dump


async def test_a_policy_rules_ttl_cap_holds_for_an_oidc_token(make_broker, bao, vault_setup,
                                                               http):
    b = await make_broker(
        extra_roles={"dev-oidc": dict(ROLE)},
        overrides={
            "vault": {
                "addr": bao.addr,
                "auth": {"method": "token", "token": vault_setup.broker_token},
                "instance_policies": ["broker-instance"],
                "entity_alias": "workload",
            },
            "policy": _capped("1m"),  # the OpenBao role's tokens live 5m
        },
    )
    status, body = await issue(http, b, "i-oidc-capped", "dev-oidc")
    _refused_and_failed(b, status, body)
    # The other door too, with the one invalid_target answer.
    form = {"grant_type": GRANT_TYPE, "subject_token": b.token("i-oidc-capped-2"),
            "subject_token_type": JWT, "audience": "dev-oidc"}
    async with http.post(f"{b.url}/v1/token", data=urlencode(form),
                         headers={"Content-Type": "application/x-www-form-urlencoded"}) as resp:
        got = await resp.json()
        assert (resp.status, got["error"]) == (400, "invalid_target"), got
        assert "access_token" not in got


async def test_a_shorter_ttl_asked_for_is_not_silently_exceeded(make_broker, bao, vault_setup,
                                                                http):
    b = await oidc_broker(make_broker, bao, vault_setup)
    status, body = await issue(http, b, "i-oidc-short", "dev-oidc", ttl=60)
    _refused_and_failed(b, status, body)
    # The role's own TTL still serves.
    status, body = await issue(http, b, "i-oidc-full", "dev-oidc")
    assert status == 201, body

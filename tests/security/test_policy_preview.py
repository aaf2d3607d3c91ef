"""The policy preview (``POST /v1/admin/policy/preview``): admin only, a verdict per role
with the rule that grants it, the same verdict the exchange then gives, and nothing
recorded: the store and Vault are compared whole before and after."""

from __future__ import annotations

from typing import Any

from tests.harness.api import bearer

TABLES = ("instances", "instance_tokens", "leases", "revocation_jobs", "audit_events",
          "seen_tokens")
PREVIEW = "/v1/admin/policy/preview"


def everything(b: Any, vault: Any) -> tuple[dict[str, list[str]], dict[str, Any]]:
    return {t: sorted(map(repr, b.rows(t))) for t in TABLES}, vault.snapshot()


async def preview(http: Any, b: Any, body: Any, headers: dict[str, str] | None = None,
                  ) -> tuple[int, Any]:
    async with http.post(f"{b.url}{PREVIEW}", json=body,
                         headers=b.admin() if headers is None else headers) as resp:
        return resp.status, await resp.json()


async def test_each_role_is_granted_or_refused_with_its_rule_and_nothing_is_recorded(
        broker, http, vault):
    b = broker
    before = everything(b, vault)
    status, answer = await preview(http, b, {
        "issuer": "dev", "claims": {"sub": "payments", "workload": "payments"},
        "roles": ["dev-db", "dev-cert", "dev-db", "no-such-role"], "ttl": "2m"})
    assert status == 200, answer
    assert answer == {
        "issuer": "dev",
        "identity": {"subject": "payments", "workload": "payments", "instance_id": ""},
        "roles": [
            {"role": "dev-db", "granted": True, "code": None, "rule": "dev-workloads",
             "reason": "rule 'dev-workloads' allows role 'dev-db' (ttl capped at 3600s)",
             "ttl": 120},
            {"role": "dev-cert", "granted": True, "code": None, "rule": "dev-workloads",
             "reason": "rule 'dev-workloads' allows role 'dev-cert' (ttl capped at 3600s)",
             "ttl": 120},
            {"role": "dev-db", "granted": True, "code": None, "rule": "dev-workloads",
             "reason": "rule 'dev-workloads' allows role 'dev-db' (ttl capped at 3600s)",
             "ttl": 120},
            {"role": "no-such-role", "granted": False, "code": "role_not_permitted",
             "rule": None, "reason": "role 'no-such-role' does not exist", "ttl": None},
        ],
    }
    # An instance id in the claims is mapped, and still nothing is recorded for it.
    status, answer = await preview(http, b, {
        "issuer": "dev", "claims": {"workload": "Payments", "instance_id": "i-preview"},
        "roles": ["dev-db"]})
    assert status == 200, answer
    assert answer["identity"] == {"subject": "", "workload": "Payments",
                                  "instance_id": "i-preview"}
    assert answer["roles"] == [{
        "role": "dev-db", "granted": False, "code": "role_not_permitted", "rule": None,
        "reason": "no rule applies to this identity (deny by default)", "ttl": None}]
    assert everything(b, vault) == before


async def test_the_exchange_then_answers_as_the_preview_said(broker, http):
    b = broker
    for workload, granted, expected in (("payments", True, 201),
                                        ("Payments", False, 403)):
        status, answer = await preview(http, b, {
            "issuer": "dev", "claims": {"workload": workload}, "roles": ["dev-db"]})
        assert status == 200 and answer["roles"][0]["granted"] is granted
        async with http.post(f"{b.url}/v1/credentials", json={"role": "dev-db"},
                             headers=bearer(b.token(f"i-pv-{workload}", workload))) as resp:
            assert resp.status == expected
            if not granted:
                assert (await resp.json())["error"]["code"] == answer["roles"][0]["code"]


async def test_only_the_admin_may_ask(broker, http, vault):
    b = broker
    body = {"issuer": "dev", "claims": {"workload": "payments"}, "roles": ["dev-db"]}
    before = everything(b, vault)
    for headers, status, code in (
        ({}, 401, "admin_token_missing"),
        ({"Authorization": "Basic eA=="}, 401, "admin_token_missing"),
        (bearer("not-the-admin-token"), 403, "admin_forbidden"),
        (bearer(b.token("i-pv-workload")), 403, "admin_forbidden"),
    ):
        got, answer = await preview(http, b, body, headers)
        assert (got, answer["error"]["code"]) == (status, code), headers
    # Nothing changed but the audit, which records each refusal (admin.refused).
    refused = [r for r in b.rows("audit_events") if r["action"] == "admin.refused"]
    # Refusals without a valid token are one kind per route, code and source: the two
    # missing tokens are one, the wrong token and the workload's token another.
    assert len(refused) == 2
    after = everything(b, vault)
    assert {t: v for t, v in after[0].items() if t != "audit_events"} == \
        {t: v for t, v in before[0].items() if t != "audit_events"}
    assert after[1] == before[1]


async def test_a_bad_request_is_refused_with_its_code_and_records_nothing(broker, http, vault):
    b = broker
    good = {"issuer": "dev", "claims": {"workload": "payments"}, "roles": ["dev-db"]}
    before = everything(b, vault)
    for change, code in (
        ({"issuer": "k8s-prod"}, "invalid_issuer"),
        ({"issuer": None}, "invalid_issuer"),
        ({"issuer": ["dev"]}, "invalid_issuer"),
        ({"claims": None}, "invalid_claims"),
        ({"claims": ["workload"]}, "invalid_claims"),
        ({"claims": {"sub": "payments"}}, "invalid_claims"),
        ({"claims": {"workload": "a b"}}, "invalid_claims"),
        ({"claims": {"workload": "w", "instance_id": "a/../b"}}, "invalid_claims"),
        ({"roles": None}, "invalid_role"),
        ({"roles": []}, "invalid_role"),
        ({"roles": "dev-db"}, "invalid_role"),
        ({"roles": ["Dev-DB"]}, "invalid_role"),
        ({"roles": [7]}, "invalid_role"),
        ({"roles": ["dev-db"] * 33}, "invalid_role"),
        ({"ttl": "soon"}, "invalid_ttl"),
        ({"token": "x"}, "unknown_field"),
    ):
        body = {k: v for k, v in {**good, **change}.items() if v is not None}
        status, answer = await preview(http, b, body)
        assert (status, answer["error"]["code"]) == (400, code), change
        if code == "invalid_issuer":
            # Which issuers exist is the configuration's business, not the answer's.
            assert "dev" not in answer["error"]["message"]
    status, answer = await preview(http, b, {**good, "roles": ["dev-db"] * 32})
    assert status == 200 and len(answer["roles"]) == 32
    assert everything(b, vault) == before


async def test_a_body_nested_too_deeply_is_malformed_not_a_crash(broker, http, vault):
    """Python's JSON parser gives up on deep nesting well within the body size limit: the
    request is refused as malformed, on every endpoint that reads a JSON body."""
    b = broker
    deep = b'{"claims": ' + b"[" * 50_000 + b"}"
    before = everything(b, vault)
    for path, headers in ((PREVIEW, b.admin()),
                          ("/v1/credentials", bearer(b.token("i-pv-deep"))),
                          ("/v1/instances/self/terminate", bearer(b.token("i-pv-deep")))):
        async with http.post(f"{b.url}{path}", data=deep, headers=headers) as resp:
            answer = await resp.json()
        assert (resp.status, answer["error"]) == (400, {
            "code": "malformed_json", "message": "the request body is nested too deeply"}), path
    assert everything(b, vault) == before


async def test_rules_on_iss_and_aud_are_previewed_as_the_exchange_decides(
        make_broker, issuer, http):
    """The injector sends no iss or aud (a pod's token does not exist yet); the broker fills
    them in from the issuer's configuration, so a rule that checks them is previewed as the
    exchange of a real token then decides it."""
    on = [{"identity": "workload", "exact": "payments"}]
    rules = [
        {"name": "by-iss-and-aud", "issuer": "dev", "allow": ["dev-cert"],
         "match": [*on, {"claim": ["iss"], "exact": issuer.issuer},
                   {"claim": ["aud"], "exact": issuer.audience}]},
        {"name": "elsewhere", "issuer": "dev", "allow": ["dev-db"],
         "match": [*on, {"claim": ["iss"], "exact": "https://elsewhere.example"}]},
    ]
    b = await make_broker(overrides={"policy": {"rules": rules}})
    assert b.settings.identity.audience == issuer.audience
    status, answer = await preview(http, b, {
        "issuer": "dev", "claims": {"workload": "payments"}, "roles": ["dev-cert", "dev-db"]})
    assert status == 200, answer
    assert [(r["role"], r["granted"], r["rule"]) for r in answer["roles"]] == [
        ("dev-cert", True, "by-iss-and-aud"), ("dev-db", False, None)]
    for role, expected in (("dev-cert", 201), ("dev-db", 403)):
        async with http.post(f"{b.url}/v1/credentials", json={"role": role},
                             headers=bearer(b.token(f"i-pv-iss-{role}", "payments"))) as resp:
            assert resp.status == expected, (role, await resp.text())

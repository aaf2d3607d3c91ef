"""The HTTP surface as a client sees it: /openapi.json as served, the documented
operations against the routes the application really serves, README's error-code table,
and the exact answers to requests refused for a reason a client can reach."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from broker.app.http_refusals import header_limit
from tests.contract.golden import GOLDEN_DIR, assert_golden
from tests.harness.api import bearer

README = Path(__file__).resolve().parents[2] / "README.md"
WEBHOOK = {"events": {"webhook": {"secrets": ["w" * 40]}}}
# Path parameters that pass the handlers' format checks, so a probe reaches past them.
PATH_VALUES = {"lease_id": "l-" + "0" * 32, "instance_id": "i-probe", "job_id": "j-" + "0" * 32,
               "lock_id": "k-" + "0" * 32}
METHODS = ("get", "post", "put", "patch", "delete")
OAUTH_ERROR = {"$ref": "#/components/schemas/OAuthError"}


def readme_error_codes() -> dict[str, int]:
    """README's ``| Status | Codes |`` table as code -> status."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Status | Codes |"))
    table: dict[str, int] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        status, codes = (cell.strip() for cell in line.strip("|").split("|", 1))
        for code in re.findall(r"`([a-z][a-z0-9_]*)`", codes):
            assert code not in table, f"{code} is listed under two statuses"
            table[code] = int(status)
    return table


async def fetch(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> dict[str, Any]:
    async with http.request(method, url, **kw) as resp:
        raw = await resp.read()
        answer: dict[str, Any] = {"status": resp.status,
                                  "content_type": resp.headers.get("Content-Type")}
        answer["body"] = await resp.json() if raw and resp.content_type == "application/json" \
            else None
        return answer


def error_code(body: dict[str, Any]) -> str:
    """A refusal's code: the broker's shape, or RFC 6749's (POST /v1/token: the broker's
    own code in broker_error)."""
    error = body["error"]
    return error["code"] if isinstance(error, dict) else body.get("broker_error") or error


def pinned_document() -> dict[str, Any]:
    """The document as served, pinned by ``test_openapi_document_as_served``."""
    return json.loads((GOLDEN_DIR / "openapi.json").read_text())


def operations(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((method.upper(), path) for path, item in doc["paths"].items()
                  for method in item if method in METHODS)


async def test_openapi_document_as_served(broker, http):
    answer = await fetch(http, "GET", f"{broker.url}/openapi.json")
    assert (answer["status"], answer["content_type"]) == (200, "application/json; charset=utf-8")
    assert_golden("openapi.json", answer["body"])


async def test_every_documented_operation_is_served_and_guarded_as_documented(make_broker, http):
    """Each documented operation, probed with no credentials, reaches its handler (no
    router 404/405) and is refused by the guard its ``security`` names; the table of
    answers is pinned."""
    b = await make_broker(overrides=WEBHOOK)
    doc = (await fetch(http, "GET", f"{b.url}/openapi.json"))["body"]
    probes: dict[str, Any] = {}
    for method, path in operations(doc):
        url = b.url + path.format(**PATH_VALUES)
        answer = await fetch(http, method, url)
        code = error_code(answer["body"]) if answer["status"] >= 400 else None
        assert answer["status"] != 405 and code != "not_found", (method, path, answer)
        security = doc["paths"][path][method.lower()].get("security")
        if security == [{"identityToken": []}]:
            assert (answer["status"], code) == (401, "token_missing"), (method, path)
        elif security == [{"adminToken": []}]:
            assert (answer["status"], code) == (401, "admin_token_missing"), (method, path)
        probes[f"{method} {path}"] = {"status": answer["status"], "code": code,
                                      "security": security}
    assert_golden("unauthenticated_probes.json", probes)


def test_the_application_serves_exactly_the_documented_operations():
    """The reverse direction: no route the application serves is missing from the
    document but the document itself. The router is read from an application built with
    placeholder dependencies (building it touches none of them)."""
    from broker.api.app import build_app

    placeholder: Any = SimpleNamespace(checks=None, counts=None)
    app = build_app(placeholder, placeholder, None, placeholder, verifier=placeholder,
                    metrics=placeholder, scraper=placeholder, operators=placeholder,
                    refusals=placeholder,
                    max_body_bytes=1024)
    served = sorted({(route.method, route.resource.canonical)
                     for route in app.router.routes() if route.method != "HEAD"})
    assert served == sorted(operations(pinned_document()))


def test_documented_error_statuses_have_readme_codes():
    """Every error status an operation documents has its codes in README's table, and the
    table is pinned code by code."""
    table = readme_error_codes()
    assert len(table) > 50
    statuses = set(table.values())
    doc = pinned_document()
    for method, path in operations(doc):
        responses = doc["paths"][path][method.lower()]["responses"]
        for status, answer in responses.items():
            schema = answer.get("content", {}).get("application/json", {}).get("schema")
            if schema == OAUTH_ERROR:
                continue  # RFC 6749's error vocabulary (POST /v1/token), not the table's
            if int(status) >= 400:
                assert int(status) in statuses, (method, path, status)
    assert_golden("error_codes.json", dict(sorted(table.items())))


BIG = "x" * (80 * 1024)


def refusals(b: Any) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """name -> (method, path, request keywords), each refused for one reason."""
    lease, job = PATH_VALUES["lease_id"], PATH_VALUES["job_id"]

    def workload() -> dict[str, str]:
        return bearer(b.token("i-errors"))

    admin = b.admin()
    return {
        "malformed_json": ("POST", "/v1/credentials",
                           {"headers": workload(), "data": b"{not json"}),
        "malformed_json_not_object": ("POST", "/v1/credentials",
                                      {"headers": workload(), "json": ["dev-cert"]}),
        "token_missing": ("POST", "/v1/credentials", {"json": {"role": "dev-cert"}}),
        "token_missing_wrong_scheme": ("POST", "/v1/credentials",
                                       {"headers": {"Authorization": "Basic x"},
                                        "json": {"role": "dev-cert"}}),
        "token_malformed": ("POST", "/v1/credentials", {"headers": bearer("garbage"),
                                                        "json": {"role": "dev-cert"}}),
        "admin_token_missing": ("GET", "/v1/admin/jobs", {}),
        "admin_forbidden": ("GET", "/v1/admin/jobs", {"headers": bearer("not-the-token")}),
        "role_not_permitted": ("POST", "/v1/credentials",
                               {"headers": workload(), "json": {"role": "no-such-role"}}),
        "invalid_role": ("POST", "/v1/credentials", {"headers": workload(), "json": {}}),
        "invalid_ttl": ("POST", "/v1/credentials",
                        {"headers": workload(), "json": {"role": "dev-cert", "ttl": "soon"}}),
        "invalid_ttl_zero": ("POST", "/v1/credentials",
                             {"headers": workload(), "json": {"role": "dev-cert", "ttl": 0}}),
        "unknown_parameter": ("POST", "/v1/credentials",
                              {"headers": workload(),
                               "json": {"role": "dev-cert", "common_name": "x.example"}}),
        "unknown_field": ("POST", f"/v1/leases/{lease}/renew",
                          {"headers": workload(), "json": {"bogus": 1}}),
        "lease_not_found": ("POST", f"/v1/leases/{lease}/renew", {"headers": workload()}),
        "lease_not_found_bad_id": ("DELETE", "/v1/leases/l-nope", {"headers": workload()}),
        "instance_not_found": ("GET", "/v1/instances/i-none", {"headers": admin}),
        "invalid_instance_id": ("GET", "/v1/instances/-bad", {"headers": admin}),
        "job_not_found": ("POST", f"/v1/admin/jobs/{job}/retry", {"headers": admin}),
        "job_not_found_bad_id": ("POST", "/v1/admin/jobs/j-nope/retry", {"headers": admin}),
        "invalid_query_state": ("GET", "/v1/admin/leases?state=bogus", {"headers": admin}),
        "invalid_query_limit": ("GET", "/v1/admin/leases?limit=0", {"headers": admin}),
        "invalid_query_limit_text": ("GET", "/v1/admin/leases?limit=ten", {"headers": admin}),
        "invalid_query_job_state": ("GET", "/v1/admin/jobs?state=bogus", {"headers": admin}),
        "invalid_query_repeated": ("GET", "/v1/admin/jobs?state=done&state=failed",
                                   {"headers": admin}),
        "invalid_query_cursor": ("GET", "/v1/admin/instances?after=nope", {"headers": admin}),
        "invalid_query_since": ("GET", "/v1/admin/jobs?since=yesterday", {"headers": admin}),
        "invalid_query_group_by": ("GET", "/v1/admin/leases/count", {"headers": admin}),
        "unknown_query": ("GET", "/v1/admin/leases?stat=active", {"headers": admin}),
        "unknown_query_instance": ("GET", "/v1/instances/i-x?verbose=1", {"headers": admin}),
        "lease_not_found_admin": ("GET", f"/v1/admin/leases/{lease}", {"headers": admin}),
        "lease_not_found_resolve": ("POST", f"/v1/admin/leases/{lease}/resolve",
                                    {"headers": admin, "json": {"reason": "ended by hand"}}),
        "invalid_reason_resolve": ("POST", f"/v1/admin/leases/{lease}/resolve",
                                   {"headers": admin, "json": {"reason": "  "}}),
        "invalid_field_reconcile": ("POST", "/v1/admin/reconcile",
                                    {"headers": admin, "json": {"revoke_orphans": "yes"}}),
        "invalid_checkpoints_verify": ("POST", "/v1/admin/audit/verify",
                                       {"headers": admin,
                                        "json": {"checkpoints": ["", "{torn"]}}),
        "unknown_field_reconcile": ("POST", "/v1/admin/reconcile",
                                    {"headers": admin, "json": {"orphans": True}}),
        "invalid_token_field_explain": ("POST", "/v1/admin/policy/explain",
                                        {"headers": admin, "json": {"role": "dev-cert"}}),
        "invalid_reason_self_terminate": ("POST", "/v1/instances/self/terminate",
                                          {"headers": workload(), "json": {"reason": 5}}),
        "unknown_field_self_terminate": ("POST", "/v1/instances/self/terminate",
                                         {"headers": workload(),
                                          "json": {"instance_id": "i-other"}}),
        "invalid_issuer_preview": ("POST", "/v1/admin/policy/preview",
                                   {"headers": admin,
                                    "json": {"issuer": "nope", "claims": {},
                                             "roles": ["dev-cert"]}}),
        "invalid_claims_preview": ("POST", "/v1/admin/policy/preview",
                                   {"headers": admin,
                                    "json": {"issuer": "dev", "claims": {"sub": "x"},
                                             "roles": ["dev-cert"]}}),
        "invalid_role_preview": ("POST", "/v1/admin/policy/preview",
                                 {"headers": admin,
                                  "json": {"issuer": "dev", "claims": {"workload": "w"},
                                           "roles": []}}),
        "payload_too_large": ("POST", "/v1/credentials",
                              {"headers": workload(), "json": {"role": "dev-cert", "csr": BIG}}),
        # Past the issuer's max_token_bytes (16 KiB): the verifier refuses it. Past the HTTP
        # server's header limit (sized from max_token_bytes): the server refuses it, in the
        # same JSON shape.
        "token_too_large": ("POST", "/v1/credentials",
                            {"headers": bearer("e" * (16 * 1024 + 1))}),
        "header_too_large": ("POST", "/v1/credentials",
                             {"headers": bearer("e" * header_limit(16 * 1024))}),
        "not_found_unknown_path": ("GET", "/v1/nothing-here", {}),
        "not_found_webhook_not_configured": ("POST", "/v1/events/terminate", {"json": {}}),
        "method_not_allowed": ("POST", "/healthz", {}),
    }


async def test_refusals_answer_exactly(broker, http):
    """Full answers (status, Content-Type, body) to requests refused for one reason each,
    on the default test broker (no webhook); where README lists the code, the status is
    README's."""
    table = readme_error_codes()
    answers: dict[str, Any] = {}
    for name, (method, path, kw) in refusals(broker).items():
        answer = await fetch(http, method, broker.url + path, **kw)
        code = answer["body"]["error"]["code"]
        if code in table:
            assert answer["status"] == table[code], (name, answer)
        answers[name] = answer
    assert_golden("refusals.json", answers)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_operations_endpoints_answer_exactly(broker, http, path):
    answer = await fetch(http, "GET", broker.url + path)
    assert_golden(f"get{path.replace('/', '_')}.json", answer)

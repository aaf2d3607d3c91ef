"""The OpenAPI document against the application's real router, both ways: every route the
application serves is documented, and every documented operation is served (HEAD left out:
aiohttp adds it to every GET)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from broker.api.app import build_app
from broker.api.openapi import openapi_document

_METHODS = {"get", "put", "post", "delete", "patch", "options", "trace"}


def served_routes() -> set[tuple[str, str]]:
    """(method, path template) of every route, read from an application built with
    placeholder dependencies (building it touches none of them)."""
    placeholder: Any = SimpleNamespace(checks=None, counts=None)
    app = build_app(
        placeholder,
        placeholder,
        None,
        placeholder,
        verifier=placeholder,
        metrics=placeholder,
        scraper=placeholder,
        operators=placeholder,
        refusals=placeholder,
        max_body_bytes=1024,
    )
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def documented_routes() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method in _METHODS
    }


def test_every_served_route_is_documented():
    assert served_routes() - documented_routes() == set()


def test_every_documented_operation_is_served():
    assert documented_routes() - served_routes() == set()


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in openapi_document()["paths"].items()
        for method, operation in item.items()
        if method in _METHODS
    ]


def test_every_operation_documents_the_refusals_its_guards_and_body_can_give():
    for method, path, operation in _operations():
        statuses = set(operation["responses"])
        where = (method, path)
        security = operation.get("security")
        if security == [{"identityToken": []}]:
            assert {"401", "502", "503"} <= statuses, where
        if security == [{"adminToken": []}]:
            assert {"401", "403", "503"} <= statuses, where
        if "requestBody" in operation or any(
            p["in"] in ("path", "query") for p in operation.get("parameters", [])
        ):
            assert "400" in statuses, where
        if "requestBody" in operation:
            assert "413" in statuses, where
        assert {"414", "431"} <= statuses, where


def test_every_success_with_a_body_has_a_schema_and_objects_say_what_is_required():
    def objects(schema: Any) -> list[dict[str, Any]]:
        found = []
        if isinstance(schema, dict):
            if schema.get("type") == "object" and schema.get("properties"):
                found.append(schema)
            for value in schema.values():
                found += objects(value)
        elif isinstance(schema, list):
            for value in schema:
                found += objects(value)
        return found

    for method, path, operation in _operations():
        for status, answer in operation["responses"].items():
            if not status.startswith("2") or status == "204":
                continue
            content = answer.get("content")
            assert content, (method, path, status)
            schema = next(iter(content.values()))["schema"]
            for obj in objects(schema)[:1]:  # the answer itself
                assert obj.get("required"), (method, path, status)


def test_a_credential_links_its_lease_to_renewal_and_release():
    doc = openapi_document()
    ids = {
        operation["operationId"]: (method.upper(), path)
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        if "operationId" in operation
    }
    for path, status in (("/v1/credentials", "201"), ("/v1/token", "200")):
        links = doc["paths"][path]["post"]["responses"][status]["links"]
        targets = {ids[link["operationId"]] for link in links.values()}
        assert targets == {
            ("POST", "/v1/leases/{lease_id}/renew"),
            ("DELETE", "/v1/leases/{lease_id}"),
        }
        for link in links.values():
            assert link["parameters"] == {"lease_id": "$response.body#/lease_id"}

"""The OpenAPI document against the application's real router, both ways: every route the
application serves is documented, and every documented operation is served (HEAD left out:
aiohttp adds it to every GET)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from broker.api.app import build_app
from broker.api.openapi import openapi_document

# Documented but built on another branch (issue 14's POST /v1/token): the merger removes
# this entry once the route is served. Method -> path.
PENDING_ROUTES: dict[str, str] = {"POST": "/v1/token"}
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
    pending = set(PENDING_ROUTES.items())
    assert documented_routes() - served_routes() - pending == set()


def test_pending_routes_are_documented_and_not_yet_served():
    """The pending list only holds what it must: once the route is served, drop it."""
    for route in PENDING_ROUTES.items():
        assert route in documented_routes()
        assert route not in served_routes(), f"{route} is served now: remove it from PENDING"

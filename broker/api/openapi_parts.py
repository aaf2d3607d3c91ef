"""What every module of the OpenAPI document (``broker.api.openapi*``) builds with: an
error answer, a JSON body, a success answer, and the admin security requirement."""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}
ADMIN: list[dict[str, list[str]]] = [{"adminToken": []}]


def err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": ERROR}}}


def body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def ok(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    if schema is None:
        return {"description": desc}
    return {"description": desc, "content": {"application/json": {"schema": schema}}}

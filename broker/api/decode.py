"""Decoding a request: its JSON body, the fields many endpoints share (``ttl``, an
admin action's ``reason`` and ``incident``), and the ids in its path. Each refuses bad
input with a ``BadRequest`` (or ``NotFound``) and its stable code."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from broker.durations import parse_duration
from broker.errors import BadRequest, NotFound
from broker.identity.verify import valid_instance_id

ROLE_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}\Z")
LEASE_ID_PATTERN = re.compile(r"^l-[0-9a-f]{32}\Z")
JOB_ID_PATTERN = re.compile(r"^j-[0-9a-f]{32}\Z")
MAX_REASON = 200
MAX_INCIDENT = 128
# Printable text (a reason, an incident reference): no control character (C0, C1), no
# invisible format or separator character (soft hyphen, bidi controls, zero-width and
# odd spaces, line and paragraph separators, BOM). One pattern for the check and for the
# OpenAPI document, so a request the document allows is never refused for it. Lone
# surrogates are refused besides (not UTF-8; JSON Schema patterns cannot name them).
PRINTABLE_CLASS = (
    "\\u0000-\\u001f\\u007f-\\u00a0\\u00ad\\u0600-\\u0605\\u061c\\u06dd\\u070f\\u1680\\u180e"
    "\\u2000-\\u200f\\u2028-\\u202f\\u205f-\\u206f\\u3000\\ufeff\\ufff9-\\ufffb"
)
PRINTABLE_PATTERN = f"^[^{PRINTABLE_CLASS}]*$"
_PRINTABLE = re.compile(f"^[^{PRINTABLE_CLASS}\\ud800-\\udfff]*\\Z")


def printable(text: str) -> bool:
    """``text`` holds no character ``PRINTABLE_PATTERN`` excludes (nor a lone surrogate)."""
    return _PRINTABLE.match(text) is not None


async def json_object(
    request: web.Request, allowed: set[str] | None, *, max_bytes: int | None = None
) -> dict[str, Any]:
    """The body as a JSON object. ``max_bytes``: this route's own bound on the body, in
    place of the server's (read only after the caller was authenticated)."""
    if request.content_length is None and not request.can_read_body:
        return {}
    if max_bytes is not None:
        request = request.clone(client_max_size=max_bytes)
    raw = await request.read()  # bounded by client_max_size → 413
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON", code="malformed_json") from None
    except RecursionError:  # '[[[[…' within the size limit: refused, not a 500
        raise BadRequest("the request body is nested too deeply", code="malformed_json") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", code="malformed_json")
    if allowed is not None and set(body) - allowed:
        raise BadRequest(
            f"the body has fields the broker does not take; allowed: {', '.join(sorted(allowed))}",
            code="unknown_field",
        )
    return body


def ttl(body: dict[str, Any]) -> int | None:
    if "ttl" not in body or body["ttl"] is None:
        return None
    value = body["ttl"]
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 60.0 is JSON Schema's integer 60, as the document says
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise BadRequest(
            "ttl must be a duration like '10m' or a number of seconds", code="invalid_ttl"
        )
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise BadRequest(
            "ttl must be a duration like '10m' or '1h30m', or a number of seconds, up to 10 years",
            code="invalid_ttl",
        ) from None
    if seconds < 1:
        raise BadRequest("ttl must be at least 1s", code="invalid_ttl")
    return seconds


def reason(body: dict[str, Any]) -> str | None:
    reason = body.get("reason")
    if reason is None or reason == "":
        return None
    if not isinstance(reason, str) or len(reason) > MAX_REASON or not printable(reason):
        raise BadRequest(
            f"'reason' must be printable text of at most {MAX_REASON} characters",
            code="invalid_reason",
        )
    return reason


def said(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """An admin action's ``reason`` and ``incident`` reference, where given."""
    incident = body.get("incident")
    if incident is None or incident == "":
        return reason(body), None
    if (
        not isinstance(incident, str)
        or len(incident) > MAX_INCIDENT
        or not printable(incident)
        or incident != incident.strip()
    ):
        raise BadRequest(
            f"'incident' must be a printable reference of at most {MAX_INCIDENT} characters "
            "(e.g. INC-1234 or a ticket URL)",
            code="invalid_incident",
        )
    return reason(body), incident


def lease_id(request: web.Request) -> str:
    found = request.match_info["lease_id"]
    if not LEASE_ID_PATTERN.match(found):
        raise NotFound("no such lease", code="lease_not_found")
    return found


def instance_id(request: web.Request) -> str:
    found = request.match_info["instance_id"]
    if not valid_instance_id(found):
        raise BadRequest(
            "an instance id is 1-254 of [A-Za-z0-9._:@/-], starting with a letter or digit, "
            "with no '.' or '..' segment (percent-encode '/' in the path)",
            code="invalid_instance_id",
        )
    return found

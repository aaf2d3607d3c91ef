"""Structured (JSON) log lines. Callers pass identifiers in ``extra``; never a token or a
credential value. As a last guard, values that look like Vault tokens or JWTs are masked.

A request's identifiers are gathered while it is served (``request_fields``,
``note_request``): the HTTP layer opens the set and writes the request's one outcome line
from it, and code deeper down adds what only it learns (a lease's role, why policy
refused) without logging a line of its own."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# Vault/OpenBao tokens (legacy s./b./r. and current hvs./hvb./hvr.) and JWT-shaped strings.
_LOOKS_SECRET = re.compile(
    r"(?<![A-Za-z0-9])(?:hv[sbr]|[sbr])\.[A-Za-z0-9_-]{20,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_.-]+"
)


# The identifiers of the request being served in this task (None outside a request).
_REQUEST: ContextVar[dict[str, Any] | None] = ContextVar("broker_request_fields", default=None)


@contextmanager
def request_fields(**known: Any) -> Iterator[dict[str, Any]]:
    """The identifiers of one request, starting with ``known``, gathered until it ends."""
    fields = dict(known)
    token = _REQUEST.set(fields)
    try:
        yield fields
    finally:
        _REQUEST.reset(token)


def note_request(**fields: Any) -> None:
    """Add identifiers (never a secret) to the request being served; nothing outside one."""
    current = _REQUEST.get()
    if current is not None:
        current.update(fields)


def noted() -> dict[str, Any]:
    """What the request being served has gathered so far (a copy; empty outside one)."""
    return dict(_REQUEST.get() or {})


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return _LOOKS_SECRET.sub("***", value)
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_mask(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _mask(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = _mask(value)
        if record.exc_info:
            out["exc"] = _mask(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "apscheduler", "hvac", "urllib3", "botocore", "boto3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

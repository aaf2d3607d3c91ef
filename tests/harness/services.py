"""The machine's services an engine test needs (MariaDB, Redis, RabbitMQ, …).

A test asks for a service with ``require_service``: absent, it is skipped with a loud
reason on a developer's laptop, and fails under ``BROKER_TESTS_REQUIRE_SERVICES=1``, which
``.ci/run`` sets: in CI a missing service is a broken machine, not a pass.
"""

from __future__ import annotations

import os
import socket

import pytest

STRICT_ENV = "BROKER_TESTS_REQUIRE_SERVICES"


def strict() -> bool:
    return os.environ.get(STRICT_ENV) == "1"


def listening(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def service_missing(name: str, why: str) -> None:
    """Skip (or, strictly, fail) the calling test because ``name`` is not available."""
    message = f"SERVICE MISSING: {name}: {why}"
    if strict():
        pytest.fail(f"{message} ({STRICT_ENV}=1 makes this a failure)", pytrace=False)
    pytest.skip(message)


def require_service(name: str, host: str, port: int) -> None:
    if not listening(host, port):
        service_missing(name, f"nothing listens on {host}:{port}")

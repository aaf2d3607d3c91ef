"""JSON log lines: their shape, and the masking of tokens and Secrets wherever they appear."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from typing import Any

import pytest

from broker.logs import JsonFormatter, note_request, noted, request_fields
from broker.secret import Secret


def _logger(stream: io.StringIO) -> logging.Logger:
    logger = logging.getLogger(f"test.logs.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.handlers[:] = [handler]
    return logger


def _log(msg: str, *args: Any, **extra: Any) -> dict[str, Any]:
    stream = io.StringIO()
    logger = _logger(stream)
    logger.info(msg, *args, extra=extra)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


LEGACY_SERVICE = "s." + "Ab3dEf6hIj9kLm2nOp5qRs8t"  # 's.' + 24 alphanumerics
LEGACY_BATCH = "b." + "Zy1xWv2uTs3rQp4oNm5lKj6i"
HVS = "hvs." + "CAESIJk0ePUYdOQXaxhmJw3X"  # current Vault service token form
HVB = "hvb." + "AAAAAQJk0ePUYdOQXaxhmJw3X"
JWT = ("eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9"
       ".eyJzdWIiOiJpLTEyMyIsImF1ZCI6ImJyb2tlciJ9"
       ".MEUCIQDx-y_zAbC123dEf456")

HVR = "hvr." + "AAAAAQJk0ePUYdOQXaxhmJw3X"  # recovery token
LEGACY_RECOVERY = "r." + "Ab3dEf6hIj9kLm2nOp5qRs8t"

SECRET_VALUE = "hunter2-very-secret-value"


def test_secret_not_in_log_line() -> None:
    stream = io.StringIO()
    logger = _logger(stream)
    logger.info("token is %s", Secret(SECRET_VALUE), extra={"tok": Secret(SECRET_VALUE)})
    line = stream.getvalue()
    assert SECRET_VALUE not in line
    out = json.loads(line)
    assert out["msg"] == "token is ***"
    assert out["tok"] == "***"


MASK_CASES = [
    pytest.param(f"vault token {LEGACY_SERVICE}", "vault token ***", id="legacy-service-token"),
    pytest.param(f"token={LEGACY_SERVICE}", "token=***", id="legacy-token-after-equals"),
    pytest.param(f"batch {LEGACY_BATCH} done", "batch *** done", id="legacy-batch-token"),
    pytest.param(f"Bearer {JWT}", "Bearer ***", id="jwt-bearer"),
    pytest.param(f"{JWT} expired", "*** expired", id="jwt-then-text"),
    pytest.param(f"a {LEGACY_SERVICE} b {JWT} c", "a *** b *** c", id="two-secrets"),
    # current Vault/OpenBao token forms (once logged verbatim: the pattern took only a
    # one-letter prefix)
    pytest.param(f"token {HVS}", "token ***", id="hvs-service-token"),
    pytest.param(f"token {HVB}", "token ***", id="hvb-batch-token"),
    pytest.param(f"token={HVR}", "token=***", id="hvr-recovery-token"),
    pytest.param(f"recovery {LEGACY_RECOVERY}", "recovery ***", id="legacy-recovery-token"),
    # no false positives on ordinary identifiers
    pytest.param("instance i-123 workload payments role dev-cert",
                 "instance i-123 workload payments role dev-cert", id="plain-identifiers"),
    pytest.param("s.short and b.tiny", "s.short and b.tiny", id="short-dotted-words"),
    pytest.param("eyJshort", "eyJshort", id="short-eyJ"),
    pytest.param("sha " + "ab" * 32, "sha " + "ab" * 32, id="hex-digest"),
    pytest.param("lease 0b6f4a8e-3c2d-4f7e-9a1b-2c3d4e5f6a7b",
                 "lease 0b6f4a8e-3c2d-4f7e-9a1b-2c3d4e5f6a7b", id="uuid"),
]


@pytest.mark.parametrize(("message", "expected"), MASK_CASES)
def test_message_masked(message: str, expected: str) -> None:
    assert _log(message)["msg"] == expected


@pytest.mark.parametrize(("message", "expected"), MASK_CASES)
def test_message_args_masked(message: str, expected: str) -> None:
    assert _log("%s", message)["msg"] == expected


@pytest.mark.parametrize(("message", "expected"), MASK_CASES)
def test_extra_field_masked(message: str, expected: str) -> None:
    out = _log("event", detail=message, lease_id="l-1", attempts=3)
    assert out["detail"] == expected
    assert out["msg"] == "event"
    assert out["lease_id"] == "l-1"
    assert out["attempts"] == 3


def test_log_line_shape() -> None:
    out = _log("hello %s", "world", instance_id="i-1")
    assert set(out) == {"ts", "level", "logger", "msg", "instance_id"}
    assert out["level"] == "info"
    assert out["logger"].startswith("test.logs.")
    assert out["msg"] == "hello world"
    assert out["instance_id"] == "i-1"


def test_exception_text_masked() -> None:
    stream = io.StringIO()
    logger = _logger(stream)
    try:
        raise RuntimeError(f"vault refused {LEGACY_SERVICE} with {JWT}")
    except RuntimeError:
        logger.exception("failed")
    line = stream.getvalue()
    assert LEGACY_SERVICE not in line
    assert JWT not in line
    out = json.loads(line)
    assert "RuntimeError: vault refused *** with ***" in out["exc"]


# Regression guard: only top-level str extras were once masked, so a token inside a
# dict/list extra was serialised verbatim.
@pytest.mark.parametrize(
    "extra",
    [{"headers": {"Authorization": f"Bearer {JWT}"}}, {"tokens": [LEGACY_SERVICE]},
     {"pair": (HVS, 1)}, {"tokens": {HVB}},
     {"deep": {"a": [{"b": (f"x {HVR}",)}]}}],
    ids=["dict", "list", "tuple", "set", "deeply-nested"],
)
def test_nested_extra_masked(extra: dict[str, Any]) -> None:
    stream = io.StringIO()
    _logger(stream).info("event", extra=extra)
    line = stream.getvalue()
    for secret in (JWT, LEGACY_SERVICE, HVS, HVB, HVR):
        assert secret not in line
    assert "***" in line


def test_nested_extra_keeps_structure_and_plain_values() -> None:
    out = _log("event", headers={"Authorization": f"Bearer {JWT}", "X-Lease": "l-1"},
               attempts=[1, 2], ok=True)
    assert out["headers"] == {"Authorization": "Bearer ***", "X-Lease": "l-1"}
    assert out["attempts"] == [1, 2]
    assert out["ok"] is True


def test_request_fields_gather_notes_until_the_request_ends() -> None:
    note_request(role="ignored")  # outside a request: nothing to add to, nothing kept
    assert noted() == {}
    with request_fields(client="127.0.0.1") as fields:
        note_request(instance_id="i-1", role="dev-db")
        note_request(role="dev-cert")
        assert noted() == {"client": "127.0.0.1", "instance_id": "i-1", "role": "dev-cert"}
        assert fields == noted()
        noted()["lease_id"] = "changed"  # a copy: the request's own set is not changed
        assert "lease_id" not in fields
    assert noted() == {}


async def test_request_fields_are_per_task() -> None:
    """Two requests served at once never mix their identifiers (sleep(0): each yields
    to the other between its notes)."""

    async def request(instance: str) -> dict[str, Any]:
        with request_fields(client=instance):
            note_request(instance_id=instance)
            await asyncio.sleep(0)
            note_request(role=f"role-{instance}")
            await asyncio.sleep(0)
            return noted()

    a, b = await asyncio.gather(request("i-a"), request("i-b"))
    assert a == {"client": "i-a", "instance_id": "i-a", "role": "role-i-a"}
    assert b == {"client": "i-b", "instance_id": "i-b", "role": "role-i-b"}

"""Pure helpers: durations, state machines, retry backoff, Secret, JSON log masking,
Vault path segments and API id patterns."""

from __future__ import annotations

import io
import itertools
import json
import logging
import pickle
import uuid
from typing import Any

import pytest

from broker.api.app import LEASE_ID_PATTERN, ROLE_PATTERN
from broker.backoff import retry_delay
from broker.durations import MAX_SECONDS, format_duration, parse_duration
from broker.errors import UpstreamRejected
from broker.leases.states import (
    FINAL_LEASE_STATES,
    JOB_TRANSITIONS,
    LEASE_TRANSITIONS,
    LIVE_LEASE_STATES,
    JobState,
    LeaseState,
    job_can_move,
    lease_can_move,
)
from broker.logs import JsonFormatter
from broker.secret import Secret
from broker.vault.paths import vault_path

# ---------------------------------------------------------------------------------------------
# durations
# ---------------------------------------------------------------------------------------------

PARSE_OK = [
    ("90s", 90), ("10m", 600), ("1h30m", 5400), (3600, 3600), ("0s", 0), ("0", 0), (0, 0),
    ("3600", 3600), ("1d", 86400), ("2h0m5s", 7205), ("1500ms", 1), ("999ms", 0),
    (" 10m ", 600), (90.9, 90), (MAX_SECONDS, MAX_SECONDS), ("3650d", MAX_SECONDS),
]


@pytest.mark.parametrize(("value", "expected"), PARSE_OK, ids=[repr(v) for v, _ in PARSE_OK])
def test_parse_duration_valid(value: Any, expected: int) -> None:
    result = parse_duration(value)
    assert result == expected
    assert type(result) is int


FORMAT = "expected a duration like '10m', '1h30m' or a number of seconds"
RANGE = r"duration out of range \(0 to 10 years\)"
PARSE_BAD = [
    ("", FORMAT), ("   ", FORMAT), ("10x", FORMAT), ("-5s", FORMAT), ("1h 30m", FORMAT),
    (True, FORMAT), (False, FORMAT), ("h", FORMAT), ("s10", FORMAT), ("1.5h", FORMAT),
    ("10m-", FORMAT), ("10M", FORMAT), ("1h30", FORMAT), ("+5s", FORMAT), ("0x10", FORMAT),
    ("99999999d", RANGE), ("3651d", RANGE), (MAX_SECONDS + 1, RANGE), (-1, RANGE),
    (-0.5, RANGE), (float("inf"), RANGE),
    # only ASCII digits: str.isdigit() alone would take these (float() parses the first two)
    ("\u0663", FORMAT), ("\uff11\uff10", FORMAT), ("\u00b3", FORMAT), ("1\u0660", FORMAT),
]


@pytest.mark.parametrize(("value", "message"), PARSE_BAD, ids=[repr(v) for v, _ in PARSE_BAD])
def test_parse_duration_invalid(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


def test_parse_duration_error_quotes_input_truncated() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration("x" * 100)
    assert str(info.value) == f"{FORMAT}, got {'x' * 32!r}"


FORMAT_CASES = [
    (0, "0s"), (1, "1s"), (59, "59s"), (60, "1m"), (90, "1m30s"), (600, "10m"),
    (3600, "1h"), (3601, "1h1s"), (3661, "1h1m1s"), (5400, "1h30m"), (86400, "24h"),
    (7322, "2h2m2s"),
]


@pytest.mark.parametrize(("seconds", "text"), FORMAT_CASES,
                         ids=[str(s) for s, _ in FORMAT_CASES])
def test_format_duration(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds  # round trip


@pytest.mark.parametrize("seconds", [-1, -3600, -10**9])
def test_format_duration_refuses_negative(seconds: int) -> None:
    with pytest.raises(ValueError) as info:
        format_duration(seconds)
    assert str(info.value) == "a duration is not negative"


@pytest.mark.parametrize("value", ["\u0663s", "\uff11\uff10m", "1\u0660s"],
                         ids=["arabic-indic-3s", "fullwidth-10m", "ascii-then-arabic-0"])
def test_parse_duration_unit_form_refuses_non_ascii_digits(value: str) -> None:
    with pytest.raises(ValueError, match=FORMAT):
        parse_duration(value)


# ---------------------------------------------------------------------------------------------
# state machines (expected tables written out independently of the module)
# ---------------------------------------------------------------------------------------------

L = LeaseState
J = JobState
EXPECTED_LEASE_MOVES = {
    (L.ISSUING, L.ACTIVE), (L.ISSUING, L.DELIVERED), (L.ISSUING, L.FAILED),
    (L.ISSUING, L.ABANDONED),
    (L.ACTIVE, L.RELEASED), (L.ACTIVE, L.REVOKED), (L.ACTIVE, L.REVOKING),
    (L.ACTIVE, L.EXPIRED),
    (L.REVOKING, L.REVOKED), (L.REVOKING, L.EXPIRED),
}
EXPECTED_JOB_MOVES = {
    (J.PENDING, J.RUNNING),
    (J.RUNNING, J.DONE), (J.RUNNING, J.PENDING), (J.RUNNING, J.FAILED), (J.RUNNING, J.RUNNING),
    (J.FAILED, J.PENDING),
}
LEASE_PAIRS = list(itertools.product(LeaseState, LeaseState))
JOB_PAIRS = list(itertools.product(JobState, JobState))


def test_state_values() -> None:
    assert [s.value for s in LeaseState] == ["issuing", "active", "revoking", "delivered",
                                             "failed", "released", "revoked", "abandoned",
                                             "expired"]
    assert [s.value for s in JobState] == ["pending", "running", "done", "failed"]


@pytest.mark.parametrize(("old", "new"), LEASE_PAIRS,
                         ids=[f"{a.value}->{b.value}" for a, b in LEASE_PAIRS])
def test_lease_transitions(old: LeaseState, new: LeaseState) -> None:
    assert lease_can_move(old, new) is ((old, new) in EXPECTED_LEASE_MOVES)


@pytest.mark.parametrize(("old", "new"), JOB_PAIRS,
                         ids=[f"{a.value}->{b.value}" for a, b in JOB_PAIRS])
def test_job_transitions(old: JobState, new: JobState) -> None:
    assert job_can_move(old, new) is ((old, new) in EXPECTED_JOB_MOVES)


def test_every_state_has_a_transition_entry() -> None:
    assert set(LEASE_TRANSITIONS) == set(LeaseState)
    assert set(JOB_TRANSITIONS) == set(JobState)


def test_live_and_final_lease_states() -> None:
    assert LIVE_LEASE_STATES == {L.ISSUING, L.ACTIVE, L.REVOKING}
    assert FINAL_LEASE_STATES == {L.DELIVERED, L.FAILED, L.RELEASED, L.REVOKED, L.ABANDONED,
                                  L.EXPIRED}


@pytest.mark.parametrize("state", [L.DELIVERED, L.FAILED, L.RELEASED, L.REVOKED, L.ABANDONED,
                                   L.EXPIRED],
                         ids=lambda s: s.value)
def test_final_lease_states_have_no_exits(state: LeaseState) -> None:
    assert LEASE_TRANSITIONS[state] == frozenset()
    assert not any(lease_can_move(state, new) for new in LeaseState)


def test_done_job_has_no_exits() -> None:
    assert JOB_TRANSITIONS[J.DONE] == frozenset()
    assert not any(job_can_move(J.DONE, new) for new in JobState)


def test_live_lease_states_can_reach_a_final_state() -> None:
    for state in LIVE_LEASE_STATES:
        assert LEASE_TRANSITIONS[state] & FINAL_LEASE_STATES


# ---------------------------------------------------------------------------------------------
# retry_delay
# ---------------------------------------------------------------------------------------------

DELAY_CASES = [
    # attempt, base, cap, jitter, expected
    (1, 1.0, 300.0, 0.0, 0.5, "first-no-jitter"),
    (1, 1.0, 300.0, 1.0, 1.0, "first-full-jitter"),
    (2, 1.0, 300.0, 0.0, 1.0, "second-no-jitter"),
    (3, 1.0, 300.0, 0.5, 3.0, "third-half-jitter"),
    (4, 2.0, 300.0, 1.0, 16.0, "base-two"),
    (9, 1.0, 300.0, 1.0, 256.0, "below-cap"),
    (10, 1.0, 300.0, 1.0, 300.0, "capped-full-jitter"),
    (10, 1.0, 300.0, 0.0, 150.0, "capped-no-jitter"),
    (1000, 1.0, 300.0, 0.0, 150.0, "huge-attempt-capped"),
    (100, 2.0, 1e12, 1.0, 2.0 * 2**30, "exponent-bounded-at-30"),
    (0, 1.0, 300.0, 1.0, 1.0, "attempt-zero-as-one"),
    (-3, 1.0, 300.0, 1.0, 1.0, "negative-attempt-as-one"),
    (2, 1.0, 300.0, 5.0, 2.0, "jitter-above-one-clamped"),
    (2, 1.0, 300.0, -5.0, 1.0, "jitter-negative-clamped"),
    (3, 10.0, 15.0, 1.0, 15.0, "cap-below-second-step"),
]


@pytest.mark.parametrize(("attempt", "base", "cap", "jitter", "expected"),
                         [c[:5] for c in DELAY_CASES], ids=[c[5] for c in DELAY_CASES])
def test_retry_delay(attempt: int, base: float, cap: float, jitter: float,
                     expected: float) -> None:
    assert retry_delay(attempt, base=base, cap=cap, jitter=jitter) == pytest.approx(expected)


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 0.999, 1.0], ids=lambda j: f"j{j}")
def test_retry_delay_grows_exponentially_then_caps(jitter: float) -> None:
    base, cap = 0.5, 100.0
    delays = [retry_delay(n, base=base, cap=cap, jitter=jitter) for n in range(1, 21)]
    for n, d in enumerate(delays, start=1):
        exp = min(cap, base * 2 ** (n - 1))
        assert exp / 2 <= d <= exp, (n, d, exp)
        assert d == pytest.approx(exp / 2 + exp / 2 * jitter)
    for prev, nxt in itertools.pairwise(delays):
        assert nxt == pytest.approx(min(prev * 2, cap / 2 + cap / 2 * jitter))
    assert delays[-1] == pytest.approx(cap / 2 + cap / 2 * jitter)


# ---------------------------------------------------------------------------------------------
# Secret
# ---------------------------------------------------------------------------------------------

VALUE = "hunter2-very-secret-value"

RENDERINGS = [
    (lambda s: repr(s), "Secret('***')", "repr"),
    (lambda s: str(s), "***", "str"),
    (lambda s: format(s), "***", "format"),
    (lambda s: format(s, ">20"), "***", "format-spec"),
    (lambda s: f"{s}", "***", "fstring"),
    (lambda s: f"{s!s}", "***", "fstring-s"),
    (lambda s: f"{s!r}", "Secret('***')", "fstring-r"),
    (lambda s: f"{s!a}", "Secret('***')", "fstring-a"),
    (lambda s: f"{s:>40}", "***", "fstring-spec"),
    (lambda s: f"{s=}", "s=Secret('***')", "fstring-debug"),
    # the old-style paths are the point of these cases
    (lambda s: "%s" % s, "***", "percent-s"),  # noqa: UP031
    (lambda s: "%r" % (s,), "Secret('***')", "percent-r"),  # noqa: UP031
    (lambda s: "{}".format(s), "***", "str-format"),  # noqa: UP032
    (lambda s: "{0!r}".format(s), "Secret('***')", "str-format-r"),  # noqa: UP030,UP032
    (lambda s: ascii(s), "Secret('***')", "ascii"),
    (lambda s: repr([s]), "[Secret('***')]", "in-list"),
    (lambda s: str({"token": s}), "{'token': Secret('***')}", "in-dict"),
    (lambda s: str(ValueError(s)), "***", "exception-arg"),
    (lambda s: repr(ValueError(s)), "ValueError(Secret('***'))", "exception-repr"),
]


@pytest.mark.parametrize(("render", "expected"), [(r, e) for r, e, _ in RENDERINGS],
                         ids=[i for *_, i in RENDERINGS])
def test_secret_never_rendered(render: Any, expected: str) -> None:
    s = Secret(VALUE)
    out = render(s)
    assert out == expected
    assert VALUE not in out


def test_secret_reveal_and_semantics() -> None:
    s = Secret(VALUE)
    assert s.reveal() == VALUE
    assert s == Secret(VALUE)
    assert s != Secret("other")
    assert s != VALUE  # never equal to the bare string
    assert hash(s) == hash(Secret(VALUE))
    assert bool(s) is True
    assert bool(Secret("")) is False


@pytest.mark.parametrize("value", [b"bytes", 123, None], ids=["bytes", "int", "none"])
def test_secret_holds_only_str(value: Any) -> None:
    with pytest.raises(TypeError, match="Secret holds a str"):
        Secret(value)


def test_secret_has_no_instance_dict() -> None:
    with pytest.raises(TypeError):
        vars(Secret(VALUE))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1),
                         ids=lambda p: f"protocol-{p}")
def test_secret_not_pickled(protocol: int) -> None:
    with pytest.raises(TypeError, match="a Secret is not pickled"):
        pickle.dumps(Secret(VALUE), protocol=protocol)


def test_secret_inside_container_not_pickled() -> None:
    with pytest.raises(TypeError, match="a Secret is not pickled"):
        pickle.dumps({"token": Secret(VALUE)})


def test_secret_not_in_log_line() -> None:
    stream = io.StringIO()
    logger = _logger(stream)
    logger.info("token is %s", Secret(VALUE), extra={"tok": Secret(VALUE)})
    line = stream.getvalue()
    assert VALUE not in line
    out = json.loads(line)
    assert out["msg"] == "token is ***"
    assert out["tok"] == "***"


# ---------------------------------------------------------------------------------------------
# JsonFormatter masking
# ---------------------------------------------------------------------------------------------

def _logger(stream: io.StringIO) -> logging.Logger:
    logger = logging.getLogger(f"test.pure.{uuid.uuid4().hex}")
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
    assert out["logger"].startswith("test.pure.")
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


# ---------------------------------------------------------------------------------------------
# Vault path segments and API id patterns: a trailing newline is refused (the patterns once
# ended in '$', which also matches before a final '\n')
# ---------------------------------------------------------------------------------------------

def test_vault_path_joins_valid_segments() -> None:
    assert vault_path("pki", "issue", "dev-cert") == "pki/issue/dev-cert"


@pytest.mark.parametrize("segment", ["pki\n", "dev-cert\n", "a/b", "..", "a..b", "", "\npki"],
                         ids=["trailing-newline", "role-trailing-newline", "slash", "dotdot",
                              "inner-dotdot", "empty", "leading-newline"])
def test_vault_path_refuses_bad_segment(segment: str) -> None:
    with pytest.raises(UpstreamRejected) as info:
        vault_path("pki", segment)
    assert info.value.code == "vault_path_refused"


@pytest.mark.parametrize(("pattern", "good"), [(ROLE_PATTERN, "dev-cert"),
                                               (LEASE_ID_PATTERN, "l-" + "0f" * 16)],
                         ids=["role", "lease-id"])
def test_api_id_patterns_refuse_trailing_newline(pattern: Any, good: str) -> None:
    assert pattern.match(good)
    assert not pattern.match(good + "\n")

"""The settle table: every outcome of obtaining a credential, under every condition that
can change what the ``issuing`` row becomes, what is taken back and whether the ``jti``
is given back."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from broker.aws import StsSession
from broker.errors import (
    InstanceTerminated,
    Locked,
    StoreUnavailable,
    UpstreamRejected,
    UpstreamUnavailable,
)
from broker.issuance.settle import (
    Obtained,
    Record,
    Refused,
    Settlement,
    Step,
    Unknown,
    Withheld,
    settle,
)
from broker.secret import Secret

SESSION = StsSession(
    access_key_id="ASIA", secret_access_key=Secret("s"), session_token=Secret("t"),
    expiration=datetime(2030, 1, 1, tzinfo=UTC), assumed_role_id="AROA:i-1",
    arn="arn:aws:sts::123456789012:assumed-role/r/i-1",
)
LEASE = "database/creds/dev-db/abc"
CONDITIONS = list(itertools.product([False, True], [False, True]))  # (lease_expected, external)


def _cond_id(lease_expected: bool, external: bool) -> str:
    return f"{'lease-expected' if lease_expected else 'no-lease-expected'}-" \
           f"{'external' if external else 'vault-only'}"


def _obtained(lease: str | None, session: StsSession | None) -> Obtained:
    return Obtained(accessor="acc", answer={"k": "v"}, vault_lease_id=lease, duration=600,
                    renewable=True, session=session)


# -- obtained: handed out, unless Vault gave no lease where one is expected ---------------

OBTAINED_CASES = [
    # (vault lease, STS session, lease expected, external) -> settlement
    *[((LEASE, None, le, ex), Settlement(Record.ACTIVE)) for le, ex in CONDITIONS],
    *[((None, None, False, False), Settlement(Record.DELIVERED))],
    *[((None, None, False, True), Settlement(Record.ACTIVE))],
    *[((None, None, True, ex), Settlement(Record.FAILED, code="vault_no_lease"))
      for ex in (False, True)],
    *[((None, SESSION, le, True), Settlement(Record.ACTIVE)) for le in (False, True)],
    *[((None, SESSION, False, False), Settlement(Record.DELIVERED))],
    *[((None, SESSION, True, False), Settlement(Record.DELIVERED))],
    *[((LEASE, SESSION, le, ex), Settlement(Record.ACTIVE)) for le, ex in CONDITIONS],
]


@pytest.mark.parametrize(
    "case,expected", OBTAINED_CASES,
    ids=[f"{'lease' if c[0] else 'no-lease'}-{'session' if c[1] else 'no-session'}-"
         f"{_cond_id(c[2], c[3])}" for c, _ in OBTAINED_CASES])
def test_obtained(case, expected):
    lease, session, lease_expected, external = case
    out = settle(_obtained(lease, session), lease_expected=lease_expected, external=external)
    assert out == expected


def test_the_obtained_table_covers_every_combination():
    seen = {c for c, _ in OBTAINED_CASES}
    assert seen == set(itertools.product([LEASE, None], [None, SESSION], [False, True],
                                         [False, True]))


# -- refused and unknown: nothing obtained --------------------------------------------

REFUSALS = [
    UpstreamRejected("no", code="vault_permission_denied"),
    UpstreamUnavailable("sealed"),  # a 503 never acted on
    UpstreamRejected("no", code="aws_sts_rejected"),
    InstanceTerminated("tombstoned while the token was recorded"),
]


@pytest.mark.parametrize("error", REFUSALS, ids=[e.code for e in REFUSALS])
@pytest.mark.parametrize("lease_expected,external", CONDITIONS,
                         ids=[_cond_id(*c) for c in CONDITIONS])
def test_refused_fails_the_row_and_gives_the_jti_back(error, lease_expected, external):
    out = settle(Refused(error), lease_expected=lease_expected, external=external)
    assert out == Settlement(Record.FAILED, code=error.code, take_back=False, release_jti=True)


@pytest.mark.parametrize("lease_expected,external", CONDITIONS,
                         ids=[_cond_id(*c) for c in CONDITIONS])
def test_unknown_leaves_the_row_issuing_and_keeps_the_jti(lease_expected, external):
    out = settle(Unknown(UpstreamUnavailable("timed out")), lease_expected=lease_expected,
                 external=external)
    assert out == Settlement(Record.KEEP, code="", take_back=False, release_jti=False)


# -- withheld: obtained, then not handed out -------------------------------------------

FAILED = Record.FAILED
KEEP = Record.KEEP
# (step, the failed call's outcome unknown, external) -> record; the lease, when there is
# one, is always taken back, and the jti is never given back (something was issued).
WITHHELD_TABLE = {
    (Step.FIT, False, False): FAILED,
    (Step.FIT, False, True): FAILED,
    (Step.FIT, True, False): KEEP,
    (Step.FIT, True, True): KEEP,
    (Step.SHAPE, False, False): FAILED,
    (Step.SHAPE, False, True): KEEP,  # a cloud session cannot be taken back
    (Step.SHAPE, True, False): KEEP,
    (Step.SHAPE, True, True): KEEP,
    (Step.RECORD, False, False): KEEP,
    (Step.RECORD, False, True): KEEP,
    (Step.RECORD, True, False): KEEP,
    (Step.RECORD, True, True): KEEP,
    (Step.TERMINATED, False, False): KEEP,
    (Step.TERMINATED, False, True): KEEP,
    (Step.TERMINATED, True, False): KEEP,
    (Step.TERMINATED, True, True): KEEP,
    # A lock appeared while Vault was asked: not recorded, taken back, the row closed.
    (Step.LOCKED, False, False): FAILED,
    (Step.LOCKED, False, True): KEEP,  # a cloud session cannot be taken back
    (Step.LOCKED, True, False): KEEP,
    (Step.LOCKED, True, True): KEEP,
}
ERRORS = {
    Step.FIT: UpstreamRejected("no", code="vault_invalid_request"),
    Step.SHAPE: UpstreamRejected("bad", code="vault_bad_response"),
    Step.RECORD: StoreUnavailable("late", code="lease_state_conflict"),
    Step.TERMINATED: InstanceTerminated("gone"),
    Step.LOCKED: Locked("k-1"),
}
WITHHELD_CASES = [
    (step, unknown, external, lease, lease_expected)
    for (step, unknown, external) in WITHHELD_TABLE
    for lease in (LEASE, None)
    for lease_expected in (False, True)
]


def _withheld_id(case) -> str:
    step, unknown, external, lease, lease_expected = case
    return "-".join([step.value, "unknown" if unknown else "definite",
                     "lease" if lease else "no-lease", _cond_id(lease_expected, external)])


@pytest.mark.parametrize("case", WITHHELD_CASES, ids=[_withheld_id(c) for c in WITHHELD_CASES])
def test_withheld(case):
    step, unknown, external, lease, lease_expected = case
    error = ERRORS[step]
    out = settle(Withheld(error, step, lease, outcome_unknown=unknown),
                 lease_expected=lease_expected, external=external)
    record = WITHHELD_TABLE[(step, unknown, external)]
    assert out == Settlement(record, code=error.code if record is FAILED else "",
                             take_back=lease is not None, release_jti=False)


def test_the_withheld_table_covers_every_step():
    assert {k[0] for k in WITHHELD_TABLE} == set(Step)
    assert len(WITHHELD_TABLE) == len(Step) * 4


# -- after the take-back -----------------------------------------------------------------

@pytest.mark.parametrize("settlement,taken_back,expected", [
    (Settlement(FAILED, code="x", take_back=True), True, FAILED),
    (Settlement(FAILED, code="x", take_back=True), False, KEEP),
    (Settlement(FAILED, code="x"), False, FAILED),
    (Settlement(FAILED, code="x", release_jti=True), False, FAILED),
    (Settlement(KEEP, take_back=True), True, KEEP),
    (Settlement(KEEP, take_back=True), False, KEEP),
    (Settlement(Record.ACTIVE), False, Record.ACTIVE),
    (Settlement(Record.DELIVERED), False, Record.DELIVERED),
], ids=["failed-taken-back", "failed-vault-may-still-hold-it", "failed-nothing-to-take-back",
        "refused", "keep-taken-back", "keep-not-taken-back", "active", "delivered"])
def test_a_lease_vault_may_still_hold_keeps_its_row_issuing(settlement, taken_back, expected):
    assert settlement.after_take_back(taken_back) is expected


@pytest.mark.parametrize("record,hands_out", [
    (Record.ACTIVE, True), (Record.DELIVERED, True), (Record.FAILED, False),
    (Record.KEEP, False),
], ids=["active", "delivered", "failed", "keep"])
def test_only_a_completed_record_hands_the_credential_out(record, hands_out):
    assert Settlement(record).hands_out is hands_out


def test_an_obtained_credential_is_never_printed():
    assert repr(_obtained(LEASE, None)) == f"Obtained(vault_lease_id={LEASE!r}, answer=***)"

"""The bulk termination bodies decoded (``broker.api.selection``): every refusal names
its field and has its code; nothing malformed reaches the store."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.api.selection import selection_of, termination_order
from broker.errors import BadRequest
from broker.leases import Selection

LEASE = "l-" + "0" * 32


def test_a_full_selection_decodes():
    sel = selection_of({
        "instances": ["i-1", "i-1", "i-2"], "workloads": ["w"], "issuers": ["dev"],
        "roles": ["db"], "leases": [LEASE], "claims": ["team=pay", "a.b/c=x=y"],
        "issued_after": "2026-01-01T00:00:00Z", "issued_before": "2026-01-02T00:00:00+02:00"})
    assert sel == Selection(
        instances=("i-1", "i-2"), workloads=("w",), issuers=("dev",), roles=("db",),
        leases=(LEASE,), claims=(("team", "pay"), ("a.b/c", "x=y")),
        issued_after=datetime(2026, 1, 1, tzinfo=UTC),
        issued_before=datetime(2026, 1, 1, 22, tzinfo=UTC))
    assert sel.lease_level and not sel.empty
    assert sel.claims_by_key() == {"a.b/c": ("x=y",), "team": ("pay",)}


@pytest.mark.parametrize("raw,code", [
    (None, "empty_selection"),
    ({}, "empty_selection"),
    ({"instances": []}, "empty_selection"),
    ([], "invalid_selection"),
    ({"nope": ["x"]}, "invalid_selection"),
    ({"instances": "i-1"}, "invalid_selection"),
    ({"instances": ["../x"]}, "invalid_selection"),
    ({"instances": ["i"] * 1001}, "invalid_selection"),
    ({"roles": ["Bad Role"]}, "invalid_selection"),
    ({"leases": ["l-1"]}, "invalid_selection"),
    ({"claims": ["novalue"]}, "invalid_selection"),
    ({"claims": ['k"ey=v']}, "invalid_selection"),
    ({"claims": ["k="]}, "invalid_selection"),
    ({"claims": "k=v"}, "invalid_selection"),
    ({"instances": ["i-1"], "claims": False}, "invalid_selection"),
    ({"claims": ["k=\u202ev"]}, "invalid_selection"),
    ({"issued_after": "yesterday"}, "invalid_selection"),
    ({"issued_after": "2026-01-01T00:00:00"}, "invalid_selection"),
    ({"issued_after": 5}, "invalid_selection"),
], ids=["missing", "empty", "empty_list", "not_object", "unknown_field", "not_list",
        "dot_segment", "too_many", "bad_role", "bad_lease", "claim_no_eq", "claim_quote",
        "claim_empty_value", "claims_not_list", "claims_false", "claim_bidi", "bad_time",
        "naive_time", "time_not_text"])
def test_bad_selections_are_refused(raw, code):
    with pytest.raises(BadRequest) as info:
        selection_of(raw)
    assert info.value.code == code


def test_a_termination_order_decodes_with_defaults():
    order = termination_order({"selection": {"workloads": ["w"]}})
    assert (order.reason, order.incident, order.max_instances, order.after, order.batch) == (
        None, None, None, None, 200)
    order = termination_order({"selection": {"workloads": ["w"]}, "reason": "leak",
                               "incident": "INC-7", "max": 10, "after": "i-5", "batch": 1000})
    assert (order.reason, order.incident, order.max_instances, order.after, order.batch) == (
        "leak", "INC-7", 10, "i-5", 1000)


@pytest.mark.parametrize("extra,code", [
    ({"batch": 0}, "invalid_field"), ({"batch": 1001}, "invalid_field"),
    ({"batch": True}, "invalid_field"), ({"max": 0}, "invalid_field"),
    ({"max": "5"}, "invalid_field"), ({"after": "../x"}, "invalid_field"),
    ({"reason": "x" * 201}, "invalid_reason"), ({"reason": "a\nb"}, "invalid_reason"),
    ({"incident": "x" * 129}, "invalid_incident"),
], ids=["batch_zero", "batch_big", "batch_bool", "max_zero", "max_text", "bad_cursor",
        "long_reason", "reason_newline", "long_incident"])
def test_bad_termination_fields_are_refused(extra, code):
    with pytest.raises(BadRequest) as info:
        termination_order({"selection": {"workloads": ["w"]}, **extra})
    assert info.value.code == code

"""OCSF records of audit events, checked against each class's required fields and types
(a small schema of our own: the classes' required attributes in OCSF 1.1)."""

from __future__ import annotations

import json

import pytest

from broker.audit.ocsf import to_ocsf

BASE = {"class_uid": int, "class_name": str, "category_uid": int, "category_name": str,
        "activity_id": int, "activity_name": str, "type_uid": int, "time": int,
        "status_id": int, "severity_id": int, "actor": dict, "metadata": dict,
        "raw_data": str}
PER_CLASS = {3002: {"user": dict, "service": dict}, 3001: {"user": dict},
             6003: {"api": dict}}
CATEGORY = {3002: 3, 3001: 3, 6003: 6}


def check_shape(record: dict) -> None:
    wanted = {**BASE, **PER_CLASS[record["class_uid"]]}
    for field, kind in wanted.items():
        assert isinstance(record.get(field), kind), (field, record.get(field))
    assert record["category_uid"] == CATEGORY[record["class_uid"]]
    assert record["type_uid"] == record["class_uid"] * 100 + record["activity_id"]
    assert record["status_id"] in (1, 2) and 0 <= record["severity_id"] <= 6
    assert isinstance(record["actor"]["user"]["name"], str)
    meta = record["metadata"]
    assert isinstance(meta["product"]["name"], str) and isinstance(meta["version"], str)
    assert isinstance(meta["uid"], str)
    if record["class_uid"] == 6003:
        assert isinstance(record["api"]["operation"], str)
    json.dumps(record)


def event(action, actor="operator:alice", outcome="ok", **kw):
    return {"seq": 12, "at": "2026-01-01T12:00:00.250000Z", "actor": actor, "action": action,
            "instance_id": kw.get("instance_id", "i-1"), "lease_id": kw.get("lease_id"),
            "outcome": outcome, "reason": kw.get("reason"), "detail": {}, "prev_hash": "0" * 64,
            "hash": "a" * 64}


@pytest.mark.parametrize(("ev", "class_uid", "activity"), [
    (event("lease.issued", "workload", lease_id="l-1"), 3002, 1),
    (event("lease.renewed", "workload", lease_id="l-1"), 3002, 99),
    (event("lease.released", "workload", lease_id="l-1"), 3002, 2),
    (event("instance.terminate_requested", reason="incident 7"), 3001, 5),
    (event("instance.terminated", "worker-1"), 3001, 6),
    (event("leases.revoked", "worker-1"), 3001, 6),
    (event("leases.expired", "reconciler"), 3001, 6),
    (event("lock.created"), 3001, 9),
    (event("revocation.requeued"), 3001, 99),
    (event("admin.refused", outcome="refused", instance_id=None), 6003, 99),
    (event("job.retry"), 6003, 99),
], ids=lambda v: v["action"] if isinstance(v, dict) else str(v))
def test_each_event_maps_to_its_class_with_the_required_fields(ev, class_uid, activity):
    record = to_ocsf(ev, version="0.1.0")
    check_shape(record)
    assert (record["class_uid"], record["activity_id"]) == (class_uid, activity)
    assert record["time"] == 1767268800250
    assert record["metadata"]["uid"] == "12"
    assert record["metadata"]["product"]["version"] == "0.1.0"
    assert record["unmapped"] == {"hash": "a" * 64, "prev_hash": "0" * 64}
    assert json.loads(record["raw_data"])["action"] == ev["action"]


def test_a_refusal_is_a_failure_with_a_higher_severity():
    record = to_ocsf(event("admin.refused", outcome="refused"))
    assert (record["status_id"], record["severity_id"], record["status_detail"]) == (
        2, 3, "refused")
    ok = to_ocsf(event("job.retry"))
    assert (ok["status_id"], ok["severity_id"]) == (1, 1)


def test_a_renewal_by_an_operator_is_not_a_workload_authentication():
    assert to_ocsf(event("lease.renewed", "operator:bob"))["class_uid"] == 3001

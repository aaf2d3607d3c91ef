"""The pod watch's decisions, over plain data: every event type, every pod phase, malformed
input, and the comparison a relist makes; and which names may reach an API-server URL."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.events.pod_watch import Action, Verb, decide, parse_event, plan_relist
from broker.kubernetes import valid_namespace, valid_pod_name
from tests.harness.kube import UID, load_pods, load_stream, pod


def ev(kind: Any, obj: Any) -> dict[str, Any]:
    return {"type": kind, "object": obj}


GONE = Action(Verb.RELIST, reason="gone")
GARBLED = Action(Verb.RELIST, reason="garbled")

DECISIONS = [
    ("added-pending", ev("ADDED", pod(phase="Pending")), Action(Verb.TRACK, UID, "41230")),
    ("added-running", ev("ADDED", pod()), Action(Verb.TRACK, UID, "41230")),
    ("added-no-status", ev("ADDED", pod(phase=None)), Action(Verb.TRACK, UID, "41230")),
    ("added-unknown-phase", ev("ADDED", pod(phase="Unknown")), Action(Verb.TRACK, UID, "41230")),
    ("added-already-succeeded", ev("ADDED", pod(phase="Succeeded")),
     Action(Verb.TERMINATE, UID, "41230", "finished")),
    ("modified-running", ev("MODIFIED", pod()), Action(Verb.TRACK, UID, "41230")),
    # A pod in its grace period still runs: not terminated until it is deleted or finished.
    ("modified-deletion-timestamp", ev("MODIFIED", pod(deleting=True)),
     Action(Verb.TRACK, UID, "41230")),
    ("modified-succeeded", ev("MODIFIED", pod(phase="Succeeded")),
     Action(Verb.TERMINATE, UID, "41230", "finished")),
    ("modified-failed", ev("MODIFIED", pod(phase="Failed")),
     Action(Verb.TERMINATE, UID, "41230", "finished")),
    ("modified-failed-while-deleting", ev("MODIFIED", pod(phase="Failed", deleting=True)),
     Action(Verb.TERMINATE, UID, "41230", "finished")),
    ("modified-phase-not-a-string", ev("MODIFIED", pod(phase=7)),  # type: ignore[arg-type]
     Action(Verb.TRACK, UID, "41230")),
    ("deleted-running", ev("DELETED", pod()), Action(Verb.TERMINATE, UID, "41230", "deleted")),
    ("deleted-succeeded", ev("DELETED", pod(phase="Succeeded")),
     Action(Verb.TERMINATE, UID, "41230", "deleted")),
    ("bookmark", ev("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": "41300"}}),
     Action(Verb.BOOKMARK, resource_version="41300")),
    ("bookmark-without-rv", ev("BOOKMARK", {"kind": "Pod", "metadata": {}}), GARBLED),
    ("bookmark-rv-not-a-string", ev("BOOKMARK", {"metadata": {"resourceVersion": 41300}}),
     GARBLED),
    ("error-410-code", ev("ERROR", {"kind": "Status", "code": 410, "reason": "Expired"}), GONE),
    ("error-410-reason-only", ev("ERROR", {"kind": "Status", "reason": "Gone"}), GONE),
    ("error-500", ev("ERROR", {"kind": "Status", "code": 500, "reason": "InternalError"}),
     Action(Verb.RETRY, reason="error 500")),
    ("error-no-code", ev("ERROR", {"kind": "Status"}), Action(Verb.RETRY, reason="error")),
    ("unknown-type-keeps-position", ev("SYNC", pod()),
     Action(Verb.IGNORE, resource_version="41230", reason="event type SYNC")),
    ("deleted-without-uid", ev("DELETED", pod(uid=None)), GARBLED),
    ("deleted-uid-with-slash", ev("DELETED", pod(uid="../../x")), GARBLED),
    ("deleted-uid-empty", ev("DELETED", pod(uid="")), GARBLED),
    ("deleted-without-rv", ev("DELETED", pod(rv=None)), GARBLED),
    ("modified-without-uid", ev("MODIFIED", pod(uid=None)), GARBLED),
    ("object-not-a-mapping", ev("DELETED", ["pod"]), GARBLED),
    ("metadata-not-a-mapping", ev("DELETED", {"metadata": "x"}), GARBLED),
    ("type-missing", {"object": pod()}, GARBLED),
    ("type-not-a-string", ev(3, pod()), GARBLED),
    ("not-a-mapping", ["DELETED"], GARBLED),
    ("none", None, GARBLED),
]


@pytest.mark.parametrize(("event", "expected"), [(e, a) for _, e, a in DECISIONS],
                         ids=[i for i, _, _ in DECISIONS])
def test_decide(event: Any, expected: Action) -> None:
    assert decide(event) == expected


RECORDED = [
    ("watch-added.jsonl", [Action(Verb.TRACK, "0f6d2c8e-5a1b-4d9c-8e3f-2a4b6c8d0e55", "41210"),
                           Action(Verb.TRACK, "0f6d2c8e-5a1b-4d9c-8e3f-2a4b6c8d0e55", "41212")]),
    ("watch-force-deleted.jsonl", [Action(Verb.TRACK, UID, "41230"),
                                   Action(Verb.TERMINATE, UID, "41231", "deleted")]),
    ("watch-graceful-delete.jsonl", [
        Action(Verb.TRACK, "8e2d4b17-2c6f-4f0a-b3d9-71a5c0e9f822", "41240"),
        Action(Verb.TERMINATE, "8e2d4b17-2c6f-4f0a-b3d9-71a5c0e9f822", "41246", "finished"),
        Action(Verb.TERMINATE, "8e2d4b17-2c6f-4f0a-b3d9-71a5c0e9f822", "41247", "deleted")]),
    ("watch-job-succeeded.jsonl", [
        Action(Verb.TERMINATE, "5b9a0c3e-1d7f-4e62-8c4a-93d2f6b1a733", "41320", "finished")]),
    ("watch-bookmark.jsonl", [Action(Verb.BOOKMARK, resource_version="41300")]),
    ("watch-expired.jsonl", [GONE]),
]


@pytest.mark.parametrize(("name", "expected"), RECORDED, ids=[n for n, _ in RECORDED])
def test_recorded_streams(name: str, expected: list[Action]) -> None:
    assert [decide(parse_event(line)) for line in load_stream(name)] == expected


PARSE = [
    ("object", b'{"type":"BOOKMARK"}', {"type": "BOOKMARK"}),
    ("truncated", b'{"type":"DELETED","object":{"metadata":', None),
    ("not-json", b"<html>502 Bad Gateway</html>", None),
    ("array", b"[1,2]", None),
    ("string", b'"DELETED"', None),
    ("invalid-utf8", b'{"type":"\xff"}', None),
    ("empty", b"", None),
]


@pytest.mark.parametrize(("line", "expected"), [(ln, e) for _, ln, e in PARSE],
                         ids=[i for i, _, _ in PARSE])
def test_parse_event(line: bytes, expected: Any) -> None:
    assert parse_event(line) == expected


def test_garbled_lines_decide_relist() -> None:
    for _, line, _ in PARSE[1:]:
        assert decide(parse_event(line)) == GARBLED


A, B, C, D = "uid-a", "uid-b", "uid-c", "uid-d"

RELISTS = [
    ("first-list", [pod(A), pod(B)], None, None, {A, B}, ()),
    ("nothing-changed", [pod(A), pod(B)], {A, B}, {A, B}, {A, B}, ()),
    ("deleted-in-the-gap", [pod(B)], {A, B}, None, {B}, (A,)),
    ("new-pod-in-the-gap", [pod(A), pod(B), pod(C)], {A, B}, None, {A, B, C}, ()),
    ("known-but-not-listed", [pod(A)], None, {A, C}, {A}, (C,)),
    ("both-sources-agree", [pod(B)], {A, B}, {A, B}, {B}, (A,)),
    ("gap-and-downtime", [pod(B)], {A, B}, {B, D}, {B}, (A, D)),
    ("finished-and-known", [pod(A), pod(C, phase="Succeeded")], None, {A, C}, {A}, (C,)),
    ("finished-was-live", [pod(A, phase="Failed")], {A}, None, set(), (A,)),
    # A finished pod the broker never saw gets no tombstone.
    ("finished-never-seen", [pod(A), pod(C, phase="Succeeded")], {A}, {A}, {A}, ()),
    ("deleting-still-live", [pod(A, deleting=True)], {A}, {A}, {A}, ()),
    ("empty-list", [], {A}, {B}, set(), (A, B)),
    ("empty-everything", [], None, None, set(), ()),
]


@pytest.mark.parametrize(("items", "previous", "known", "live", "terminate"),
                         [r[1:] for r in RELISTS], ids=[r[0] for r in RELISTS])
def test_plan_relist(items, previous, known, live, terminate) -> None:
    plan = plan_relist(items, previous=previous, known=known)
    assert plan.live == frozenset(live)
    assert plan.terminate == terminate


def test_plan_relist_refuses_a_pod_without_uid() -> None:
    with pytest.raises(ValueError, match="uid"):
        plan_relist([pod(A), pod(uid=None)], previous=None, known=None)


def test_plan_relist_of_the_recorded_list() -> None:
    pods = load_pods()
    plan = plan_relist(pods.values(), previous=None, known=None)
    assert plan.live == frozenset(p["metadata"]["uid"] for p in pods.values())
    assert plan.terminate == ()


@pytest.mark.parametrize(("value", "ns", "name"), [
    ("payments", True, True), ("a", True, True), ("a-b", True, True), ("a.b", False, True),
    ("-a", False, False), ("a-", False, False), ("A", False, False), ("", False, False),
    ("a" * 63, True, True), ("a" * 64, False, True), ("a_b", False, False),
    (None, False, False), ("a..b", False, False),
], ids=lambda v: json.dumps(v)[:20] if not isinstance(v, bool) else str(v))
def test_names(value: Any, ns: bool, name: bool) -> None:
    assert (valid_namespace(value), valid_pod_name(value)) == (ns, name)

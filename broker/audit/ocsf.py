"""Audit events as OCSF (Open Cybersecurity Schema Framework 1.1) records, for a SIEM.

Why a small mapping of our own and not ``py-ocsf-models``: the broker emits three classes
with a dozen fields each, from plain dicts, in the admin CLI; the package would bring a
pydantic model tree of the whole schema (hundreds of classes) and pin a schema version
for what twenty lines say exactly, and the shape is proved by a test with each class's
required fields (``tests/unit/audit/test_ocsf.py``).

Classes:
- Authentication (3002, Identity & Access Management): a workload's exchanges (issue,
  renew, release);
- Account Change (3001, Identity & Access Management): terminations, revocations, leases
  ended, locks;
- API Activity (6003, Application Activity): operators' other calls and refusals.

``metadata.uid`` is the event's seq; ``unmapped`` keeps its chain links (``hash``,
``prev_hash``) and ``raw_data`` the event exactly as hashed, so a SIEM can re-verify.
Pure: a dict in, a dict out.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

PRODUCT = {"name": "ephemeral-credential-broker", "vendor_name": "ephemeral-broker"}
OCSF_VERSION = "1.1.0"

AUTHENTICATION, ACCOUNT_CHANGE, API_ACTIVITY = 3002, 3001, 6003
_CLASS = {
    AUTHENTICATION: ("Authentication", 3, "Identity & Access Management"),
    ACCOUNT_CHANGE: ("Account Change", 3, "Identity & Access Management"),
    API_ACTIVITY: ("API Activity", 6, "Application Activity"),
}
# action → (class, activity_id, activity_name)
_AUTH = {
    "credential.issued": (1, "Logon"),
    "lease.issued": (1, "Logon"),
    "lease.renewed": (99, "Other"),
    "lease.released": (2, "Logoff"),
}
_ACCOUNT = {
    "instance.terminate_requested": (5, "Disable"),
    "instance.terminated": (6, "Delete"),
    "lock.created": (9, "Lock"),
}
_ACCOUNT_PREFIXES = ("instance.", "leases.", "lease.", "revocation.", "lock.")
SUCCESS, FAILURE = 1, 2
INFORMATIONAL, MEDIUM = 1, 3


def _classify(action: str, actor: str) -> tuple[int, int, str]:
    if action in _AUTH and actor == "workload":
        return (AUTHENTICATION, *_AUTH[action])
    if action in _ACCOUNT:
        return (ACCOUNT_CHANGE, *_ACCOUNT[action])
    if action.startswith(_ACCOUNT_PREFIXES):
        ended = action.rsplit(".", 1)[-1] in ("revoked", "expired", "abandoned", "lost")
        return (ACCOUNT_CHANGE, 6, "Delete") if ended else (ACCOUNT_CHANGE, 99, "Other")
    return (API_ACTIVITY, 99, "Other")


def _ms(at: str) -> int:
    return int(datetime.fromisoformat(at).timestamp() * 1000)


def to_ocsf(event: dict[str, Any], *, version: str = "") -> dict[str, Any]:
    """One audit event (as ``GET /v1/admin/audit/events`` serves it) as an OCSF record."""
    action, actor = str(event["action"]), str(event["actor"])
    class_uid, activity_id, activity_name = _classify(action, actor)
    class_name, category_uid, category_name = _CLASS[class_uid]
    ok = event.get("outcome", "ok") == "ok"
    hashed = {k: v for k, v in event.items() if k not in ("hash", "prev_hash")}
    record: dict[str, Any] = {
        "class_uid": class_uid,
        "class_name": class_name,
        "category_uid": category_uid,
        "category_name": category_name,
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        "time": _ms(str(event["at"])),
        "status_id": SUCCESS if ok else FAILURE,
        "status": "Success" if ok else "Failure",
        "severity_id": INFORMATIONAL if ok else MEDIUM,
        "message": action + (f": {event['reason']}" if event.get("reason") else ""),
        "actor": {"user": {"name": actor}},
        "metadata": {
            "version": OCSF_VERSION,
            "product": {**PRODUCT, "version": version} if version else dict(PRODUCT),
            "uid": str(event["seq"]),
            "log_name": "audit",
        },
        "unmapped": {"hash": event.get("hash"), "prev_hash": event.get("prev_hash")},
        "raw_data": json.dumps(hashed, separators=(",", ":"), sort_keys=True),
    }
    if not ok:
        record["status_detail"] = str(event.get("outcome"))
    subject = {"name": event.get("instance_id") or "", "type": "instance"}
    if class_uid == AUTHENTICATION:
        record["user"] = {"name": event.get("instance_id") or "", "type_id": 99}
        record["service"] = {"name": "ephemeral-credential-broker"}
    elif class_uid == ACCOUNT_CHANGE:
        record["user"] = {"name": subject["name"], "type_id": 99}
    else:
        record["api"] = {"operation": action, "service": {"name": "broker-admin"}}
    if event.get("lease_id"):
        record["resources"] = [{"uid": event["lease_id"], "type": "lease"}]
    return record

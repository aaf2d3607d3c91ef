"""How a lease is shown: an operator's marker on a resolved lease is the admin view's
``resolution`` (when, by whom, why, which incident), null for any other lease, and never
part of the workload's view."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from broker.api.views import lease_admin, lease_public
from broker.leases import LeaseView

NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
LOST = LeaseView("l-1", "i-1", "payments", "dev-db", "database_login", "lost", True, NOW,
                 NOW, NOW, NOW, "database/creds/dev-db/x", "acc",
                 vault_path="database/creds/dev-db", credential_ref={"username": "v-x"})
RESOLVED = replace(LOST, state="resolved", resolved_at=NOW, resolved_by="operator:alice",
                   resolved_reason="dropped the role by hand", resolved_incident="INC-7")


def test_the_admin_view_says_who_resolved_a_lease_when_and_why():
    assert lease_admin(RESOLVED)["resolution"] == {
        "at": "2026-12-03T09:00:00Z", "by": "operator:alice",
        "reason": "dropped the role by hand", "incident": "INC-7"}
    assert lease_admin(replace(RESOLVED, resolved_incident=None))["resolution"]["incident"] \
        is None


def test_a_lease_no_one_resolved_has_no_resolution():
    assert lease_admin(LOST)["resolution"] is None


def test_the_workload_view_carries_no_operator_marker():
    public = lease_public(RESOLVED)
    assert not any(k.startswith("resolved_") or k == "resolution" for k in public)
    assert "operator:alice" not in str(public)

"""ReconcileRecords (and SightingRecords): leases past expiry, stuck issuing rows, unseen
instances."""

from __future__ import annotations

from datetime import timedelta

from broker.leases import LeaseState
from tests.integration.leases.support import T0, audit_events, issue


async def test_past_expiry_stuck_and_settle(ledgers):
    s = await ledgers()
    clock = ledgers.clock
    stuck = await issue(s, "i-x")
    live = await issue(s, "i-x")
    await s.issuance.complete_issue(
        live,
        vault_lease_id="db/creds/r/live",
        accessor="acc",
        renewable=True,
        issued_at=T0,
        expires_at=T0 + timedelta(minutes=5),
    )
    assert await s.reconcile.past_expiry(before=T0 + timedelta(minutes=4), limit=10) == []
    [past] = await s.reconcile.past_expiry(before=T0 + timedelta(minutes=6), limit=10)
    assert past.lease_id == live
    await s.reconcile.correct_expiry(live, T0 + timedelta(hours=1))
    assert await s.reconcile.past_expiry(before=T0 + timedelta(minutes=6), limit=10) == []

    assert await s.reconcile.stuck_issuing(created_before=T0, limit=10) == []
    clock.advance(10)
    [(row, instance_state)] = await s.reconcile.stuck_issuing(created_before=clock.now(), limit=10)
    assert (row.lease_id, instance_state) == (stuck, "active")
    assert await s.reconcile.settle_stuck(stuck, revoked=["db/creds/r/lost"], actor="reconciler")
    assert not await s.reconcile.settle_stuck(stuck, revoked=[], actor="reconciler")  # once
    lease = await s.issuance.get_lease(stuck)
    assert lease.state == "abandoned"
    [event] = [e for e in await audit_events(s, "i-x") if e["action"] == "lease.stuck_settled"]
    assert event["detail"] == {"revoked_in_vault": 1, "vault_lease_ids": ["db/creds/r/lost"]}
    assert await s.reconcile.vault_lease_states(["db/creds/r/live", "db/creds/r/none"]) == {
        "db/creds/r/live": "active"
    }


async def test_sightings_and_unseen_instances(ledgers):
    s = await ledgers()
    clock = ledgers.clock
    await issue(s, "i-old")
    await issue(s, "i-new")
    clock.advance(3600)
    await s.sightings.mark_seen(["i-new"], clock.now())
    await s.sightings.mark_seen(["i-new"], T0)  # an older sighting never moves it back
    assert await s.reconcile.unseen_instances(
        "dev", seen_before=clock.now() - timedelta(minutes=30), limit=10
    ) == ["i-old"]
    assert await s.reconcile.unseen_instances("other", seen_before=clock.now(), limit=10) == []


async def test_unsent_live_under_pages_every_row_and_takes_the_path_literally(ledgers):
    """The rows Vault's listing of a path must show, page by page with a cursor (ties on
    created_at broken by lease id), and only directly under that very path: ``_`` and
    ``%`` in it are no wildcards."""
    s = await ledgers()
    path = "db/creds/my_app%"
    mine = []
    for vault_lease_id in [f"{path}/v{n}" for n in range(5)] + [
        "db/creds/myXappX/v9",  # what ``_`` and ``%`` would match as wildcards
        f"{path}/deeper/v8",  # not directly under the path
    ]:
        lease_id = await issue(s, "i-under")
        await s.issuance.complete_issue(
            lease_id,
            vault_lease_id=vault_lease_id,
            accessor="acc",
            renewable=True,
            issued_at=T0,
            expires_at=T0 + timedelta(hours=1),
        )
        if vault_lease_id.startswith(f"{path}/v"):
            mine.append(lease_id)
    seen, after, pages = [], None, 0
    while True:
        rows, after = await s.reconcile.unsent_live_under(
            path, expiring_after=T0, after=after, limit=2
        )
        pages += 1
        seen.extend(r.lease_id for r in rows)
        if after is None:
            break
    assert sorted(seen) == sorted(mine) and len(seen) == len(set(seen))
    assert pages == 4  # 6 rows match the pattern (one deeper), 2 a page, one empty at the end
    assert (
        await s.reconcile.unsent_live_under(
            path, expiring_after=T0 + timedelta(hours=2), limit=10
        )
    ) == ([], None)


async def test_unsent_live_under_finds_a_lease_whatever_form_its_row_records_the_path_in(ledgers):
    """The rows are read by their recorded ``vault_path`` (for the index): a lease directly
    under the path is found whether its row recorded the path escaped (as the engines build
    it), as Vault names it, or not at all (a row from before the store recorded paths);
    a lease under another path is not, whatever its row says, and pages merge in order."""
    s = await ledgers()
    path = "gcp/key/sa@p:x"
    rows = {
        "escaped": ("gcp/key/sa%40p%3Ax", f"{path}/v1"),
        "as-named": (path, f"{path}/v2"),
        "none": (None, f"{path}/v3"),
        "other": ("gcp/key/other", "gcp/key/other/v4"),
        "deeper": ("gcp/key/sa%40p%3Ax", f"{path}/deeper/v5"),
    }
    ids = {}
    for name, (vault_path, vault_lease_id) in rows.items():
        ticket = await s.issuance.begin_issue(
            instance_id="i-forms", issuer_name="dev", workload="w", role="r", kind="k",
            vault_path=vault_path)
        await s.issuance.complete_issue(
            ticket.lease_id, vault_lease_id=vault_lease_id, accessor="acc", renewable=True,
            issued_at=T0, expires_at=T0 + timedelta(hours=1))
        ids[ticket.lease_id] = name
        ledgers.clock.advance(1)
    for limit in (1, 2, 10):
        seen, after = [], None
        for _ in range(10):
            page, after = await s.reconcile.unsent_live_under(
                path, expiring_after=T0, after=after, limit=limit)
            seen.extend(ids[r.lease_id] for r in page)
            if after is None:
                break
        assert seen == ["escaped", "as-named", "none"], limit


async def test_vault_paths_names_each_path_a_lease_was_given_under_once(ledgers):
    """Every path under which Vault gave a lease, ended ones included, each once; not a
    path whose request got no Vault lease (yet)."""
    s = await ledgers()
    given = ["aws/creds/r", "database/creds/a", "database/creds/a", "pki/issue/r%40x"]
    for n, vault_path in enumerate(given):
        ticket = await s.issuance.begin_issue(
            instance_id="i-paths", issuer_name="dev", workload="w", role="r", kind="k",
            vault_path=vault_path)
        await s.issuance.complete_issue(
            ticket.lease_id, vault_lease_id=f"{vault_path}/v{n}", accessor="acc",
            renewable=True, issued_at=T0, expires_at=T0 + timedelta(hours=1))
        if n == 0:
            assert await s.issuance.end_lease(ticket.lease_id, LeaseState.RELEASED, "workload")
    await s.issuance.begin_issue(
        instance_id="i-paths", issuer_name="dev", workload="w", role="r", kind="k",
        vault_path="kv/never")
    await s.issuance.begin_issue(
        instance_id="i-paths", issuer_name="dev", workload="w", role="r", kind="k")
    assert await s.reconcile.vault_paths() == {
        "aws/creds/r", "database/creds/a", "pki/issue/r%40x"}

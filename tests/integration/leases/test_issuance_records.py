"""IssuanceRecords: the issuing row, its completion, ownership of instance ids, lease
limits and token ids."""

from __future__ import annotations

from datetime import timedelta

import pytest

from broker.errors import NotFound
from tests.integration.leases.support import T0, issue


async def test_issue_then_complete(ledgers):
    s = await ledgers()
    lease_id = await issue(s, "i-1")
    lease = await s.issuance.get_lease(lease_id)
    assert (lease.state, lease.instance_id, lease.vault_lease_id) == ("issuing", "i-1", None)
    await s.issuance.record_token(
        instance_id="i-1", accessor="acc-1", expires_at=T0 + timedelta(hours=1)
    )
    ok = await s.issuance.complete_issue(
        lease_id,
        vault_lease_id="db/creds/r/abc",
        accessor="acc-1",
        renewable=True,
        issued_at=T0,
        expires_at=T0 + timedelta(minutes=5),
    )
    assert ok is True
    lease = await s.issuance.get_lease(lease_id)
    assert (lease.state, lease.vault_lease_id, lease.token_accessor, lease.renewable) == (
        "active",
        "db/creds/r/abc",
        "acc-1",
        True,
    )
    assert lease.expires_at == T0 + timedelta(minutes=5)
    with pytest.raises(NotFound):
        await s.issuance.get_lease("l-" + "0" * 32)


async def test_an_instance_id_belongs_to_one_issuer_and_one_workload(ledgers):
    from broker.errors import NotPermitted

    s = await ledgers()
    await issue(s, "i-own")  # issuer dev, workload w
    with pytest.raises(NotPermitted) as other_issuer:
        await s.issuance.begin_issue(
            instance_id="i-own", issuer_name="other", workload="w", role="r", kind="k"
        )
    assert other_issuer.value.code == "instance_issuer_mismatch"
    with pytest.raises(NotPermitted) as other_workload:
        await s.issuance.begin_issue(
            instance_id="i-own", issuer_name="dev", workload="w2", role="r", kind="k"
        )
    assert other_workload.value.code == "instance_workload_mismatch"
    assert len(await s.admin.list_leases(instance="i-own")) == 1


async def test_an_expired_lease_holds_no_slot_under_the_limit(ledgers):
    from broker.errors import LeaseLimitReached
    from broker.leases import LeaseLimit

    s = await ledgers()
    limit = LeaseLimit(1, "refuse")
    first = await s.issuance.begin_issue(
        instance_id="i-exp", issuer_name="dev", workload="w", role="r", kind="k", limit=limit
    )
    await s.issuance.complete_issue(
        first.lease_id,
        vault_lease_id="v/exp-1",
        accessor="a",
        renewable=False,
        issued_at=T0,
        expires_at=T0 + timedelta(minutes=1),
    )
    with pytest.raises(LeaseLimitReached):
        await s.issuance.begin_issue(
            instance_id="i-exp", issuer_name="dev", workload="w", role="r", kind="k", limit=limit
        )
    ledgers.clock.advance(120)  # the credential expired: Vault holds nothing for it
    second = await s.issuance.begin_issue(
        instance_id="i-exp", issuer_name="dev", workload="w", role="r", kind="k", limit=limit
    )
    assert second.superseded == ()
    # The expired row stays active, for termination to settle.
    assert (await s.issuance.get_lease(first.lease_id)).state == "active"


async def test_replacing_stops_while_replaced_leases_are_unconfirmed(ledgers):
    from broker.errors import LeaseLimitReached
    from broker.leases import LeaseLimit

    s = await ledgers()
    limit = LeaseLimit(1, "revoke_oldest")
    ids = []
    for n in range(2):
        ticket = await s.issuance.begin_issue(
            instance_id="i-stuck", issuer_name="dev", workload="w", role="r", kind="k", limit=limit
        )
        await s.issuance.complete_issue(
            ticket.lease_id,
            vault_lease_id=f"v/stuck-{n}",
            accessor="a",
            renewable=False,
            issued_at=T0,
            expires_at=T0 + timedelta(hours=1),
        )
        ids.append(ticket)
    assert ids[1].superseded == ((ids[0].lease_id, "v/stuck-0"),)
    # The first replaced lease is never confirmed revoked (Vault keeps failing): a third
    # request would leave two live leases behind a limit of one, so it is refused.
    with pytest.raises(LeaseLimitReached) as err:
        await s.issuance.begin_issue(
            instance_id="i-stuck", issuer_name="dev", workload="w", role="r", kind="k", limit=limit
        )
    assert "not confirmed revoked" in err.value.message
    assert [lv.state for lv in await s.admin.list_leases() if lv.instance_id == "i-stuck"].count(
        "active"
    ) == 1


async def test_a_request_past_the_issuing_bound_cannot_record_its_lease(ledgers):
    from broker.errors import StoreUnavailable

    s = await ledgers()
    lease_id = await issue(s, "i-late")
    with pytest.raises(StoreUnavailable) as info:
        await s.issuance.complete_issue(
            lease_id,
            vault_lease_id="db/creds/r/late",
            accessor="acc",
            renewable=False,
            issued_at=T0,
            expires_at=T0 + timedelta(minutes=5),
            created_after=T0 + timedelta(seconds=1),
        )
    assert info.value.code == "lease_state_conflict"
    assert (await s.issuance.get_lease(lease_id)).state == "issuing"
    assert await s.issuance.complete_issue(
        lease_id,
        vault_lease_id="db/creds/r/late",
        accessor="acc",
        renewable=False,
        issued_at=T0,
        expires_at=T0 + timedelta(minutes=5),
        created_after=T0 - timedelta(seconds=1),
    )


async def test_token_ids_are_refused_twice_and_forgotten_after_expiry(ledgers):
    from broker.errors import TokenInvalid

    s = await ledgers()
    await s.issuance.begin_issue(
        instance_id="i-jti",
        issuer_name="dev",
        workload="w",
        role="r",
        kind="k",
        token_id=("jti-1", T0 + timedelta(minutes=5)),
    )
    with pytest.raises(TokenInvalid) as replay:
        await s.issuance.begin_issue(
            instance_id="i-jti",
            issuer_name="dev",
            workload="w",
            role="r",
            kind="k",
            token_id=("jti-1", T0 + timedelta(minutes=5)),
        )
    assert replay.value.code == "token_replayed"
    # The same id from another issuer is another token.
    await s.issuance.begin_issue(
        instance_id="i-jti2",
        issuer_name="other",
        workload="w",
        role="r",
        kind="k",
        token_id=("jti-1", T0 + timedelta(minutes=5)),
    )
    assert len(await s.admin.list_leases()) == 2  # the replay wrote no lease
    assert await s.replay.prune_seen_tokens(grace=timedelta(seconds=60)) == 0
    ledgers.clock.advance(5 * 60 + 61)
    assert await s.replay.prune_seen_tokens(grace=timedelta(seconds=60)) == 2


async def test_a_lock_created_while_vault_is_asked_refuses_the_completion(ledgers):
    """Finding 7 (PoC poc_lockrace): a lock committed between begin_issue and complete_issue
    (the Vault round trip) did not stop that credential. complete_issue reads the locks in
    its transaction: refused, nothing written (the caller takes the credential back)."""
    from broker.errors import Locked
    from broker.leases.locks import LockSubject
    from tests.integration.leases.support import audit_events

    s = await ledgers()
    subject = LockSubject(issuer="dev", workload="w", role="r", claims={})
    other = LockSubject(issuer="dev", workload="x", role="r", claims={})
    ticket = await s.issuance.begin_issue(instance_id="pod-1", issuer_name="dev", workload="w",
                                          role="r", kind="k", lock_subject=subject)
    free = await s.issuance.begin_issue(instance_id="pod-2", issuer_name="dev", workload="x",
                                        role="r", kind="k", lock_subject=other)
    lock = await s.admin.create_lock(kind="workload", value="w", claim=None, reason="INC-1",
                                     incident=None, expires_at=None, actor="operator:alice")
    with pytest.raises(Locked) as info:
        await s.issuance.complete_issue(ticket.lease_id, vault_lease_id="v/1", accessor="acc",
                                        renewable=True, issued_at=T0, expires_at=T0,
                                        lock_subject=subject)
    assert info.value.lock_id == lock.lock_id
    assert (await s.issuance.get_lease(ticket.lease_id)).state == "issuing"
    assert [e["action"] for e in await audit_events(s, "pod-1")] == []
    # Another workload's request completes.
    assert await s.issuance.complete_issue(free.lease_id, vault_lease_id="v/2", accessor="acc",
                                           renewable=True, issued_at=T0, expires_at=T0,
                                           lock_subject=other) is True


async def test_a_lock_created_while_vault_renews_is_said_and_the_expiry_kept(ledgers):
    """A renewal Vault made is recorded (Vault holds it); a lock that appeared meanwhile is
    returned for the caller to refuse, and the event says the renewal was withheld."""
    from broker.leases.locks import LockSubject
    from tests.integration.leases.support import complete

    s = await ledgers()
    subject = LockSubject(issuer="dev", workload="w", role="r", claims={})
    lease_id = await issue(s, "pod-r")
    await complete(s, lease_id)
    later = T0 + timedelta(hours=2)
    assert await s.issuance.set_lease_expiry(lease_id, later, True, subject) is None
    lock = await s.admin.create_lock(kind="role", value="r", claim=None, reason="INC-2",
                                     incident=None, expires_at=None, actor="operator:alice")
    latest = T0 + timedelta(hours=3)
    assert await s.issuance.set_lease_expiry(lease_id, latest, True, subject) == lock.lock_id
    assert (await s.issuance.get_lease(lease_id)).expires_at == latest
    from sqlalchemy import select

    from broker.leases import models as m

    query = (select(m.AuditEvent.outcome, m.AuditEvent.reason)
             .where(m.AuditEvent.action == "lease.renewed").order_by(m.AuditEvent.id))
    async with s.database.transaction(readonly=True) as conn:
        renewed = [tuple(r) for r in (await conn.execute(query)).all()]
    assert renewed == [("ok", None),
                       ("withheld", f"lock {lock.lock_id} created while renewing")]

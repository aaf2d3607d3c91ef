"""When ``revoke_sent_at`` is written, on real OpenBao and PostgreSQL: a credential the
issuance takes back because its instance was terminated meanwhile is our own revocation
(``revoked``), never ``lost``; an instance token Vault no longer knows ends its job
``done`` (OpenBao answers its revocation with a warning), its forgotten leases ``lost``.

The ``dev-db`` role has no direct check configured, so "Vault does not know it" is
decided by ``revoke_sent_at`` alone here."""

from __future__ import annotations

from typing import Any

from broker.errors import RevocationWaiting
from tests.harness.api import issue, terminate, wait_job
from tests.harness.vault import VaultProbe
from tests.harness.wait import eventually


def _lease(b: Any, lease_id: str) -> dict[str, Any]:
    [row] = [r for r in b.rows("leases") if r["lease_id"] == lease_id]
    return row


def _events(b: Any, action: str) -> list[dict[str, Any]]:
    return [e for e in b.rows("audit_events") if e["action"] == action]


async def test_a_credential_taken_back_at_termination_is_revoked_not_lost(
        make_broker, http, vault: VaultProbe, monkeypatch):
    """The instance is terminated between Vault's answer and the record: the row is
    recorded active, the credential withheld and taken back. The take-back is stamped
    before it is sent, so the worker, finding Vault not knowing the lease, records it
    ``revoked``."""
    b = await make_broker()
    components = b.broker.components
    original = components.vault.issue

    async def issue_then_terminate(*args: Any, **kwargs: Any) -> Any:
        answer = await original(*args, **kwargs)
        await components.terminate("i-taken-back", actor="test")
        return answer

    async def not_yet(job: Any, confirmed: Any) -> None:
        raise RevocationWaiting("the test holds the job until the take-back is done")

    # The job waits until the request has taken the credential back (else its token
    # revocation, stamped, may come first and take the lease itself).
    monkeypatch.setattr(components.worker._pass, "revoke_instance", not_yet)
    monkeypatch.setattr(components.vault, "issue", issue_then_terminate)
    status, body = await issue(http, b, "i-taken-back", "dev-db")
    assert status == 409, body
    assert body["error"]["code"] == "instance_terminated"
    monkeypatch.undo()

    shown = await wait_job(http, b, "i-taken-back")
    assert shown["job"]["state"] == "done", shown
    [row] = [r for r in b.rows("leases") if r["instance_id"] == "i-taken-back"]
    assert row["state"] == "revoked", row
    assert row["revoke_sent_at"] is not None
    assert not vault.lease_exists(row["vault_lease_id"])
    assert _events(b, "lease.lost") == []


async def test_a_token_vault_no_longer_knows_ends_the_job_done(
        make_broker, http, vault: VaultProbe):
    """Vault forgot the instance token (and with it its lease): the token's revocation
    cannot succeed, and is not retried until the job fails; the lease is lost."""
    b = await make_broker()
    status, cred = await issue(http, b, "i-no-token", "dev-db")
    assert status == 201, cred
    row = _lease(b, cred["lease_id"])
    # Behind the broker's back: the token goes, and Vault revokes its lease with it.
    status, answer = vault.call("POST", "auth/token/revoke-accessor",
                                {"accessor": row["token_accessor"]})
    assert status in (200, 204), answer
    assert not vault.accessor_alive(row["token_accessor"])
    await eventually(lambda: not vault.lease_exists(row["vault_lease_id"]),
                     "Vault revoked the lease of the token it dropped")
    status, answer = vault.call("POST", "auth/token/revoke-accessor",
                                {"accessor": row["token_accessor"]})
    assert status == 200 and "No token found with this accessor" in answer["warnings"]

    shown = await terminate(http, b, "i-no-token")
    assert shown["job"]["state"] == "done", shown
    assert _lease(b, cred["lease_id"])["state"] == "lost"
    [token] = [t for t in b.rows("instance_tokens") if t["instance_id"] == "i-no-token"]
    assert token["revoked_at"] is not None

"""The admin services over small fakes of what they read: ``leases show --vault``'s view
of Vault (each way it can have none, ``ListingService``), and ``policy explain``'s verdict
from every refusal, a lock's included (``PolicyService``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import pytest

from broker.app.services import ListingService, PolicyService
from broker.clock import FixedClock
from broker.engines.role import RoleSettings
from broker.errors import TokenInvalid, UpstreamUnavailable
from broker.identity import Identity
from broker.leases import InstanceView, JobView, LeaseView, LockView
from broker.policy.settings import Rule
from broker.vault.client import LeaseInfo

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
IDENTITY = Identity("dev", "https://dev", "payments", "i-1", "payments", NOW, NOW,
                    MappingProxyType({}))
ROLES = {"cert": RoleSettings.model_validate({"engine": "pki", "mount": "pki",
                                              "vault_role": "r", "max_ttl": "1h",
                                              "params": {"common_name": "{workload}.svc"}})}
RULES = (Rule.model_validate({"name": "all", "allow": ["cert"]}),)


def lease(vault_lease_id: str | None = "pki/issue/r/abc") -> LeaseView:
    return LeaseView("l-1", "i-1", "payments", "cert", "x509_certificate", "active", False,
                     NOW, NOW, NOW, None, vault_lease_id, "acc")


class Vault:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    async def lookup_lease(self, lease_id: str) -> LeaseInfo | None:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class Queries:
    def __init__(self, standing: Any = None, the_lease: LeaseView | None = None) -> None:
        self.standing = standing
        self.the_lease = the_lease or lease()

    async def instance_standing(self, instance_id: str) -> Any:
        return self.standing

    async def get_lease(self, lease_id: str) -> LeaseView:
        return self.the_lease


class Verifier:
    def __init__(self, identity: Identity | Exception) -> None:
        self.identity = identity

    async def verify(self, token: str) -> Identity:
        if isinstance(self.identity, Exception):
            raise self.identity
        return self.identity


class NoLocks:
    async def active_locks(self) -> list[Any]:
        return []


class WorkloadLocked:
    async def active_locks(self) -> list[Any]:
        return [LockView(lock_id="k-1", kind="workload", value="payments", claim=None,
                         reason="leaked", incident="INC-1", created_by="operator:alice",
                         created_at=NOW, expires_at=None)]


def listings(queries: Any = None, vault: Any = None) -> ListingService:
    return ListingService(queries or Queries(), vault=vault or Vault(None), clock=FixedClock(NOW))


def service(queries: Any = None, verifier: Any = None, locks: Any = None) -> PolicyService:
    return PolicyService(queries or Queries(), verifier=verifier or Verifier(IDENTITY),
                         roles=ROLES, rules=RULES, issuers=(), audience="a",
                         locks=locks or NoLocks(), clock=FixedClock(NOW))


@pytest.mark.parametrize("the_lease,answer,expected", [
    (lease(), LeaseInfo("pki/issue/r/abc", NOW - timedelta(minutes=5),
                        NOW + timedelta(seconds=90.7), True),
     {"lease_id": "pki/issue/r/abc", "issue_time": "2026-12-02T11:55:00Z",
      "expire_time": "2026-12-02T12:01:30.700000Z", "ttl": 90, "renewable": True}),
    (lease(), LeaseInfo("pki/issue/r/abc", None, NOW - timedelta(seconds=5), False),
     {"lease_id": "pki/issue/r/abc", "issue_time": None,
      "expire_time": "2026-12-02T11:59:55Z", "ttl": 0, "renewable": False}),
    (lease(), None, {"error": "lease_unknown"}),
    (lease(), UpstreamUnavailable("down"), {"error": "vault_unavailable"}),
    (lease(None), AssertionError("Vault is not asked"), {"error": "no_vault_lease"}),
], ids=["live", "past_expiry", "unknown_to_vault", "vault_down", "no_vault_lease"])
async def test_a_lease_with_vaults_view(the_lease, answer, expected):
    admin = listings(Queries(the_lease=the_lease), Vault(answer))
    assert await admin.lease("l-1", vault=True) == (the_lease, expected)
    assert await admin.lease("l-1", vault=False) == (the_lease, None)


def standing(state: str, *, terminated_at=None, job_at=None, by="operator:alice") -> Any:
    instance = InstanceView("i-1", state, "dev", "payments", NOW, terminated_at)
    job = JobView("j-1", "i-1", "done", 1, NOW, None, by, job_at, None) if job_at else None
    return instance, job


T = NOW - timedelta(hours=1)


@pytest.mark.parametrize("the_standing,role,codes,since,by", [
    (None, "cert", [], None, None),
    (standing("active"), "cert", [], None, None),
    (standing("terminating", job_at=T), "cert", ["instance_terminated"],
     "2026-12-02T11:00:00Z", "operator:alice"),
    (standing("terminated", terminated_at=NOW, job_at=T), "cert", ["instance_terminated"],
     "2026-12-02T12:00:00Z", "operator:alice"),
    (standing("terminated", terminated_at=NOW, job_at=T), "nope",
     ["role_not_permitted", "instance_terminated"], "2026-12-02T12:00:00Z", "operator:alice"),
], ids=["never_seen", "active", "terminating", "terminated", "terminated_and_refused"])
async def test_explain_refuses_for_every_reason_it_finds(the_standing, role, codes, since, by):
    answer = await service(Queries(standing=the_standing)).explain("t", role, None)
    assert [r["code"] for r in answer["refusals"]] == codes
    assert answer["verdict"] == ("refused" if codes else "granted")
    terminated = [r for r in answer["refusals"] if r["code"] == "instance_terminated"]
    if terminated:
        assert (terminated[0]["since"], terminated[0]["by"]) == (since, by)
    assert answer["instance"] == {
        "state": the_standing[0].state if the_standing else "never_seen"}


async def test_an_invalid_token_is_the_only_refusal():
    bad = TokenInvalid("expired", code="token_expired", issuer_name="dev")
    answer = await service(verifier=Verifier(bad)).explain("t", "cert", None)
    assert (answer["verdict"], answer["refusals"], answer["instance"]) == (
        "refused", [{"code": "token_expired", "message": "expired"}], None)


async def test_a_lock_is_one_of_explains_refusals():
    answer = await service(locks=WorkloadLocked()).explain("t", "cert", None)
    assert (answer["verdict"], [r["code"] for r in answer["refusals"]]) == ("refused",
                                                                            ["locked"])
    assert answer["refusals"][0]["lock_id"] == "k-1"
    assert answer["decision"]["allowed"] is False

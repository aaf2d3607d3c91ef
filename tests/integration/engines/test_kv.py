"""KV through the broker on a real OpenBao: a kv-v2 and a kv-v1 mount of this module's own,
one secret per workload; the identity picks the path, a request cannot; the store records
a delivery with no Vault lease and no value; termination revokes nothing of it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.harness.api import bearer, issue, terminate
from tests.harness.vault import VaultProbe
from tests.harness.wait import eventually_sync

TABLES = ("instances", "instance_tokens", "leases", "revocation_jobs", "audit_events")


@dataclass(frozen=True)
class KvSetup:
    v2: str  # mount names
    v1: str
    policy: str  # the instance policy granting exactly the secrets' paths
    values: dict[tuple[str, str], str]  # (mount, workload) → the secret's api_key

    def roles(self, **extra: Any) -> dict[str, dict[str, Any]]:
        common = {
            "engine": "kv",
            "vault_role": "unused",
            "default_ttl": "10m",
            "max_ttl": "1h",
            "params": {"path": "apps/{workload}/config"},
            **extra,
        }
        return {
            "kv-config": {**common, "mount": self.v2},
            "kv1-config": {**common, "mount": self.v1, "mode": "v1"},
        }


def _ok(probe: VaultProbe, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    status, answer = probe.call(method, path, body)
    assert status in (200, 204), (method, path, status, answer)
    return answer


def _write_when_ready(vault: VaultProbe, path: str, body: dict[str, Any]) -> None:
    """A new kv-v2 mount takes a moment to set itself up before it takes writes."""
    answer: tuple[int, Any] = (0, None)

    def written() -> bool:
        nonlocal answer
        answer = vault.call("POST", path, body)
        return answer[0] in (200, 204)

    eventually_sync(written, lambda: f"kv mount took a write: {answer}", interval=0.1)


@pytest.fixture(scope="module")
def kv(vault: VaultProbe) -> Iterator[KvSetup]:
    suffix = secrets.token_hex(4)
    setup = KvSetup(
        v2=f"kv2-{suffix}", v1=f"kv1-{suffix}", policy=f"broker-instance-kv-{suffix}", values={}
    )
    try:
        _ok(vault, "POST", f"sys/mounts/{setup.v2}", {"type": "kv", "options": {"version": "2"}})
        _ok(vault, "POST", f"sys/mounts/{setup.v1}", {"type": "kv", "options": {"version": "1"}})
        for workload in ("payments", "billing"):
            for mount in (setup.v2, setup.v1):
                setup.values[mount, workload] = f"{workload}-{secrets.token_hex(16)}"
            _write_when_ready(
                vault,
                f"{setup.v2}/data/apps/{workload}/config",
                {"data": {"api_key": setup.values[setup.v2, workload]}},
            )
            _ok(
                vault,
                "POST",
                f"{setup.v1}/apps/{workload}/config",
                {"api_key": setup.values[setup.v1, workload]},
            )
        _ok(vault, "POST", f"{setup.v2}/data/other/config", {"data": {"k": "not-granted"}})
        # A secret whose current version is deleted (soft, as `kv delete` does).
        _ok(vault, "POST", f"{setup.v2}/data/apps/retired/config", {"data": {"k": "old"}})
        _ok(vault, "DELETE", f"{setup.v2}/data/apps/retired/config")
        _ok(
            vault,
            "PUT",
            f"sys/policies/acl/{setup.policy}",
            {
                "policy": f"""
path "{setup.v2}/data/apps/+/config" {{ capabilities = ["read"] }}
path "{setup.v1}/apps/+/config" {{ capabilities = ["read"] }}
"""
            },
        )
        yield setup
    finally:
        vault.call("DELETE", f"sys/mounts/{setup.v2}")
        vault.call("DELETE", f"sys/mounts/{setup.v1}")
        vault.call("DELETE", f"sys/policies/acl/{setup.policy}")


def _created_time(vault: VaultProbe, mount: str, workload: str) -> str:
    answer = _ok(vault, "GET", f"{mount}/metadata/apps/{workload}/config")
    return answer["data"]["versions"]["1"]["created_time"]


async def test_each_workload_reads_its_own_secret_and_nothing_is_leased(
    make_broker, http, vault, kv
):
    # A limit of one that refuses: a kv read does not count against it.
    b = await make_broker(
        extra_roles=kv.roles(max_leases_per_instance=1, on_limit="refuse"),
        instance_policies=(kv.policy,),
    )

    status, a = await issue(http, b, "i-kv-a", "kv-config")
    assert status == 201, a
    assert set(a) == {
        "lease_id",
        "instance_id",
        "workload",
        "role",
        "kind",
        "data",
        "issued_at",
        "expires_at",
        "renewable",
        "leased",
    }
    assert (a["instance_id"], a["workload"], a["role"], a["kind"], a["renewable"], a["leased"]) == (
        "i-kv-a",
        "payments",
        "kv-config",
        "static_secret",
        False,
        False,
    )
    assert a["data"] == {
        "values": {"api_key": kv.values[kv.v2, "payments"]},
        "version": 1,
        "created_time": _created_time(vault, kv.v2, "payments"),
    }

    status, bb = await issue(http, b, "i-kv-b", "kv-config", workload="billing")
    assert status == 201, bb
    assert bb["data"] == {
        "values": {"api_key": kv.values[kv.v2, "billing"]},
        "version": 1,
        "created_time": _created_time(vault, kv.v2, "billing"),
    }

    status, a1 = await issue(http, b, "i-kv-a", "kv1-config")
    assert status == 201, a1
    for answer in (a, a1):
        life = datetime.fromisoformat(answer["expires_at"]) - datetime.fromisoformat(
            answer["issued_at"])
        assert life == timedelta(minutes=10)  # the role's default_ttl: the grant, not Vault's
    assert (a1["kind"], a1["leased"], a1["data"]) == (
        "static_secret",
        False,
        {"values": {"api_key": kv.values[kv.v1, "payments"]}},
    )

    # A cannot name B's secret: the template fixes the path, and a path in the request is
    # refused before anything is recorded or Vault is asked.
    before = b.store_snapshot()
    for role in ("kv-config", "kv1-config"):
        status, refused = await issue(http, b, "i-kv-a", role, path="apps/billing/config")
        assert (status, refused) == (
            400,
            {
                "error": {
                    "code": "unknown_parameter",
                    "message": f"role {role!r} does not take path from a request "
                    "(it takes: role, ttl)",
                }
            },
        )
    assert b.store_snapshot() == before

    # Past the role's limit of one, still granted: nothing here holds a Vault lease.
    status, again = await issue(http, b, "i-kv-a", "kv-config")
    assert status == 201, again
    assert again["data"]["values"] == {"api_key": kv.values[kv.v2, "payments"]}

    leases = {row["lease_id"]: row for row in b.rows("leases")}
    assert len(leases) == 4
    for lease_id, instance, role in (
        (a["lease_id"], "i-kv-a", "kv-config"),
        (bb["lease_id"], "i-kv-b", "kv-config"),
        (a1["lease_id"], "i-kv-a", "kv1-config"),
        (again["lease_id"], "i-kv-a", "kv-config"),
    ):
        row = leases[lease_id]
        assert (
            row["instance_id"],
            row["role"],
            row["kind"],
            row["state"],
            row["vault_lease_id"],
            row["renewable"],
            row["error_code"],
        ) == (instance, role, "static_secret", "delivered", None, False, None)
        assert row["token_accessor"]  # read with the instance's token
    # ... whose policies are the broker's plus this module's, and nothing else.
    [tok] = [t for t in b.rows("instance_tokens") if t["instance_id"] == "i-kv-a"]
    assert leases[a["lease_id"]]["token_accessor"] == tok["accessor"]
    looked_up = _ok(vault, "POST", "auth/token/lookup-accessor", {"accessor": tok["accessor"]})
    assert sorted(looked_up["data"]["policies"]) == sorted(["broker-instance", kv.policy])
    dump = repr([b.rows(t) for t in TABLES])
    for value in kv.values.values():
        assert value not in dump

    # Nothing to renew.
    async with http.post(
        f"{b.url}/v1/leases/{a['lease_id']}/renew", headers=bearer(b.token("i-kv-a", "payments"))
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == {
            "code": "lease_not_active",
            "message": "lease is delivered; only an active lease can be renewed",
        }

    # Termination revokes nothing of it: the rows stay delivered, and the value lives on
    # in Vault. The broker only stops handing it out.
    shown = await terminate(http, b, "i-kv-a")
    assert (shown["state"], shown["job"]["state"]) == ("terminated", "done")
    assert sorted(x["state"] for x in shown["leases"]) == ["delivered"] * 3
    still = _ok(vault, "GET", f"{kv.v2}/data/apps/payments/config")
    assert still["data"]["data"] == {"api_key": kv.values[kv.v2, "payments"]}
    status, body = await issue(http, b, "i-kv-a", "kv-config")
    assert (status, body["error"]["code"]) == (409, "instance_terminated")


@pytest.mark.parametrize(
    "workload,role",
    [("orders", "kv-config"), ("retired", "kv-config"), ("orders", "kv1-config")],
    ids=["never-written", "deleted", "never-written-v1"],
)
async def test_a_workload_without_a_secret_gets_nothing(make_broker, http, kv, workload, role):
    b = await make_broker(extra_roles=kv.roles(), instance_policies=(kv.policy,))
    status, body = await issue(http, b, "i-kv-none", role, workload=workload)
    assert (status, body) == (
        502,
        {"error": {"code": "vault_rejected", "message": "Vault answered 404"}},
    )
    [row] = b.rows("leases")
    assert (row["state"], row["vault_lease_id"], row["error_code"]) == (
        "failed",
        None,
        "vault_rejected",
    )


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("GET", "{v2}/data/apps/payments/config", True),
        ("GET", "{v2}/data/apps/billing/config", True),
        ("GET", "{v1}/apps/payments/config", True),
        ("GET", "{v2}/data/other/config", False),
        ("GET", "{v2}/data/apps/payments/config/deeper", False),
        ("GET", "{v2}/metadata/apps/payments/config", False),
        ("LIST", "{v2}/metadata/apps", False),
        ("POST", "{v2}/data/apps/payments/config", False),
        ("DELETE", "{v2}/data/apps/payments/config", False),
        ("GET", "{v1}/other", False),
    ],
    ids=[
        "own-v2",
        "other-workload-v2",
        "own-v1",
        "outside-apps",
        "deeper",
        "metadata",
        "list",
        "write",
        "delete",
        "v1-outside-apps",
    ],
)
def test_the_instance_policy_grants_reading_the_config_paths_only(
    bao, vault, kv, method, path, allowed
):
    """The Vault side of the fence: the policy reads ``apps/+/config`` and nothing else (the
    broker's template keeps a workload to its own)."""
    token = _ok(
        vault,
        "POST",
        "auth/token/create",
        {"policies": [kv.policy], "no_default_policy": True, "ttl": "2m"},
    )["auth"]
    probe = VaultProbe(bao.addr, token["client_token"])
    try:
        body = {"data": {"api_key": "overwrite"}} if method == "POST" else None
        status, _ = probe.call(method, path.format(v2=kv.v2, v1=kv.v1), body)
        assert (status == 200) is allowed and status in (200, 403), status
    finally:
        _ok(vault, "POST", "auth/token/revoke-accessor", {"accessor": token["accessor"]})

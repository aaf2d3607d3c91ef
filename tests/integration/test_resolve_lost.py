"""An operator marks a lost lease handled, through brokerctl, on real OpenBao and
PostgreSQL: once they ended its credential by hand, ``brokerctl leases resolve`` records who,
when, why and the incident on the lease with a ``lease.resolved`` audit event, and the lease
stops being a problem: ``leases list --state lost`` no longer lists it (``--state resolved``
does), ``revoke --wait`` no longer reports it LOST (exit 0), ``reconcile`` does not count
it, and ``broker_leases{state="lost"}`` no longer counts it. Resolving again changes
nothing; a lease that is not lost, or unknown, is refused with the CLI's exit code.

The lost lease is made as in tests/integration/test_lost_leases.py: Vault forgets it behind
the broker's back (a root-token revocation) and the broker runs without direct checks."""

from __future__ import annotations

import json
from typing import Any

from broker.clock import iso_z
from tests.harness.wait import eventually
from tests.integration.test_cli import ctl_env, run
from tests.integration.test_lost_leases import (  # noqa: F401 — the fixtures
    _events,
    _issued,
    _lease,
    b,
    clock,
    forget,
    pki,
)

CTL = "broker.cli.ctl"
REASON = "revoked the serial at the mount by hand"


async def _lost_gauge(http: Any, b: Any) -> dict[str, float]:  # noqa: F811
    """``broker_leases`` samples of state lost (the store's count, read at most every 5 s)."""
    async with http.get(f"{b.url}/metrics") as resp:
        body = await resp.text()
    out = {}
    for line in body.splitlines():
        if line.startswith("broker_leases{") and 'state="lost"' in line:
            labels, value = line.rsplit(" ", 1)
            out[labels.removeprefix("broker_leases")] = float(value)
    return out


async def test_a_lost_lease_resolved_by_hand_stops_being_a_problem(b, http, vault):  # noqa: F811
    forgotten = await _issued(http, b, "i-resolve")
    known = await _issued(http, b, "i-resolve")
    forget(vault, forgotten["vault_lease_id"])
    lid, env = forgotten["lease_id"], ctl_env(b.url)

    code, out, err = await run(CTL, "revoke", "--instance", "i-resolve", "--wait", env=env)
    assert code == 1, (out, err)
    assert "NOT DONE: 1 lease(s) LOST" in out and f"lost  {lid}" in out
    assert "brokerctl leases resolve LEASE_ID --reason TEXT" in out
    code, out, _ = await run(CTL, "-o", "json", "leases", "list", "--state", "lost", env=env)
    assert [x["lease_id"] for x in json.loads(out)["leases"]] == [lid]
    lost_sample = '{engine="pki",role="probe-cert",state="lost"}'
    await eventually(lambda: _gauge_is(http, b, {lost_sample: 1.0}), "lost lease not counted")
    lost_row = _lease(b, lid)

    code, out, err = await run(CTL, "leases", "resolve", lid, "--reason", REASON,
                               "--incident", "INC-42", env=env)
    assert code == 0, err
    row = _lease(b, lid)
    assert (row["state"], row["resolved_by"], row["resolved_reason"],
            row["resolved_incident"]) == ("resolved", "operator:admin", REASON, "INC-42")
    assert row["resolved_at"] is not None and row["ended_at"] == lost_row["ended_at"]
    at = iso_z(row["resolved_at"])
    assert out == (f"lease {lid} resolved: by operator:admin at {at}, incident INC-42\n"
                   f"reason: {REASON}\n")
    [event] = _events(b, "lease.resolved")
    assert (event["actor"], event["outcome"], event["reason"], event["lease_id"],
            event["instance_id"]) == ("operator:admin", "ok", REASON, lid, "i-resolve")
    detail = event["detail"]
    assert detail["incident"] == "INC-42" and detail["role"] == "probe-cert"
    assert detail["vault_path"] == forgotten["vault_path"]
    assert detail["credential_ref"] == forgotten["credential_ref"]
    assert detail["lost_at"] == iso_z(lost_row["ended_at"])

    # No longer a problem anywhere.
    code, out, _ = await run(CTL, "leases", "list", "--state", "lost", env=env)
    assert (code, out) == (0, "(none)\n")
    code, out, _ = await run(CTL, "-o", "json", "leases", "list", "--state", "resolved",
                             env=env)
    assert [x["lease_id"] for x in json.loads(out)["leases"]] == [lid]
    assert json.loads(out)["leases"][0]["resolution"] == {
        "at": at, "by": "operator:admin", "reason": REASON, "incident": "INC-42"}
    code, out, _ = await run(CTL, "leases", "show", lid, env=env)
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith(("resolved", "reason",
                                                                  "incident", "LOST"))] == [
        f"resolved_at     {at}", "resolved_by     operator:admin", f"reason          {REASON}",
        "incident        INC-42"]
    code, out, err = await run(CTL, "revoke", "--instance", "i-resolve", "--wait", env=env)
    assert code == 0, (out, err)
    assert "LOST" not in out
    await eventually(lambda: _gauge_is(http, b, {}), "a resolved lease still counted lost")
    code, out, err = await run(CTL, "-o", "json", "reconcile", env=env)
    assert json.loads(out)["lost"] == [], out
    assert code == 0, (out, err)

    # Idempotent: the first marker stands, and nothing more is audited.
    code, out, err = await run(CTL, "leases", "resolve", lid, "--reason", "again", env=env)
    assert code == 0, err
    assert out == (f"lease {lid} was resolved already; nothing changed: by operator:admin at "
                   f"{at}, incident INC-42\nreason: {REASON}\n")
    assert _lease(b, lid)["resolved_reason"] == REASON
    assert len(_events(b, "lease.resolved")) == 1

    # A lease that is not lost, and one the broker never had, are refused.
    code, _, err = await run(CTL, "leases", "resolve", known["lease_id"], "--reason", "x",
                             env=env)
    assert code == 1 and "(lease_not_lost)" in err and "the lease is revoked, not lost" in err
    assert _lease(b, known["lease_id"])["state"] == "revoked"
    code, _, err = await run(CTL, "leases", "resolve", "l-" + "0" * 32, "--reason", "x",
                             env=env)
    assert code == 3 and "(lease_not_found)" in err
    assert len(_events(b, "lease.resolved")) == 1


async def _gauge_is(http: Any, b: Any, expected: dict[str, float]) -> bool:  # noqa: F811
    return await _lost_gauge(http, b) == expected

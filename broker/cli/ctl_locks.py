"""``brokerctl lock create|list|rm`` and ``brokerctl whoami``: locks refuse every new
credential and renewal that matches, on every replica at once, and terminate nothing."""

from __future__ import annotations

import argparse
import urllib.parse
from typing import Any

from broker.cli.ctlbase import EXIT_USAGE, Client, CtlError, Listing, command, table

LOCK_COLUMNS = ["lock_id", "kind", "target", "reason", "incident", "created_by", "expires_at"]


def _target(lock: dict[str, Any]) -> str:
    return f"{lock['claim']}={lock['value']}" if lock["kind"] == "claim" else lock["value"]


def _said(args: argparse.Namespace) -> dict[str, str]:
    return {k: v for k, v in (("reason", args.reason), ("incident", args.incident)) if v}


def cmd_lock_create(c: Client, args: argparse.Namespace) -> Any:
    chosen = [
        (kind, value)
        for kind, value in (
            ("workload", args.workload),
            ("issuer", args.issuer),
            ("role", args.role),
            ("claim", args.claim),
        )
        if value is not None
    ]
    if len(chosen) != 1:
        raise CtlError(
            "name exactly one of --workload, --issuer, --role or --claim key=value", EXIT_USAGE
        )
    kind, value = chosen[0]
    body: dict[str, Any] = {"kind": kind, "value": value, **_said(args)}
    if kind == "claim":
        claim, sep, value = value.partition("=")
        if not sep or not claim or not value:
            raise CtlError("--claim takes key=value, e.g. --claim groups=contractors", EXIT_USAGE)
        body.update(claim=claim, value=value)
    if args.ttl:
        body["ttl"] = args.ttl
    return c.call("POST", "/v1/admin/locks", body=body)["lock"]


def show_lock(lock: dict[str, Any]) -> str:
    until = f", until {lock['expires_at']}" if lock.get("expires_at") else ""
    state = f"removed by {lock['removed_by']}" if lock.get("removed_at") else "active"
    incident = f" (incident {lock['incident']})" if lock["incident"] else ""
    return (
        f"lock {lock['lock_id']} on {lock['kind']} {_target(lock)}: {state}{until}\n"
        f"reason: {lock['reason']}{incident}"
    )


# The most locks the broker lists (``broker.leases.sql.locks.MAX_LISTED``).
MAX_LISTED = 1000


def cmd_lock_list(c: Client, args: argparse.Namespace) -> Any:
    locks = c.call("GET", "/v1/admin/locks", {"all": "true" if args.all else None})["locks"]
    cut = len(locks) >= MAX_LISTED
    return Listing(
        "locks",
        [{**lock, "target": _target(lock)} for lock in locks],
        {"complete": not cut},
        f"{len(locks)} locks shown, the most the broker lists; more may exist"
        + ("" if not args.all else ": list without --all for the active ones")
        if cut
        else None,
    )


def cmd_lock_rm(c: Client, args: argparse.Namespace) -> Any:
    path = f"/v1/admin/locks/{urllib.parse.quote(args.lock_id, safe='')}"
    return c.call("DELETE", path, body=_said(args))["lock"]


def cmd_whoami(c: Client, args: argparse.Namespace) -> Any:
    return c.call("GET", "/v1/admin/whoami")


def show_whoami(me: dict[str, Any]) -> str:
    return f"operator: {me['name']} (scope {me['scope']}, via {me['via']})"


def register(sub: Any) -> None:
    lock = sub.add_parser("lock", help="refuse new credentials and renewals that match")
    lsub = lock.add_subparsers(dest="lock_command", required=True)
    lc = command(lsub, "create", help="refuse every new credential and renewal that matches")
    lc.add_argument("--workload")
    lc.add_argument("--issuer", help="an issuer's name in the broker's configuration")
    lc.add_argument("--role")
    lc.add_argument("--claim", help="key=value: a claim of the identity token (nested: a.b=v)")
    lc.add_argument("--ttl", help="lift the lock by itself after this long (e.g. 1h)")
    lc.add_argument("--reason", required=True, help="why: recorded with the lock and audited")
    lc.add_argument("--incident", help="an incident reference (e.g. INC-1234)")
    lc.set_defaults(run=cmd_lock_create, show=show_lock)
    ll = command(lsub, "list", help="active locks")
    ll.add_argument("--all", action="store_true", help="also removed and expired locks")
    ll.set_defaults(run=cmd_lock_list, show=lambda rows: table(rows, LOCK_COLUMNS))
    lr = command(lsub, "rm", help="remove a lock (idempotent)")
    lr.add_argument("lock_id")
    lr.add_argument("--reason")
    lr.add_argument("--incident")
    lr.set_defaults(run=cmd_lock_rm, show=show_lock)

    who = command(sub, "whoami", help="the operator your admin token is, and its scope")
    who.set_defaults(run=cmd_whoami, show=show_whoami)

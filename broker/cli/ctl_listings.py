"""``brokerctl leases|instances|jobs``: what the broker holds, listed, counted and shown;
and ``leases resolve``, an operator's marker on a lost lease they ended by hand.

Every list says when it was cut: on stderr in a table or ``-o jsonl`` (``… more results:
pass --limit N or --after CURSOR``), as ``next`` in ``-o json``. ``--state`` is checked
here against the broker's states (as the broker checks it again).
"""

from __future__ import annotations

import argparse
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from broker.cli.ctlbase import (
    EXIT_USAGE,
    LEASE_COLUMNS,
    Client,
    CtlError,
    Listing,
    command,
    moment,
    said,
    said_flags,
    table,
)

# The broker's states (``broker.leases.states``), spelled out so that the CLI imports
# nothing of the service; a unit test keeps them equal.
LEASE_STATES = [
    "issuing",
    "active",
    "revoking",
    "delivered",
    "failed",
    "released",
    "revoked",
    "abandoned",
    "expired",
    "lost",
    "resolved",
]
INSTANCE_STATES = ["active", "terminating", "terminated"]
JOB_STATES = ["pending", "running", "done", "failed"]
GROUP_BY = ["role", "engine", "workload", "issuer"]
PAGE = 1000
INSTANCE_COLUMNS = [
    "instance_id",
    "state",
    "workload",
    "issuer_name",
    "live_leases",
    "created_at",
    "terminated_at",
]
JOB_COLUMNS = ["job_id", "instance_id", "state", "attempts", "last_error", "created_at"]


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def since(text: str, now: datetime | None = None) -> str:
    """``--since`` (``ctlbase.moment``), as the ISO time the broker takes."""
    try:
        return moment(text, now or datetime.now(UTC)).isoformat()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def collect(
    c: Client, path: str, key: str, query: dict[str, Any], *, limit: int, after: str | None
) -> Listing:
    """Up to ``limit`` items of a paginated listing, a page of at most 1000 at a time,
    from ``after`` on; cut (with a notice) where ``limit`` stopped it short of the end."""
    items: list[dict[str, Any]] = []
    cursor = after
    while len(items) < limit:  # each round takes at least one item, or ends
        page = c.call(
            "GET", path, {**query, "limit": min(limit - len(items), PAGE), "after": cursor}
        )
        items += page[key]
        cursor = page["next"]
        if not cursor or not page[key]:
            break
    notice = (
        f"{len(items)} {key} shown; more results: pass --limit N or --after {cursor}"
        if cursor
        else None
    )
    return Listing(key, items, {"next": cursor}, notice)


def cmd_leases(c: Client, args: argparse.Namespace) -> Listing:
    query = {k: getattr(args, k) for k in ("instance", "workload", "role", "state")}
    return collect(c, "/v1/admin/leases", "leases", query, limit=args.limit, after=args.after)


def cmd_count(c: Client, args: argparse.Namespace) -> Listing:
    answer = c.call(
        "GET",
        "/v1/admin/leases/count",
        {"group_by": args.group_by, "state": args.state, "top": args.top},
    )
    groups = answer.pop("groups")
    notice = None
    if answer["group_count"] > len(groups):
        notice = (
            f"{len(groups)} of {answer['group_count']} groups shown ({answer['others']} "
            "leases in the others); more results: pass --top N"
        )
    return Listing("groups", groups, answer, notice)


def show_count(rows: list[dict[str, Any]]) -> str:
    shown = [{"group": "-" if r["key"] is None else r["key"], "count": r["count"]} for r in rows]
    return table(shown, ["group", "count"])


def cmd_lease(c: Client, args: argparse.Namespace) -> Any:
    path = f"/v1/admin/leases/{urllib.parse.quote(args.lease_id, safe='')}"
    return c.call("GET", path, {"vault": "true"} if args.vault else None)


def show_lease(lease: Any) -> str:
    keys = [
        "lease_id",
        "instance_id",
        "workload",
        "role",
        "kind",
        "state",
        "renewable",
        "created_at",
        "issued_at",
        "expires_at",
        "ended_at",
        "vault_lease_id",
        "vault_path",
        "revoke_sent_at",
    ]
    lines = [f"{k:<15} {'' if lease.get(k) is None else lease[k]}" for k in keys]
    ref = lease.get("credential_ref") or {}
    lines.append(f"{'credential_ref':<15} {', '.join(f'{k}={v}' for k, v in sorted(ref.items()))}")
    resolution = lease.get("resolution")
    if resolution:
        lines += [
            f"{'resolved_at':<15} {resolution['at']}",
            f"{'resolved_by':<15} {resolution['by']}",
            f"{'reason':<15} {resolution['reason']}",
            f"{'incident':<15} {resolution.get('incident') or ''}",
        ]
    if lease.get("state") == "lost":
        lines.append(
            "LOST: Vault no longer knew this lease before the broker revoked it; the "
            "credential may still work: end it by hand (README: Lost leases and alerting), "
            f"then: brokerctl leases resolve {lease['lease_id']} --reason TEXT"
        )
    vault = lease.get("vault")
    if vault is not None:
        if "error" in vault:
            why = {
                "lease_unknown": "Vault does not know this lease (gone, or lost if the "
                "store still counts it live)",
                "no_vault_lease": "no Vault lease (a credential Vault does not lease)",
            }.get(vault["error"], "Vault could not be asked")
            lines.append(f"{'vault':<15} {why} ({vault['error']})")
        else:
            lines += [
                f"{'vault ttl':<15} {vault['ttl']}s",
                f"{'vault expires':<15} {vault['expire_time'] or ''}",
                f"{'vault issued':<15} {vault['issue_time'] or ''}",
                f"{'vault renewable':<15} {vault['renewable']}",
            ]
    return "\n".join(line.rstrip() for line in lines)


def cmd_resolve(c: Client, args: argparse.Namespace) -> Any:
    if not args.reason.strip():
        raise CtlError("--reason: say how the credential was ended by hand", EXIT_USAGE)
    path = f"/v1/admin/leases/{urllib.parse.quote(args.lease_id, safe='')}/resolve"
    return c.call("POST", path, body=said(args))


def show_resolve(result: Any) -> str:
    lease, resolution = result["lease"], result["lease"]["resolution"]
    incident = f", incident {resolution['incident']}" if resolution.get("incident") else ""
    head = (
        f"lease {lease['lease_id']} resolved"
        if result["changed"]
        else f"lease {lease['lease_id']} was resolved already; nothing changed"
    )
    return (
        f"{head}: by {resolution['by']} at {resolution['at']}{incident}\n"
        f"reason: {resolution['reason']}"
    )


def cmd_instances(c: Client, args: argparse.Namespace) -> Listing:
    query = {
        "state": args.state,
        "workload": args.workload,
        "issuer": args.issuer,
        "since": args.since,
    }
    return collect(c, "/v1/admin/instances", "instances", query, limit=args.limit, after=args.after)


def cmd_instance(c: Client, args: argparse.Namespace) -> Any:
    return c.call("GET", f"/v1/instances/{urllib.parse.quote(args.instance_id, safe='')}")


def show_instance(inst: Any) -> str:
    job = inst.get("job")
    head = [
        f"instance   {inst['instance_id']}",
        f"state      {inst['state']}",
        f"workload   {inst.get('workload') or ''}",
        f"created    {inst['created_at']}",
        f"terminated {inst.get('terminated_at') or ''}",
        f"job        {job['state'] + ' (' + job['job_id'] + ')' if job else '-'}",
        "",
    ]
    return "\n".join(head) + table(inst["leases"], LEASE_COLUMNS)


def cmd_jobs(c: Client, args: argparse.Namespace) -> Listing:
    query = {"state": args.state, "instance": args.instance, "since": args.since}
    return collect(c, "/v1/admin/jobs", "jobs", query, limit=args.limit, after=args.after)


def cmd_job_retry(c: Client, args: argparse.Namespace) -> Any:
    return c.call(
        "POST",
        f"/v1/admin/jobs/{urllib.parse.quote(args.job_id, safe='')}/retry",
        body=said(args),
    )


def show_job_retry(result: Any) -> str:
    job = result["job"]
    return f"job {job['job_id']} of instance {job['instance_id']} is {job['state']} again"


def _page_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit",
        type=positive,
        default=PAGE,
        metavar="N",
        help=f"at most this many (default {PAGE})",
    )
    p.add_argument("--after", metavar="CURSOR", help="continue a listing where a cut one said")


def _since_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--since",
        type=since,
        metavar="TIME|DURATION",
        help="created since: a duration back (2h) or a time (ISO 8601)",
    )


def register(sub: Any) -> None:
    leases = sub.add_parser("leases", help="leases the broker tracks")
    lsub = leases.add_subparsers(dest="leases_command", required=True)
    ll = command(lsub, "list", help="leases, filtered")
    for name in ("instance", "workload", "role"):
        ll.add_argument(f"--{name}")
    ll.add_argument("--state", choices=LEASE_STATES)
    _page_flags(ll)
    ll.set_defaults(run=cmd_leases, show=lambda rows: table(rows, LEASE_COLUMNS))
    lc = command(lsub, "count", help="live leases counted by role, engine, workload or issuer")
    lc.add_argument("--group-by", required=True, choices=GROUP_BY)
    lc.add_argument("--state", choices=LEASE_STATES, help="default: the live states")
    lc.add_argument(
        "--top", type=positive, default=20, metavar="N", help="the N largest groups (default 20)"
    )
    lc.set_defaults(run=cmd_count, show=show_count)
    ls = command(lsub, "show", help="one lease; --vault adds what Vault says of it now")
    ls.add_argument("lease_id")
    ls.add_argument("--vault", action="store_true", help="look the lease up in Vault")
    ls.set_defaults(run=cmd_lease, show=show_lease)
    lr = command(
        lsub,
        "resolve",
        help="mark a lost lease resolved once its credential was ended by hand (audited)",
    )
    lr.add_argument("lease_id")
    lr.add_argument(
        "--reason", required=True, help="how the credential was ended: recorded and audited"
    )
    lr.add_argument("--incident", metavar="ID", help="an incident reference (e.g. INC-1234)")
    lr.set_defaults(run=cmd_resolve, show=show_resolve)

    inst = sub.add_parser("instances", help="instances the broker tracks")
    isub = inst.add_subparsers(dest="instances_command", required=True)
    il = command(isub, "list", help="instances, oldest first, with their live leases")
    il.add_argument("--state", choices=INSTANCE_STATES)
    il.add_argument("--workload")
    il.add_argument("--issuer")
    _since_flag(il)
    _page_flags(il)
    il.set_defaults(run=cmd_instances, show=lambda rows: table(rows, INSTANCE_COLUMNS))
    ish = command(isub, "show", help="an instance, its leases and its revocation job")
    ish.add_argument("instance_id")
    ish.set_defaults(run=cmd_instance, show=show_instance)

    jobs = sub.add_parser("jobs", help="revocation jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    jl = command(jsub, "list", help="revocation jobs, oldest first")
    jl.add_argument("--state", choices=JOB_STATES)
    jl.add_argument("--instance")
    _since_flag(jl)
    _page_flags(jl)
    jl.set_defaults(run=cmd_jobs, show=lambda rows: table(rows, JOB_COLUMNS))
    jr = command(jsub, "retry", help="queue a failed job again")
    jr.add_argument("job_id")
    said_flags(jr)
    jr.set_defaults(run=cmd_job_retry, show=show_job_retry)

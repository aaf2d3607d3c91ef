"""``brokerctl revoke``: terminate one instance, or every instance a selection reaches,
showing the blast radius first.

Selectors, repeatable and combinable (the same one repeated: OR; different ones: AND):
``--instance``, ``--workload``, ``--role``, ``--issuer``, ``--claim key=value`` (a claim
recorded at the instance's first issuance), ``--issued-after/--issued-before`` (an RFC 3339
time or a duration ago: ``2h``), ``--lease``. ``--dry-run`` prints the blast radius and
changes nothing. A selection reaching more than one instance needs ``--yes`` (or ``--max N``
as a guard) and ``--reason``. ``--wait`` shows progress on stderr and ends with a summary.
An instance id the broker never saw is tombstoned all the same and reported as
"never seen: tombstoned, 0 leases", with exit code 9 (``EXIT_NEVER_SEEN``)."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from broker.cli.ctlbase import (
    EXIT_FAILED,
    EXIT_NEVER_SEEN,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    Client,
    CtlError,
    command,
    moment,
    table,
)

# The API's bounds (``broker.revocation.bulk``): a batch, and how many batches one run
# may take (10,000 instances at the default batch is 50).
DEFAULT_BATCH = 200
MAX_BATCH = 1000
MAX_BATCHES = 10_000
# Passes over the selection: a pass ends with what is still left in it (an instance that
# appeared behind the cursor, a failed job); another pass starts from the beginning, and
# what is left after the last is reported with EXIT_FAILED.
MAX_PASSES = 3
POLL_S = 0.5
# Selector flag -> the selection field it fills.
LISTS = {
    "instance": "instances",
    "workload": "workloads",
    "issuer": "issuers",
    "role": "roles",
    "lease": "leases",
    "claim": "claims",
}


def when(text: str, now: datetime) -> str:
    """``--issued-after/--issued-before`` (``ctlbase.moment``), as the RFC 3339 time the
    API takes. Raises ``ValueError`` saying what was expected."""
    return moment(text, now).astimezone(UTC).isoformat().replace("+00:00", "Z")


def selection_of(args: argparse.Namespace, now: datetime) -> dict[str, Any]:
    """The API's selection from the selector flags. Raises ``CtlError`` (usage)."""
    selection: dict[str, Any] = {}
    for flag, field in LISTS.items():
        values = getattr(args, flag, None) or []
        if values:
            selection[field] = list(dict.fromkeys(values))
    for claim in selection.get("claims", []):
        key, sep, value = claim.partition("=")
        if not sep or not key or not value:
            raise CtlError(f"--claim {claim!r}: expected key=value, e.g. team=payments", EXIT_USAGE)
    for flag in ("issued_after", "issued_before"):
        text = getattr(args, flag, None)
        if text:
            try:
                selection[flag] = when(text, now)
            except ValueError as exc:
                raise CtlError(f"--{flag.replace('_', '-')}: {exc}", EXIT_USAGE) from None
    if not selection:
        raise CtlError(
            "name what to revoke: --instance, --workload, --role, --issuer, --claim k=v, "
            "--issued-after/--issued-before or --lease (repeatable; --dry-run to look first)",
            EXIT_USAGE,
        )
    return selection


def single_instance(selection: dict[str, Any]) -> str | None:
    """The instance id when the selection is exactly one ``--instance`` and nothing else."""
    ids = selection.get("instances", [])
    return ids[0] if len(selection) == 1 and len(ids) == 1 else None


def bulk_refusal(reach: int, args: argparse.Namespace) -> str | None:
    """Why a bulk revocation reaching ``reach`` instances may not go ahead, or None."""
    if reach > 1 and not (args.yes or args.max is not None):
        return (
            f"this selection reaches {reach} instances; look with --dry-run, then confirm with "
            "--yes (or guard with --max N)"
        )
    if reach > 1 and not args.reason:
        return f"this selection reaches {reach} instances: say why with --reason TEXT"
    return None


def _single(c: Client, instance_id: str, args: argparse.Namespace) -> dict[str, Any]:
    path = f"/v1/instances/{urllib.parse.quote(instance_id, safe='')}"
    said = {k: v for k, v in (("reason", args.reason), ("incident", args.incident)) if v}
    result: dict[str, Any] = c.call("POST", f"{path}/terminate", body=said or None)
    if args.wait:
        deadline = time.monotonic() + args.timeout
        while result["job"]["state"] not in ("done", "failed"):
            if time.monotonic() > deadline:
                raise CtlError(
                    f"revocation of {instance_id} not finished after "
                    f"{args.timeout}s (job {result['job']['state']})",
                    EXIT_TIMEOUT,
                )
            time.sleep(POLL_S)
            shown = c.call("GET", path)
            result = {**result, "job": shown["job"]}
        if result["job"]["state"] == "failed":
            raise CtlError(
                f"revocation of {instance_id} failed: {result['job']['last_error']}", EXIT_FAILED
            )
        shown = c.call("GET", path)
        result["lost"] = [x for x in shown.get("leases", []) if x.get("state") == "lost"]
    return result


def _progress_line(radius: dict[str, Any]) -> str:
    """Progress over the selection's jobs: those of this run and of earlier terminations of
    instances it reaches, so done, failed and left always add up to the total."""
    jobs, leases = radius["progress"]["jobs"], radius["progress"]["leases"]
    total, done = sum(jobs.values()), jobs.get("done", 0)
    return (
        f"instances {done}/{total} done, {total - done - jobs.get('failed', 0)} left · "
        f"leases {leases['ended']} ended, {leases['live']} live · "
        f"failures {jobs.get('failed', 0)}"
    )


def _wait(c: Client, selection: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Poll the selection's progress until no job is pending or running."""
    deadline = time.monotonic() + timeout
    while True:
        radius: dict[str, Any] = c.call(
            "POST", "/v1/admin/selection", body={"selection": selection}
        )
        jobs = radius["progress"]["jobs"]
        print(f"brokerctl: {_progress_line(radius)}", file=sys.stderr)
        if not jobs.get("pending") and not jobs.get("running"):
            return radius
        if time.monotonic() > deadline:
            raise CtlError(
                f"revocation not finished after {timeout}s: {_progress_line(radius)}",
                EXIT_TIMEOUT,
            )
        time.sleep(POLL_S)


def cmd_revoke(c: Client, args: argparse.Namespace) -> Any:
    selection = selection_of(args, datetime.now(UTC))
    one = single_instance(selection)
    if one is not None and not args.dry_run:
        return _single(c, one, args)
    radius = c.call("POST", "/v1/admin/selection", body={"selection": selection})
    if args.dry_run:
        return {"dry_run": True, "selection": selection, **radius}
    reach = radius["instances"] + len(radius["never_seen"])
    refusal = bulk_refusal(reach, args)
    if refusal:
        raise CtlError(refusal, EXIT_USAGE)
    body: dict[str, Any] = {"selection": selection, "batch": args.batch}
    for key, value in (("reason", args.reason), ("incident", args.incident), ("max", args.max)):
        if value is not None:
            body[key] = value
    terminated: list[dict[str, Any]] = []
    never_seen: list[str] = []
    after = None
    passes, left = 1, 0
    for _ in range(MAX_BATCHES):
        batch = c.call("POST", "/v1/admin/terminations", body={**body, "after": after})
        terminated += batch["terminated"]
        never_seen += [i for i in batch["never_seen"] if i not in never_seen]
        after = batch["next"]
        if args.wait or len(terminated) > len(batch["terminated"]):
            print(f"brokerctl: {len(terminated)} instance(s) terminated so far", file=sys.stderr)
        left = batch["counts"]["remaining"]
        if after is not None:
            continue
        if not left or passes >= MAX_PASSES:
            break
        passes += 1
        print(
            f"brokerctl: {left} instance(s) of the selection still untouched "
            f"(appeared while the batches ran, or a job failed): pass {passes}",
            file=sys.stderr,
        )
    else:
        left = max(left, 1)  # batches ran out with a cursor still to follow
    result: dict[str, Any] = {
        "terminated": terminated,
        "never_seen": never_seen,
        "counts": {
            "instances": len(terminated),
            "leases": sum(t["leases"] for t in terminated),
            "never_seen": len(never_seen),
            "left": left,
        },
    }
    if args.wait:
        final = _wait(c, selection, args.timeout)
        result["progress"] = final["progress"]
    return result


def show_revoke(result: Any) -> str:
    if "job" in result:  # one instance
        job = result["job"]
        head = f"instance {result['instance_id']}: "
        if result.get("never_seen"):
            head += "never seen: tombstoned, 0 leases; "
        line = (
            head
            + f"revocation job {job['job_id']} is {job['state']} (attempts {job['attempts']}"
            + (f", last error {job['last_error']}" if job.get("last_error") else "")
            + ")"
        )
        return "\n".join([line, *_lost_lines(result.get("lost") or [])])
    if result.get("dry_run"):
        return show_radius(result)
    counts = result["counts"]
    lines = [
        f"terminated {counts['instances']} instance(s); {counts['leases']} live lease(s) "
        "queued for revocation"
    ]
    lines += [f"{i}: never seen: tombstoned, 0 leases" for i in result["never_seen"]]
    if counts.get("left"):
        lines.append(
            f"NOT DONE: {counts['left']} instance(s) of the selection still active or with a "
            "failed job (new instances keep appearing?): lock the workload first "
            "(brokerctl lock create), then run this revoke again"
        )
    if "progress" in result:
        jobs, leases = result["progress"]["jobs"], result["progress"]["leases"]
        earlier = sum(jobs.values()) - counts["instances"]
        lines.append(
            f"done: {jobs.get('done', 0)} job(s) done, {jobs.get('failed', 0)} failed; "
            f"leases {leases['ended']} ended, {leases['live']} still live"
            + (f" ({earlier} of the jobs from earlier terminations)" if earlier > 0 else "")
        )
        if leases.get("lost"):
            lines.append(
                f"NOT DONE: {leases['lost']} lease(s) LOST: Vault no longer knew them, so "
                "their credentials may still work; end them by hand "
                "(brokerctl leases list --state lost, then leases show LEASE_ID), then "
                "mark each handled: brokerctl leases resolve LEASE_ID --reason TEXT"
            )
    return "\n".join(lines)


def _lost_lines(lost: list[dict[str, Any]]) -> list[str]:
    """One instance's lost leases, with what an operator needs to end each by hand."""
    if not lost:
        return []
    lines = [
        f"NOT DONE: {len(lost)} lease(s) LOST: Vault no longer knew them before the broker "
        "revoked them, so their credentials may still work; end them by hand, then mark "
        "each handled (brokerctl leases resolve LEASE_ID --reason TEXT):"
    ]
    for lease in lost:
        ref = ", ".join(f"{k}={v}" for k, v in sorted((lease.get("credential_ref") or {}).items()))
        lines.append(
            f"  lost  {lease['lease_id']}  role {lease['role']}  vault path "
            f"{lease.get('vault_path') or '-'}  {ref or '(no identifier recorded)'}"
        )
    return lines


def show_radius(radius: dict[str, Any]) -> str:
    leases = radius["leases"]
    lines = [
        f"dry run: nothing was changed. This selection reaches {radius['instances']} active "
        f"instance(s) holding {leases['live']} live lease(s)"
        + (
            f"; {radius['already_terminated']} already terminated"
            if radius["already_terminated"]
            else ""
        ),
        "",
        table([{"role": r, "leases": n} for r, n in leases["by_role"].items()], ["role", "leases"]),
        "",
        table(
            [{"engine": e, "leases": n} for e, n in leases["by_engine"].items()],
            ["engine", "leases"],
        ),
        "",
        table(radius["workloads"]["top"], ["workload", "instances"]),
    ]
    shown = len(radius["workloads"]["top"])
    if radius["workloads"]["count"] > shown:
        lines.append(f"(top {shown} of {radius['workloads']['count']} workloads)")
    if radius["sample"]:
        more = radius["instances"] - len(radius["sample"])
        lines += [
            "",
            "instances: "
            + ", ".join(radius["sample"])
            + (f" … and {more} more" if more > 0 else ""),
        ]
    lines += [
        f"{i}: never seen: a revocation would tombstone it (0 leases)" for i in radius["never_seen"]
    ]
    return "\n".join(lines)


def revoke_exit(result: Any) -> int:
    """Failures first (a failed job, or instances the run left untouched), then ids the
    broker never saw (a typo is noticed)."""
    jobs = result.get("progress", {}).get("jobs", {}) if isinstance(result, dict) else {}
    lost = result.get("lost") or result.get("progress", {}).get("leases", {}).get("lost")
    if jobs.get("failed") or result.get("counts", {}).get("left") or lost:
        return EXIT_FAILED  # a lost lease is not revoked: not done in the safe sense
    if result.get("never_seen"):
        return EXIT_NEVER_SEEN
    return EXIT_OK


def register(sub: Any) -> None:
    r = command(
        sub,
        "revoke",
        help="terminate instances: revoke everything they hold (selectors; --dry-run first)",
    )
    r.add_argument("--instance", action="append", help="an instance id (repeatable)")
    r.add_argument("--workload", action="append", help="repeatable")
    r.add_argument("--role", action="append", help="holding a live lease of the role (repeatable)")
    r.add_argument("--issuer", action="append", help="repeatable")
    r.add_argument(
        "--claim", action="append", metavar="KEY=VALUE", help="a claim recorded at first issuance"
    )
    r.add_argument("--issued-after", metavar="TIME", help="RFC 3339 time or a duration ago (2h)")
    r.add_argument("--issued-before", metavar="TIME", help="RFC 3339 time or a duration ago (2h)")
    r.add_argument("--lease", action="append", metavar="LEASE_ID", help="repeatable")
    r.add_argument("--dry-run", action="store_true", help="show the blast radius; change nothing")
    r.add_argument("--yes", action="store_true", help="confirm a selection of several instances")
    r.add_argument("--max", type=int, metavar="N", help="refuse if more than N instances")
    r.add_argument("--reason", help="why (required beyond one instance)")
    r.add_argument("--incident", metavar="ID", help="the incident it belongs to")
    r.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=argparse.SUPPRESS)
    r.add_argument(
        "--wait", action="store_true", help="wait until Vault confirms; progress on stderr"
    )
    r.add_argument("--timeout", type=float, default=120.0)
    r.set_defaults(run=cmd_revoke, show=show_revoke, attention=revoke_exit)

"""``brokerctl``: the admin CLI over the admin API. Tables for people, ``-o json`` for
scripts. Reads ``BROKER_URL``, ``BROKER_ADMIN_TOKEN`` and ``BROKER_CA_FILE`` (the CA of a
broker whose certificate a private CA signed) from the environment or flags.

Exit codes: 0 ok · 1 the broker refused or failed · 2 usage · 3 not found ·
4 not authorized (missing or wrong token, or a scope too small) · 5 broker unreachable or
unavailable (also ``audit verify`` when a checkpoint signature could not be checked: Vault
unreachable, or its key rotated seconds ago) · 6 ``--wait`` timed out · 7 ``reconcile``
found something that needs a person (orphans left in Vault, leases past expiry that Vault
keeps, stuck rows it could not settle, leases lost, a failed step) · 8 ``audit verify``
found the audit chain altered, cut or not matching its checkpoints, or old events no
checkpoint covers · 9 ``revoke`` named an instance the broker has never seen
(tombstoned, 0 leases: a typo?) · 10 the answer is a refusal (``policy explain``: token
invalid, role refused by policy, instance terminated, locked). A bulk ``revoke`` that left
something exits 1, and so does ``revoke --wait`` when a lease was lost (Vault had
forgotten it: not revoked) until an operator who ended its credential by hand marks it
resolved (``leases resolve``).

A list that stops short of everything says so: on stderr in a table or ``-o jsonl``
("… more results: pass --limit N or --after CURSOR"), as ``next`` in ``-o json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from broker.cli import ctl_audit, ctl_listings, ctl_locks, ctl_revoke
from broker.cli.ctlbase import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_FINDINGS,
    EXIT_NEVER_SEEN,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TAMPERED,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    LEASE_COLUMNS,
    Client,
    CtlError,
    Listing,
    command,
    connection_flags,
    said,
    said_flags,
    table,
)


def cmd_explain(c: Client, args: argparse.Namespace) -> Any:
    try:
        token = (sys.stdin.read() if args.token == "-" else open(args.token).read()).strip()
    except OSError as exc:
        raise CtlError(f"cannot read --token {args.token}: {exc.strerror}", EXIT_USAGE) from None
    if not token:
        raise CtlError(f"--token {args.token} is empty", EXIT_USAGE)
    body = {"token": token, "role": args.role}
    if args.ttl:
        body["ttl"] = args.ttl
    return c.call("POST", "/v1/admin/policy/explain", body=body)


def _refusal(r: Any) -> str:
    extra = ", ".join(f"{k} {r[k]}" for k in ("since", "by", "lock_id") if r.get(k))
    return f"refused   {r['message']} ({r['code']}{', ' + extra if extra else ''})"


def show_explain(result: Any) -> str:
    tok, ident, dec = result["token"], result["identity"], result["decision"]
    refusals = result.get("refusals", [])
    lines = [f"verdict   {'REFUSED' if refusals else 'GRANTED'}"]
    lines += [_refusal(r) for r in refusals]
    if not tok["valid"]:
        err = tok["error"]
        lines.append(
            f"token     REFUSED by {tok['issuer'] or 'no configured issuer'}: "
            f"{err['message']} ({err['code']})"
        )
        return "\n".join(lines)
    state = (result.get("instance") or {}).get("state", "")
    lines += [
        f"token     valid, issuer {tok['issuer']}",
        f"identity  instance {ident['instance_id']}, workload {ident['workload']}, "
        f"subject {ident['subject'] or '-'}, expires {ident['expires_at']}",
        f"instance  {state.replace('_', ' ')}",
        f"rules     applying: {', '.join(dec['rules_applying']) or 'none'}",
        f"policy    {dec['role']}: {'allowed' if dec['allowed'] else 'refused'}"
        + (f" by rule {dec['rule']}, ttl {dec['ttl']}s" if dec["allowed"] else ""),
        f"why       {dec['reason']}",
    ]
    if dec.get("params"):
        lines.append("params    " + ", ".join(f"{k}={v}" for k, v in dec["params"].items()))
    return "\n".join(lines)


def explain_exit(result: Any) -> int:
    """A refusal is not a success: scripts gate on the exit code."""
    return EXIT_REFUSED if result.get("refusals") else EXIT_OK


def cmd_reconcile(c: Client, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"revoke_orphans": True} if args.revoke_orphans else {}
    return c.call("POST", "/v1/admin/reconcile", body={**body, **said(args)})


def reconcile_needs_attention(report: Any) -> bool:
    return bool(
        report.get("errors")
        or report.get("orphans", 0) > report.get("orphans_revoked", 0)
        or report.get("past_expiry_held")
        or report.get("stuck_waiting")
        or report.get("irrevocable")
        or report.get("lost")
    )


def show_reconcile(report: Any) -> str:
    if report.get("skipped"):
        return "another broker replica is reconciling right now; try again in a moment"
    lines = [
        f"expired            {report['expired']} lease(s) marked expired (Vault confirmed)",
        f"expiry corrected   {report['expiry_corrected']}",
        f"past expiry, held  {len(report['past_expiry_held'])}",
        f"stuck issuing      {report['stuck_settled']} settled, "
        f"{report['stuck_revoked_in_vault']} unrecorded lease(s) revoked, "
        f"{len(report['stuck_waiting'])} waiting",
        f"orphans            {report['orphans']} found, {report['orphans_revoked']} revoked",
        f"irrevocable        {len(report.get('irrevocable', []))} (Vault gave up revoking)",
        f"unseen instances   {len(report['unseen_terminated'])} terminated",
        f"lost               {len(report.get('lost', []))} lease(s) Vault had forgotten "
        "(their credentials may still work: end them by hand)",
    ]
    for lease in report.get("lost", []):
        lines.append(f"  lost    {lease}  (brokerctl leases show {lease})")
    for lease in report["orphan_sample"]:
        lines.append(f"  orphan  {lease}")
    for lease in report["past_expiry_held"]:
        lines.append(f"  held    {lease}")
    for lease in report.get("irrevocable", []):
        lines.append(f"  irrevocable  {lease}")
    for step, code in sorted(report["errors"].items()):
        lines.append(f"error in {step}: {code}")
    if report["orphans"] > report["orphans_revoked"]:
        lines.append("revoke the orphans with: brokerctl reconcile --revoke-orphans")
    return "\n".join(lines)


def _environment() -> dict[str, Any]:
    """The connection flags' defaults: brokerctl is an HTTP client that loads no settings,
    so it reads these itself (``scripts/check_shape.py`` allows this module to)."""
    return {
        "url": os.environ.get("BROKER_URL"),
        "admin_token": os.environ.get("BROKER_ADMIN_TOKEN"),
        "ca_file": os.environ.get("BROKER_CA_FILE"),
    }


# Command groups in modules of their own (``broker/cli/ctl_<name>.py``, each with
# ``register(sub)``), in the order ``--help`` lists them.
COMMAND_MODULES = (ctl_revoke, ctl_listings, ctl_locks, ctl_audit)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brokerctl", description="Admin CLI of the credential broker")
    connection_flags(p, _environment())
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)

    pol = sub.add_parser("policy", help="policy questions")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    pe = command(psub, "explain", help="would this token get that role, and why")
    pe.add_argument("--token", required=True, help="file holding the identity token (- = stdin)")
    pe.add_argument("--role", required=True)
    pe.add_argument("--ttl")
    pe.set_defaults(run=cmd_explain, show=show_explain, exit_code=explain_exit)

    rec = command(
        sub,
        "reconcile",
        help="compare the store with Vault now: expired leases, stuck requests, orphans",
    )
    rec.add_argument(
        "--revoke-orphans",
        action="store_true",
        help="revoke the leases under the broker's Vault paths that the store does not hold",
    )
    said_flags(rec)
    rec.set_defaults(run=cmd_reconcile, show=show_reconcile, attention=reconcile_needs_attention)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.url:
        parser.error("no broker URL: set BROKER_URL or pass --url")
    if not args.admin_token:
        parser.error("no admin token: set BROKER_ADMIN_TOKEN or pass --admin-token")
    try:
        client = Client(args.url, args.admin_token, ca_file=args.ca_file or None)
        result = args.run(client, args)
    except CtlError as exc:
        print(f"brokerctl: {exc}", file=sys.stderr)
        return exc.exit_code
    if getattr(args, "streamed", False):  # the leaf printed as it went (--follow, export)
        return EXIT_OK
    _print(args, result)
    judge = getattr(args, "exit_code", None)  # a leaf whose result decides its exit code
    if judge is not None:
        return int(judge(result))
    attention = getattr(args, "attention", None)
    found = attention(result) if attention is not None else False
    if found is True:
        return EXIT_FINDINGS
    return int(found) or EXIT_OK  # a command's own exit code (revoke's never-seen)


def _print(args: argparse.Namespace, result: Any) -> None:
    listing = result if isinstance(result, Listing) else None
    if args.output == "json":
        shown = {listing.key: listing.items, **listing.fields} if listing else result
        print(json.dumps(shown, indent=2))
    else:
        if args.output == "jsonl":
            items = listing.items if listing else result
            for item in items if isinstance(items, list) else [items]:
                print(json.dumps(item, separators=(",", ":")))
        else:
            print(args.show(listing.items if listing else result))
        if listing and listing.notice:
            sys.stdout.flush()
            print(f"brokerctl: {listing.notice}", file=sys.stderr)


__all__ = [
    "EXIT_AUTH",
    "EXIT_FAILED",
    "EXIT_FINDINGS",
    "EXIT_NEVER_SEEN",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_TAMPERED",
    "EXIT_TIMEOUT",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "LEASE_COLUMNS",
    "Client",
    "CtlError",
    "Listing",
    "main",
    "table",
]


if __name__ == "__main__":
    sys.exit(main())

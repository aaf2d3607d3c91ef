"""``brokerctl``: the admin CLI over the admin API. Tables for people, ``-o json`` for
scripts. Reads ``BROKER_URL``, ``BROKER_ADMIN_TOKEN`` and ``BROKER_CA_FILE`` (the CA of a
broker whose certificate a private CA signed) from the environment or flags.

Exit codes: 0 ok · 1 the broker refused or failed · 2 usage · 3 not found ·
4 not authorized (missing or wrong admin token) · 5 broker unreachable or unavailable ·
6 ``--wait`` timed out · 7 ``reconcile`` found something that needs a person (orphans left
in Vault, leases past expiry that Vault keeps, stuck rows it could not settle, a failed
step) · 8 ``audit verify`` found the audit chain altered, cut or not matching its
checkpoints · 9 ``revoke`` named an instance the broker has never seen (tombstoned, 0
leases: a typo?) · 10 the answer is a refusal (``policy explain``: token invalid, role
refused by policy, instance terminated, locked).

A list that stops short of everything says so: on stderr in a table or ``-o jsonl``
("… more results: pass --limit N or --after CURSOR"), as ``next`` in ``-o json``.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_AUTH, EXIT_UNAVAILABLE, EXIT_TIMEOUT = (
    0,
    1,
    2,
    3,
    4,
    5,
    6,
)
EXIT_FINDINGS = 7
EXIT_TAMPERED = 8
EXIT_NEVER_SEEN = 9
EXIT_REFUSED = 10


class CtlError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _loopback(url: str) -> bool:
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _trust(ca_file: str | None) -> ssl.SSLContext | None:
    """The CA bundle to verify the broker's certificate with (None: the system's)."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:
        why = str(exc.reason or exc).lower().replace("_", " ")
        raise CtlError(f"--ca-file {ca_file}: not a CA bundle ({why})", EXIT_USAGE) from None
    except OSError as exc:
        raise CtlError(f"--ca-file {ca_file}: {exc.strerror}", EXIT_USAGE) from None


class Client:
    def __init__(
        self, url: str, token: str, timeout: float = 30.0, ca_file: str | None = None
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise CtlError(f"BROKER_URL must be an http(s) URL, got {url[:60]!r}", EXIT_USAGE)
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.ssl = _trust(ca_file)
        if url.startswith("http://") and not _loopback(url):
            print(
                f"brokerctl: warning: {self.url} is plain http: the admin token crosses the "
                "network in clear text; use https:// (or a port-forward to 127.0.0.1)",
                file=sys.stderr,
            )

    def call(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        q = {k: v for k, v in (query or {}).items() if v is not None}
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(q)}" if q else "")
        req = urllib.request.Request(  # noqa: S310 — http(s) only, checked in __init__
            url,
            method=method,
            data=json.dumps(body).encode()
            if body is not None
            else (b"" if method == "POST" else None),
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/json",
                "Content-Type": "application/json",
            },
        )
        try:
            # The URL is the operator's BROKER_URL; only http(s) is accepted in main().
            with urllib.request.urlopen(  # noqa: S310
                req, timeout=self.timeout, context=self.ssl
            ) as resp:
                answer = resp.read()
                return json.loads(answer) if answer else None
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())["error"]
                message = f"{err['message']} ({err['code']})"
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code}"
            code = {401: EXIT_AUTH, 403: EXIT_AUTH, 404: EXIT_NOT_FOUND, 503: EXIT_UNAVAILABLE}.get(
                exc.code, EXIT_FAILED
            )
            if exc.code in (401, 403):
                message += "; set BROKER_ADMIN_TOKEN or pass --admin-token"
            raise CtlError(message, code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise CtlError(
                    f"the broker's TLS certificate at {self.url} is not trusted "
                    f"({reason.verify_message}); pass --ca-file or set BROKER_CA_FILE to "
                    "the CA that signed it",
                    EXIT_UNAVAILABLE,
                ) from None
            raise CtlError(
                f"cannot reach the broker at {self.url}: {reason}; set BROKER_URL or pass --url",
                EXIT_UNAVAILABLE,
            ) from None


@dataclass(frozen=True)
class Listing:
    """A list a command shows: ``-o json`` prints ``{key: items, **fields}`` (``fields``
    holds ``next``, the cursor where the list was cut, None when complete, and any
    totals); a table or ``-o jsonl`` prints the items, and ``notice`` on stderr when the
    list was cut. Every command that lists returns one, so no list is cut silently."""

    key: str
    items: list[dict[str, Any]]
    fields: dict[str, Any] = field(default_factory=dict)
    notice: str | None = None


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


LEASE_COLUMNS = ["lease_id", "instance_id", "workload", "role", "kind", "state", "expires_at"]


def said(args: argparse.Namespace) -> dict[str, str]:
    """An admin action's --reason and --incident, where given (recorded and audited)."""
    return {
        k: v
        for k, v in (
            ("reason", getattr(args, "reason", None)),
            ("incident", getattr(args, "incident", None)),
        )
        if v
    }




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
    ]
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


def _connection_flags(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The flags every command takes, before or after the subcommand (``-o json`` anywhere,
    as kubectl and vault users expect). Leaf parsers take them with no default of their own,
    so a flag given before the subcommand is not overwritten by the leaf's default."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    p.add_argument(
        "--url", default=default(os.environ.get("BROKER_URL")), help="default: $BROKER_URL"
    )
    p.add_argument(
        "--admin-token",
        default=default(os.environ.get("BROKER_ADMIN_TOKEN")),
        help="default: $BROKER_ADMIN_TOKEN",
    )
    p.add_argument(
        "--ca-file",
        default=default(os.environ.get("BROKER_CA_FILE")),
        help="CA bundle for the broker's TLS certificate (default: $BROKER_CA_FILE; "
        "without it, the system's CAs)",
    )
    p.add_argument("-o", "--output", choices=["table", "json", "jsonl"], default=default("table"))


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _connection_flags(common, defaults=False)
    return common


def command(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A leaf command under ``sub`` (a subparsers action) that takes the common flags too.
    Every command module registers its leaves through this."""
    parser: argparse.ArgumentParser = sub.add_parser(name, parents=[_common()], **kwargs)
    return parser


def said_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reason", help="why: recorded with the action and in the audit")
    p.add_argument("--incident", help="an incident reference (e.g. INC-1234)")


# Command groups in modules of their own (``broker/cli/<name>.py``, each with
# ``register(sub)``), in the order ``--help`` lists them. They import this module for
# ``command``, ``Client``, ``table``, ``Listing``, ``CtlError`` and the exit codes, so this
# module names them instead of importing them (import-linter forbids the cycle).
COMMAND_MODULES = ("ctl_revoke", "ctl_listings", "ctl_locks", "ctl_audit")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brokerctl", description="Admin CLI of the credential broker")
    _connection_flags(p, defaults=True)
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"broker.cli.{name}").register(sub)

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


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: command modules import
    # broker.cli.ctl, and its CtlError and Listing must be the ones main() knows.
    from broker.cli.ctl import main as _main

    sys.exit(_main())

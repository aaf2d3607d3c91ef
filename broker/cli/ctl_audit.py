"""``brokerctl audit``: the audit trail. ``verify`` recomputes the chain on the broker and
names each finding with its seq; exit 0 only when everything holds, 8 (``EXIT_TAMPERED``)
when not.

The group is made by ``audit_group``; each leaf is added by its own function
(``add_verify``), so other leaves (list, tail, export) join the same group beside it."""

from __future__ import annotations

import argparse
from typing import Any

from broker.cli.ctl import EXIT_OK, EXIT_TAMPERED, Client, command, table


def audit_group(sub: Any) -> Any:
    """The ``audit`` group's subparsers action, for its leaves."""
    audit = sub.add_parser("audit", help="the audit trail: verify that it was not altered")
    return audit.add_subparsers(dest="audit_command", required=True)


def register(sub: Any) -> None:
    asub = audit_group(sub)
    add_verify(asub)


def add_verify(asub: Any) -> None:
    v = command(
        asub,
        "verify",
        help="recompute the audit chain: every link, checkpoint and signature",
    )
    v.add_argument(
        "--from",
        dest="from_seq",
        type=_seq,
        default=None,
        metavar="SEQ",
        help="start at this sequence number (default: the first event)",
    )
    v.set_defaults(run=cmd_verify, show=show_verify, verdict=verify_verdict)


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a sequence number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("a sequence number is 1 or more")
    return value


def cmd_verify(c: Client, args: argparse.Namespace) -> Any:
    body = {"from": args.from_seq} if args.from_seq is not None else {}
    return c.call("POST", "/v1/admin/audit/verify", body=body)


def verify_verdict(report: Any) -> int:
    return EXIT_OK if report.get("ok") else EXIT_TAMPERED


def show_verify(report: Any) -> str:
    span = (
        f"seq {report['from_seq']}..{report['last_seq']}"
        if report.get("last_seq") is not None
        else f"from seq {report['from_seq']}: no events"
    )
    cps = f"{report['checkpoints']} checkpoint(s)"
    if report.get("last_checkpoint_seq") is not None:
        cps += f", the last at seq {report['last_checkpoint_seq']}"
    lines = [f"{span}: {report['events']} event(s), {cps}"]
    if report["ok"]:
        lines.append("chain OK: every link and checkpoint holds")
    else:
        lines.append(f"chain BROKEN: first bad seq {report['first_bad_seq']}")
        lines.append(table(report["findings"], ["seq", "kind", "message"]))
        if report.get("findings_omitted"):
            lines.append(f"... and {report['findings_omitted']} more finding(s) not listed")
    lines.extend(f"note: {n}" for n in report.get("notices", []))
    return "\n".join(lines)

"""``brokerctl audit``: the audit trail. ``verify`` recomputes the chain on the broker and
names each finding with its seq (``--checkpoints``: also against the checkpoint lines
the operator collected from every replica, not only the answering replica's file); exit 0
only when everything holds, 8 (``EXIT_TAMPERED``) when not, 5 (``EXIT_UNAVAILABLE``) when
it holds as far as it could be checked but some signature could not be (Vault
unreachable, the key rotated just now). ``list`` and ``tail`` show events by the
selectors leases take (plus lease, action, actor and since); ``export`` writes them as
JSON lines or OCSF records for a SIEM. ``tail --follow`` and ``export --follow`` poll for
new events until ``--timeout`` or Ctrl-C.

The group is made by ``audit_group``; each leaf is added by its own function
(``add_verify``), so other leaves (list, tail, export) join the same group beside it."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker import __version__
from broker.audit.collected import MAX_CHECKPOINTS, NotACheckpoint, gather
from broker.audit.ocsf import to_ocsf
from broker.cli.ctlbase import (
    EXIT_OK,
    EXIT_TAMPERED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Client,
    CtlError,
    command,
    moment,
    table,
)


def audit_group(sub: Any) -> Any:
    """The ``audit`` group's subparsers action, for its leaves."""
    audit = sub.add_parser("audit", help="the audit trail: verify that it was not altered")
    return audit.add_subparsers(dest="audit_command", required=True)


def register(sub: Any) -> None:
    asub = audit_group(sub)
    add_verify(asub)
    add_list(asub)
    add_tail(asub)
    add_export(asub)


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
    v.add_argument(
        "--checkpoints",
        action="append",
        default=[],
        metavar="FILE",
        help="checkpoint lines you collected (every replica's checkpoint file, or its "
        "audit.checkpoint log lines), held against the chain too; repeatable; - reads stdin",
    )
    v.set_defaults(run=cmd_verify, show=show_verify, exit_code=verify_verdict)


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a sequence number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("a sequence number is 1 or more")
    return value


def cmd_verify(c: Client, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"from": args.from_seq} if args.from_seq is not None else {}
    if args.checkpoints:
        body["checkpoints"] = collected_lines(args.checkpoints, args.from_seq or 1)
    return c.call("POST", "/v1/admin/audit/verify", body=body)


def collected_lines(names: list[str], from_seq: int) -> list[str]:
    """The lines of the ``--checkpoints`` files to send: each distinct checkpoint once (a
    checkpoint in several files, or in a file and the log, is one), those before
    ``from_seq`` left out; a line that is not a checkpoint is a usage error naming it."""
    sources = []
    for name in names:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise CtlError(f"--checkpoints {name}: {why}", EXIT_USAGE) from None
        sources.append(("stdin" if name == "-" else name, text))
    try:
        lines = gather(sources, from_seq=from_seq)
    except NotACheckpoint as exc:
        raise CtlError(f"--checkpoints: {exc}", EXIT_USAGE) from None
    if len(lines) > MAX_CHECKPOINTS:
        raise CtlError(
            f"--checkpoints: {len(lines)} distinct checkpoints, at most {MAX_CHECKPOINTS} in "
            "one verification: verify a later stretch with --from SEQ",
            EXIT_USAGE,
        )
    return lines


def verify_verdict(report: Any) -> int:
    if report.get("ok"):
        return EXIT_OK
    return EXIT_TAMPERED if report.get("tampered", True) else EXIT_UNAVAILABLE


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
    elif not report.get("tampered", True):
        lines.append(
            "chain NOT FULLY CHECKED: no sign of tampering, but some checkpoint signatures "
            "could not be checked (Vault unreachable, or its key rotated just now): run again"
        )
        lines.append(table(report["findings"], ["seq", "kind", "message"]))
    else:
        lines.append(f"chain BROKEN: first bad seq {report['first_bad_seq']}")
        lines.append(table(report["findings"], ["seq", "kind", "message"]))
        if report.get("findings_omitted"):
            lines.append(f"... and {report['findings_omitted']} more finding(s) not listed")
    lines.extend(f"note: {n}" for n in report.get("notices", []))
    return "\n".join(lines)


# -- list, tail, export ------------------------------------------------------------------

EVENT_COLUMNS = ["seq", "at", "actor", "action", "instance_id", "lease_id", "outcome", "reason"]
SELECTORS = ("instance", "lease", "workload", "role", "action", "actor")
PAGE = 1000
_AGO = re.compile(r"^(\d+)([smhd])\Z")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(text: str) -> str:
    """--since (``ctlbase.moment``): a time, or a duration ago (30m, 2h, 7d)."""
    try:
        at = moment(text, datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("expected 1 or more")
    return value


def _selectors(p: argparse.ArgumentParser) -> None:
    for name in SELECTORS:
        metavar = "LEASE_ID" if name == "lease" else None
        p.add_argument(f"--{name}", metavar=metavar)
    p.add_argument("--since", type=_since, help="events at or after a time, or a duration ago")


def _follow_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument(
        "--interval", type=float, default=1.0, help="seconds between polls with --follow"
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="stop following after this many seconds"
    )


def _query(args: argparse.Namespace, **more: Any) -> dict[str, Any]:
    q = {name: getattr(args, name, None) for name in SELECTORS}
    q["since"] = getattr(args, "since", None)
    q.update(more)
    return q


def add_list(asub: Any) -> None:
    p = command(asub, "list", help="audit events by selector, oldest first")
    _selectors(p)
    p.add_argument("--after", type=int, default=0, metavar="SEQ", help="events after this seq")
    p.add_argument("--limit", type=_count, default=100, help="at most this many (default 100)")
    p.set_defaults(run=cmd_list, show=lambda rows: table(rows, EVENT_COLUMNS))


def cmd_list(c: Client, args: argparse.Namespace) -> Any:
    events: list[dict[str, Any]] = []
    after: int | None = args.after
    while after is not None and len(events) < args.limit:
        want = min(args.limit - len(events), PAGE)
        page = c.call("GET", "/v1/admin/audit/events", _query(args, after=after, limit=want))
        events += page["events"]
        after = page["next"]
    if after is not None:
        print(
            f"brokerctl: showing the first {len(events)} events; more match: "
            f"continue with --after {after} (or raise --limit)",
            file=sys.stderr,
        )
    return events


def add_tail(asub: Any) -> None:
    p = command(asub, "tail", help="the newest audit events; --follow for new ones")
    _selectors(p)
    p.add_argument("-n", "--lines", type=_count, default=20, help="how many (default 20)")
    _follow_flags(p)
    p.set_defaults(run=cmd_tail, show=lambda rows: table(rows, EVENT_COLUMNS))


def _line(event: dict[str, Any]) -> str:
    return "  ".join("" if event.get(col) is None else str(event.get(col)) for col in EVENT_COLUMNS)


def _emit(args: argparse.Namespace, event: dict[str, Any]) -> None:
    if getattr(args, "format", None) == "ocsf":
        out = json.dumps(to_ocsf(event, version=__version__), separators=(",", ":"))
    elif getattr(args, "format", None) == "jsonl" or args.output in ("json", "jsonl"):
        out = json.dumps(event, separators=(",", ":"))
    else:
        out = _line(event)
    print(out, flush=True)


def _follow(c: Client, args: argparse.Namespace, after: int, query: dict[str, Any]) -> None:
    """Poll for events after ``after`` matching ``query`` and print them, until --timeout
    or Ctrl-C."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        while deadline is None or time.monotonic() < deadline:
            page = c.call("GET", "/v1/admin/audit/events", {**query, "after": after, "limit": PAGE})
            for event in page["events"]:
                _emit(args, event)
                after = event["seq"]
            if page["next"] is None:
                pause = args.interval
                if deadline is not None:
                    pause = min(pause, max(0.0, deadline - time.monotonic()))
                time.sleep(pause)
    except KeyboardInterrupt:
        pass


def cmd_tail(c: Client, args: argparse.Namespace) -> Any:
    page = c.call(
        "GET", "/v1/admin/audit/events", _query(args, limit=min(args.lines, PAGE), newest="true")
    )
    events: list[dict[str, Any]] = page["events"]
    if not args.follow:
        return events
    if args.output == "table":
        print("  ".join(c.upper() for c in EVENT_COLUMNS), flush=True)
    for event in events:
        _emit(args, event)
    _follow(c, args, events[-1]["seq"] if events else 0, _query(args))
    args.streamed = True
    return None


def add_export(asub: Any) -> None:
    p = command(
        asub, "export", help="every event as JSON lines or OCSF records (one per line), for a SIEM"
    )
    p.add_argument("--format", choices=["jsonl", "ocsf"], default="jsonl")
    p.add_argument(
        "--since", type=_count, default=1, metavar="SEQ", help="from this seq (default: the first)"
    )
    _follow_flags(p)
    p.set_defaults(run=cmd_export, show=lambda _: "")


def cmd_export(c: Client, args: argparse.Namespace) -> Any:
    after = args.since - 1
    # Bounded: each page moves ``after`` forward; the chain is finite when not following.
    while True:
        page = c.call("GET", "/v1/admin/audit/events", {"after": after, "limit": PAGE})
        for event in page["events"]:
            _emit(args, event)
            after = event["seq"]
        if page["next"] is None:
            break
    if args.follow:
        _follow(c, args, after, {})
    args.streamed = True
    return None

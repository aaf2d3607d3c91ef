"""The plan of every statement the broker runs on a PostgreSQL database, nested ones (inside
a PL/pgSQL function, a foreign-key trigger) included, from PostgreSQL's own ``auto_explain``.

The settings are made the database's own (``ALTER DATABASE ... SET``), so every connection
to it loads ``auto_explain`` at its start, whichever pool opened it (SQLAlchemy's engine,
or a raw ``asyncpg.create_pool``), with no hook in the broker's code. ``auto_explain`` sends
each plan to the client as a NOTICE; ``PlanCapture.every_connection`` adds a listener to
every asyncpg connection opened while it is active.

``enable_seqscan = off`` makes the planner take an index whenever one can serve the
statement, however small the table is in the test: a ``Seq Scan`` that remains means no
index can, which is what a test on an empty database can honestly say about a full one.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg

# Superuser-only settings (``session_preload_libraries`` and auto_explain's own): the
# database is the test's, and the test connects as ``postgres``.
EXPLAIN_EVERY_STATEMENT = {
    "session_preload_libraries": "auto_explain",
    "auto_explain.log_min_duration": "0",
    "auto_explain.log_nested_statements": "on",
    "auto_explain.log_level": "notice",
    "auto_explain.log_format": "json",
    # Run, so each scan node says how many rows it read (returned plus filtered out);
    # without per-node timing, which would only cost.
    "auto_explain.log_analyze": "on",
    "auto_explain.log_timing": "off",
    "enable_seqscan": "off",
    # A disabled seq scan costs 1e10, far above jit_above_cost: compiling it would cost
    # tens of milliseconds per statement and tell nothing.
    "jit": "off",
}

_PLAN_MARK = "plan:\n"


@dataclass(frozen=True)
class Plan:
    step: str  # what the test was doing (``PlanCapture.step``)
    query: str  # the statement as PostgreSQL ran it (a nested one's own text)
    plan: dict[str, Any]  # auto_explain's JSON "Plan"

    def text(self) -> str:
        return json.dumps(self.plan, indent=1)


@dataclass(frozen=True)
class FullScan:
    """A scan of ``table`` that no index condition bounds, or whose index condition let it
    read more rows than ``PlanCapture.full_scans`` allows."""

    step: str
    table: str
    node: str  # "Seq Scan", "Index Scan (no Index Cond)", "Index Scan read 2000 rows"...
    query: str
    plan: str


def explain_every_statement(admin_url: str, database: str) -> None:
    """Make ``database``'s every new connection log the plan of each statement it runs."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name, value in EXPLAIN_EVERY_STATEMENT.items():
            # Names and values are this module's constants, never input.
            conn.execute(f"ALTER DATABASE \"{database}\" SET {name} = '{value}'")


def partial_indexes(url: str) -> set[str]:
    """Names of the partial indexes in ``url``'s public schema: a scan of one with no index
    condition reads only the rows its predicate keeps (the predicate is the bound)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE i.indpred IS NOT NULL AND n.nspname = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


class PlanCapture:
    """Collects auto_explain's notices, each labelled with the ``step`` the test was at.

    A statement's notices arrive before its result and asyncpg hands them to the listener
    (``call_soon``) before it wakes the awaiting task, so a plan is always labelled with the
    step that ran it."""

    def __init__(self) -> None:
        self.plans: list[Plan] = []
        self.step = "(no step)"
        self.unparsed: list[str] = []
        # The database's partial indexes (``partial_indexes``), set by the test.
        self.partial: set[str] = set()

    def listen(self, conn: asyncpg.Connection) -> None:
        """Capture one connection's plans (e.g. from an ``asyncpg.create_pool(init=...)``)."""
        conn.add_log_listener(self._on_notice)

    @contextmanager
    def every_connection(self) -> Iterator[PlanCapture]:
        """Listen on every asyncpg connection opened meanwhile, by whatever pool."""
        original = asyncpg.connection.Connection.__init__
        capture = self

        def init(self: asyncpg.Connection, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            capture.listen(self)

        asyncpg.connection.Connection.__init__ = init  # type: ignore[method-assign]
        try:
            yield self
        finally:
            asyncpg.connection.Connection.__init__ = original  # type: ignore[method-assign]

    def _on_notice(self, _conn: Any, message: Any) -> None:
        text = str(getattr(message, "message", ""))
        if not text.startswith("duration:") or _PLAN_MARK not in text:
            return
        try:
            doc = json.loads(text.split(_PLAN_MARK, 1)[1])
        except ValueError:
            self.unparsed.append(text[:200])
            return
        self.plans.append(Plan(self.step, doc.get("Query Text", ""), doc["Plan"]))

    def full_scans(self, tables: Collection[str], *, max_rows: int) -> list[FullScan]:
        """Every scan of one of ``tables`` that no index condition bounds, or that read
        more than ``max_rows`` rows (an index condition that does not narrow: a state
        most rows are in, ``IS NOT NULL``)."""
        found = []
        for p in self.plans:
            for node in _nodes(p.plan):
                table = node.get("Relation Name")
                if table not in tables:
                    continue
                kind = _unbounded(node, self.partial)
                if kind is None and rows_read(node) > max_rows:
                    kind = f"{node.get('Node Type')} read {rows_read(node)} rows"
                if kind:
                    found.append(FullScan(p.step, table, kind, p.query, p.text()))
        return found


def rows_read(node: dict[str, Any]) -> int:
    """Rows a scan node took from its table: those it returned and those its filter or
    recheck threw away, over all its loops (auto_explain with ``log_analyze``)."""
    per_loop = (
        node.get("Actual Rows", 0)
        + node.get("Rows Removed by Filter", 0)
        + node.get("Rows Removed by Index Recheck", 0)
    )
    return int(per_loop * node.get("Actual Loops", 1))


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _unbounded(node: dict[str, Any], partial: Collection[str]) -> str | None:
    """Why this scan node reads its whole table, or None. An index scan with no index
    condition walks the whole index (the planner picks one for its order, or because
    seq scans are off): as unbounded as a Seq Scan, unless the index is partial."""
    kind = node.get("Node Type")
    if kind == "Seq Scan":
        return kind
    if kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node:
        if node.get("Index Name") not in partial:
            return f"{kind} (no Index Cond)"
    return None

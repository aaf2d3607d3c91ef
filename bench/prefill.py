"""Fill a bench's PostgreSQL store as a long-running broker's would be, before measuring:
issue 15 asks that PostgreSQL's CPU per exchange stay flat as the store grows.

For ``n`` leases: ``n / 10`` instances (10 leases each, several workloads and issuers; one
in ten still active, the rest terminated, every one with ``last_seen_at`` set as the
sightings flush leaves it) with one instance token each; leases mostly ended (revoked,
expired, released, failed) and 2% active; two audit events per lease, their ``seq``
continuing from ``audit_head``, which is then moved to the last one so the broker's
appends follow them; and ``n / 10`` used token ids (``seen_tokens``) expiring hours
ahead. Set-based SQL (``INSERT … SELECT FROM generate_series``), one statement per table.

The events' ``hash`` and ``prev_hash`` are placeholders (their sequence number in hex),
not a chain: ``audit verify`` fails on such a store, the bench needs only their number and
size. The active leases have no expiry (NULL): OpenBao does not know them, and the
reconciler's amnesia and expiry passes, which take only leases whose expiry is ahead or
past, would settle them during the run (a first 1,000,000 run with their expiry 6 h ahead
counted 17 commits and 32 updated rows per credential in its later phases). No ANALYZE:
the hot path must not depend on fresh planner statistics (autovacuum may still analyze
the tables on its own; the bench reports whether it did).
"""

from __future__ import annotations

import time

import psycopg

PER_INSTANCE = 10
WORKLOADS = ("payments", "orders", "search", "billing", "ledger", "mailer", "reports", "gateway")
ISSUERS = ("dev", "ci", "k8s-east")


def _array(values: tuple[str, ...]) -> str:
    return "ARRAY[" + ",".join(f"'{v}'" for v in values) + "]"


# Instance k: active when k % 10 = 0. Lease k belongs to instance k / 10, position k % 10.
_INSTANCES = f"""
INSERT INTO instances (instance_id, issuer_name, workload, state, created_at, updated_at,
                       terminated_at, last_seen_at, claims)
SELECT 'prefill-' || i,
       ({_array(ISSUERS)})[1 + i %% {len(ISSUERS)}],
       ({_array(WORKLOADS)})[1 + i %% {len(WORKLOADS)}],
       CASE WHEN i %% 10 = 0 THEN 'active' ELSE 'terminated' END,
       c, c + interval '1 hour',
       CASE WHEN i %% 10 = 0 THEN NULL ELSE c + interval '1 hour' END,
       CASE WHEN i %% 10 = 0 THEN now() - (i %% 300) * interval '1 second'
            ELSE c + interval '55 minutes' END,
       json_build_object('instance_id', 'prefill-' || i,
                         'workload', ({_array(WORKLOADS)})[1 + i %% {len(WORKLOADS)}])
FROM generate_series(0, %(instances)s - 1) AS i,
     LATERAL (SELECT now() - interval '1 day' - (i %% 43200) * interval '1 minute' AS c) AS t
"""

_INSTANCE_TOKENS = """
INSERT INTO instance_tokens (accessor, instance_id, created_at, expires_at, revoked_at)
SELECT 'prefill-acc-' || i, 'prefill-' || i, c, c + interval '24 hours',
       CASE WHEN i %% 10 = 0 THEN NULL ELSE c + interval '1 hour' END
FROM generate_series(0, %(instances)s - 1) AS i,
     LATERAL (SELECT now() - interval '1 day' - (i %% 43200) * interval '1 minute' AS c) AS t
"""

_LEASES = f"""
INSERT INTO leases (lease_id, instance_id, workload, role, kind, state, vault_lease_id,
                    token_accessor, renewable, created_at, updated_at, issued_at, expires_at,
                    ended_at, vault_path, credential_ref, revoke_sent_at)
SELECT 'l-' || md5('prefill' || k), 'prefill-' || i, w, r.role, r.kind, s.state,
       CASE WHEN s.state = 'failed' THEN NULL ELSE r.path || '/' || md5('prefill' || k) END,
       'prefill-acc-' || i, r.kind = 'database', c, c + interval '10 minutes', c,
       CASE WHEN s.state = 'active' THEN NULL ELSE c + interval '10 minutes' END,
       CASE WHEN s.state = 'active' THEN NULL ELSE c + interval '10 minutes' END,
       r.path,
       CASE WHEN s.state = 'failed' THEN NULL
            WHEN r.kind = 'pki' THEN json_build_object('serial_number', md5('s' || k))
            ELSE json_build_object('username', 'v-prefill-' || k) END,
       CASE WHEN s.state = 'revoked' THEN c + interval '9 minutes' END
FROM generate_series(0, %(leases)s - 1) AS k,
     LATERAL (SELECT k / 10 AS i, k %% 10 AS j) AS p,
     LATERAL (SELECT ({_array(WORKLOADS)})[1 + i %% {len(WORKLOADS)}] AS w,
                     now() - interval '1 day' - (i %% 43200) * interval '1 minute'
                     + j * interval '1 minute' AS c) AS t,
     LATERAL (SELECT CASE WHEN i %% 2 = 0 THEN 'dev-cert' ELSE 'dev-db' END AS role,
                     CASE WHEN i %% 2 = 0 THEN 'pki' ELSE 'database' END AS kind,
                     CASE WHEN i %% 2 = 0 THEN 'pki/issue/dev-cert'
                          ELSE 'database/creds/dev-db' END AS path) AS r,
     LATERAL (SELECT CASE
                WHEN i %% 10 = 0 AND j >= 8 THEN 'active'
                WHEN i %% 10 = 0 AND j = 7 THEN 'released'
                WHEN i %% 10 = 0 THEN 'expired'
                WHEN j = 9 THEN 'failed'
                WHEN j >= 6 THEN 'expired'
                ELSE 'revoked' END AS state) AS s
"""

# Two events per lease: its issue (or failure) and its end (or, for an active lease, a
# renewal); seq from a temporary sequence started after the head, in whatever order the
# join yields (the chain is not valid anyway).
_EVENTS = """
INSERT INTO audit_events (seq, at, actor, action, instance_id, lease_id, outcome, reason,
                          detail, prev_hash, hash)
SELECT q, l.created_at + (e - 1) * interval '10 minutes',
       CASE WHEN e = 1 OR l.state IN ('active', 'released') THEN 'workload'
            ELSE 'revocation' END,
       CASE WHEN e = 1 AND l.state = 'failed' THEN 'lease.failed'
            WHEN e = 1 THEN 'lease.issued'
            WHEN l.state = 'active' THEN 'lease.renewed'
            WHEN l.state = 'failed' THEN 'instance.token_revoked'
            ELSE 'lease.' || l.state END,
       l.instance_id, l.lease_id, 'ok', NULL,
       json_build_object('workload', l.workload, 'role', l.role, 'kind', l.kind,
                         'vault_lease_id', l.vault_lease_id, 'prefill', true),
       lpad(to_hex(q - 1), 64, '0'), lpad(to_hex(q), 64, '0')
FROM (SELECT l.*, e, nextval('prefill_seq') AS q
      FROM leases AS l CROSS JOIN generate_series(1, 2) AS e
      WHERE l.instance_id LIKE 'prefill-%') AS l
"""

_SEEN_TOKENS = """
INSERT INTO seen_tokens (issuer_name, jti, expires_at)
SELECT 'dev', 'prefill-' || md5('jti' || k),
       now() + interval '2 hours' + k %% 3600 * interval '1 second'
FROM generate_series(0, %(seen)s - 1) AS k
"""


def prefill(url: str, leases: int) -> dict[str, float]:
    """Fill the store at ``url`` (migrated, empty) for ``leases`` leases; the seconds each
    table took, and in all (``total``)."""
    instances = max(1, leases // PER_INSTANCE)
    took: dict[str, float] = {}
    start = time.perf_counter()
    with psycopg.connect(url) as conn:
        head = conn.execute("SELECT seq FROM audit_head WHERE id = 1").fetchone()
        assert head is not None, "audit_head missing: migrate the store first"
        params = {"instances": instances, "leases": leases, "seen": instances}
        for table, sql in (
            ("instances", _INSTANCES),
            ("instance_tokens", _INSTANCE_TOKENS),
            ("leases", _LEASES),
            ("seen_tokens", _SEEN_TOKENS),
        ):
            t0 = time.perf_counter()
            conn.execute(sql, params)
            conn.commit()
            took[table] = time.perf_counter() - t0
        t0 = time.perf_counter()
        conn.execute(f"CREATE TEMPORARY SEQUENCE prefill_seq START {int(head[0]) + 1}")
        conn.execute(_EVENTS)
        last = conn.execute("SELECT max(seq) FROM audit_events").fetchone()
        assert last is not None and last[0] is not None
        conn.execute(
            "UPDATE audit_head SET seq = %(seq)s, hash = lpad(to_hex(%(seq)s::bigint), 64, '0') "
            "WHERE id = 1",
            {"seq": int(last[0])},
        )
        conn.commit()
        took["audit_events"] = time.perf_counter() - t0
    took["total"] = time.perf_counter() - start
    return took


def table_rows(url: str) -> dict[str, int]:
    """Exact row counts of the tables the prefill fills (a count, not the planner's guess)."""
    with psycopg.connect(url) as conn:
        return {
            t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])  # type: ignore[index]
            for t in ("instances", "instance_tokens", "leases", "audit_events", "seen_tokens")
        }


def analyzed(url: str) -> dict[str, str]:
    """When PostgreSQL last analyzed each prefilled table (autovacuum's or anyone's), or
    'never': the bench itself runs no ANALYZE."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT relname, greatest(last_analyze, last_autoanalyze) FROM pg_stat_user_tables "
            "WHERE relname IN ('instances', 'leases', 'audit_events', 'seen_tokens') "
            "ORDER BY relname"
        ).fetchall()
    return {name: (at.strftime("%H:%M:%S") if at else "never") for name, at in rows}

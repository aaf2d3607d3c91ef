"""incident response: the audit chain and its signed checkpoints, locks, instance claims,
the reason and incident of a termination

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 13:30:00.000000
"""

from alembic import op
import sqlalchemy as sa

from broker.leases import chain
from broker.leases.models import UTCDateTime


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("outcome", sa.String(length=16), nullable=False, server_default="ok")
        )
        batch_op.add_column(sa.Column("reason", sa.String(length=200), nullable=True))
        batch_op.add_column(
            sa.Column("prev_hash", sa.String(length=64), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("hash", sa.String(length=64), nullable=False, server_default="")
        )
    # Events written before the chain existed join it, numbered in their order.
    last_seq, last_hash = _chain_existing_events()
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
        batch_op.alter_column("outcome", server_default=None)
        batch_op.alter_column("prev_hash", server_default=None)
        batch_op.alter_column("hash", server_default=None)
        batch_op.create_unique_constraint("uq_audit_events_seq", ["seq"])
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # The head every append locks: after the events chained above.
    op.execute(
        sa.table("audit_head", sa.column("id"), sa.column("seq"), sa.column("hash"))
        .insert()
        .values(id=1, seq=last_seq, hash=last_hash)
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_AUDIT_APPEND)
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("signer", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=255), nullable=False),
        sa.Column("signature", sa.String(length=1024), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_table(
        "locks",
        sa.Column("lock_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.Column("claim", sa.String(length=128), nullable=True),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("incident", sa.String(length=128), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("removed_at", UTCDateTime(), nullable=True),
        sa.Column("removed_by", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("lock_id"),
    )
    op.create_index("ix_locks_removed", "locks", ["removed_at"], unique=False)
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claims", sa.JSON(), nullable=True))
    # A bulk termination selects instances by workload and issuer.
    op.create_index("ix_instances_workload", "instances", ["workload"], unique=False)
    op.create_index("ix_instances_issuer", "instances", ["issuer_name"], unique=False)
    with op.batch_alter_table("revocation_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reason", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("incident", sa.String(length=128), nullable=True))
    # Listings page by (created_at, id): ``brokerctl instances list`` and ``jobs list``.
    op.create_index("ix_instances_created", "instances", ["created_at", "instance_id"])
    op.create_index("ix_jobs_created", "revocation_jobs", ["created_at", "job_id"])


# The chain's append on PostgreSQL, in one round trip (``sql.common.flush_audit``): lock the
# head, link each event (its canonical JSON up to its seq is given, ``chain.unsequenced``;
# the seq is assigned here), insert them, move the head. The head row stays locked until
# the transaction commits; doing all of it server-side keeps that short.
_AUDIT_APPEND = """
CREATE OR REPLACE FUNCTION audit_append(
    p_tag bytea, p_at timestamptz, p_actor text[], p_action text[], p_instance text[],
    p_lease text[], p_outcome text[], p_reason text[], p_detail text[], p_unsequenced bytea[]
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    s bigint;
    h text;
    d text;
BEGIN
    SELECT seq, hash INTO s, h FROM audit_head WHERE id = 1 FOR UPDATE;
    FOR i IN 1 .. coalesce(array_length(p_unsequenced, 1), 0) LOOP
        s := s + 1;
        d := encode(sha256(p_tag || decode(h, 'hex') || p_unsequenced[i]
                           || convert_to(',"seq":' || s::text || '}', 'UTF8')), 'hex');
        INSERT INTO audit_events (seq, at, actor, action, instance_id, lease_id, outcome,
                                  reason, detail, prev_hash, hash)
        VALUES (s, p_at, p_actor[i], p_action[i], p_instance[i], p_lease[i], p_outcome[i],
                p_reason[i], p_detail[i]::json, h, d);
        h := d;
    END LOOP;
    UPDATE audit_head SET seq = s, hash = h WHERE id = 1;
    RETURN s;
END
$$
"""


# The audit table as this revision knows it (not the model, which follows later revisions).
_EVENTS = sa.table(
    "audit_events",
    sa.column("id", sa.BigInteger()),
    sa.column("seq", sa.BigInteger()),
    sa.column("at", UTCDateTime()),
    sa.column("actor", sa.String()),
    sa.column("action", sa.String()),
    sa.column("instance_id", sa.String()),
    sa.column("lease_id", sa.String()),
    sa.column("outcome", sa.String()),
    sa.column("reason", sa.String()),
    sa.column("detail", sa.JSON()),
    sa.column("prev_hash", sa.String()),
    sa.column("hash", sa.String()),
)
_PAGE = 1000


def _chain_existing_events() -> tuple[int, str]:
    """Link the events written before the chain existed, in the order they were written
    (id order, renumbered 1..n: ids can skip), with the same arithmetic as every later
    append, so ``audit verify`` checks them like any other. Page by page. Returns the
    head: (last seq, its hash)."""
    bind = op.get_bind()
    seq, prev, after = 0, chain.GENESIS, None
    while True:  # ends: every page moves ``after`` forward, and the table is finite
        query = sa.select(_EVENTS).order_by(_EVENTS.c.id).limit(_PAGE)
        if after is not None:
            query = query.where(_EVENTS.c.id > after)
        rows = bind.execute(query).all()
        if not rows:
            return seq, prev
        updates = []
        for row in rows:
            seq += 1
            document = chain.event_document(
                seq=seq,
                at=row.at,
                actor=row.actor,
                action=row.action,
                instance_id=row.instance_id,
                lease_id=row.lease_id,
                outcome=row.outcome or "ok",
                reason=row.reason,
                detail=row.detail or {},
            )
            digest = chain.link_hash(prev, document)
            updates.append(
                {"b_id": row.id, "b_seq": seq, "b_outcome": document["outcome"],
                 "b_prev": prev, "b_hash": digest}
            )
            prev = digest
        bind.execute(
            _EVENTS.update()
            .where(_EVENTS.c.id == sa.bindparam("b_id"))
            .values(
                seq=sa.bindparam("b_seq"),
                outcome=sa.bindparam("b_outcome"),
                prev_hash=sa.bindparam("b_prev"),
                hash=sa.bindparam("b_hash"),
            ),
            updates,
        )
        after = rows[-1].id


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audit_append")
    op.drop_index("ix_jobs_created", table_name="revocation_jobs")
    op.drop_index("ix_instances_created", table_name="instances")
    with op.batch_alter_table("revocation_jobs", schema=None) as batch_op:
        batch_op.drop_column("incident")
        batch_op.drop_column("reason")
    op.drop_index("ix_instances_issuer", table_name="instances")
    op.drop_index("ix_instances_workload", table_name="instances")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("claims")
    op.drop_index("ix_locks_removed", table_name="locks")
    op.drop_table("locks")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_head")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_constraint("uq_audit_events_seq", type_="unique")
        batch_op.drop_column("hash")
        batch_op.drop_column("prev_hash")
        batch_op.drop_column("reason")
        batch_op.drop_column("outcome")
        batch_op.drop_column("seq")

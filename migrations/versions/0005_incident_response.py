"""incident response: the audit chain and its signed checkpoints, locks, instance claims,
the reason and incident of a termination

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 13:30:00.000000
"""

from alembic import op
import sqlalchemy as sa

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
    # Events written before the chain existed: numbered in their order.
    op.execute("UPDATE audit_events SET seq = id")
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
    # The head every append locks. Events from before the chain are numbered but not
    # linked: the chain starts after them (``audit verify`` reports where it starts).
    op.execute(
        "INSERT INTO audit_head (id, seq, hash) "
        "SELECT 1, COALESCE(MAX(seq), 0), '" + "0" * 64 + "' FROM audit_events"
    )
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


def downgrade() -> None:
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

"""reconciliation and liveness: the Vault path of each lease, instances' last sighting

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 21:40:00.000000
"""

from alembic import op
import sqlalchemy as sa

from broker.leases.models import UTCDateTime


revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vault_path", sa.String(length=512), nullable=True))
        batch_op.create_index("ix_leases_state_expires", ["state", "expires_at"], unique=False)
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_seen_at", UTCDateTime(), nullable=True))
        batch_op.create_index("ix_instances_state_seen", ["state", "last_seen_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index("ix_instances_state_seen")
        batch_op.drop_column("last_seen_at")
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_index("ix_leases_state_expires")
        batch_op.drop_column("vault_path")

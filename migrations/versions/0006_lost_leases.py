"""lost leases: the credential's non-secret identifier, and when the broker first sent a
revocation covering each lease (so that Vault not knowing a lease afterwards is told
apart from Vault forgetting it)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 16:15:00.000000
"""

from alembic import op
import sqlalchemy as sa

from broker.leases.models import UTCDateTime


revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("credential_ref", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("revoke_sent_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_column("revoke_sent_at")
        batch_op.drop_column("credential_ref")

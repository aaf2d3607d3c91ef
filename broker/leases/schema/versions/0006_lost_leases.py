"""lost leases: the credential's non-secret identifier, and when the broker first sent a
revocation covering each lease (so that Vault not knowing a lease afterwards is told
apart from Vault forgetting it)

Leases whose revocation code before this revision may already have sent (a lease left
``revoking`` by a lease-limit replacement, a live lease of an instance whose revocation job
is not done, a lease whose instance token was revoked) get ``revoke_sent_at`` now: without
it, Vault not knowing them after the upgrade would read as ``lost``.

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
    op.execute(
        sa.text(
            """
            UPDATE leases SET revoke_sent_at = updated_at
            WHERE revoke_sent_at IS NULL
              AND state IN ('issuing', 'active', 'revoking')
              AND (
                state = 'revoking'
                OR EXISTS (
                  SELECT 1 FROM revocation_jobs j
                  WHERE j.instance_id = leases.instance_id AND j.state <> 'done'
                )
                OR EXISTS (
                  SELECT 1 FROM instance_tokens t
                  WHERE t.accessor = leases.token_accessor AND t.revoked_at IS NOT NULL
                )
              )
            """
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_column("revoke_sent_at")
        batch_op.drop_column("credential_ref")

"""replay record of used token ids

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 22:11:01.279525
"""
from alembic import op
import sqlalchemy as sa
import broker.leases.models


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('seen_tokens',
    sa.Column('issuer_name', sa.String(length=64), nullable=False),
    sa.Column('jti', sa.String(length=255), nullable=False),
    sa.Column('expires_at', broker.leases.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('issuer_name', 'jti')
    )
    with op.batch_alter_table('seen_tokens', schema=None) as batch_op:
        batch_op.create_index('ix_seen_tokens_expires', ['expires_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('seen_tokens', schema=None) as batch_op:
        batch_op.drop_index('ix_seen_tokens_expires')

    op.drop_table('seen_tokens')

"""resolved leases: an operator's marker on a lost lease they ended by hand (when, who,
why, which incident); the state ``resolved`` itself needs no change to the schema

Downgrading puts every ``resolved`` lease back to ``lost`` (the code before this revision
knows no ``resolved``): it is listed as a problem again, never hidden.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 08:30:00.000000
"""

from alembic import op
import sqlalchemy as sa

from broker.leases.models import UTCDateTime


revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.add_column(sa.Column("resolved_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("resolved_by", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("resolved_reason", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("resolved_incident", sa.String(length=128), nullable=True))


def downgrade() -> None:
    op.execute(sa.text("UPDATE leases SET state = 'lost' WHERE state = 'resolved'"))
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_column("resolved_incident")
        batch_op.drop_column("resolved_reason")
        batch_op.drop_column("resolved_by")
        batch_op.drop_column("resolved_at")

"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-26 21:40:44.722049
"""
from alembic import op
import sqlalchemy as sa
import broker.leases.models


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('at', broker.leases.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('instance_id', sa.String(length=255), nullable=True),
    sa.Column('lease_id', sa.String(length=40), nullable=True),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index('ix_audit_instance', ['instance_id'], unique=False)

    op.create_table('instances',
    sa.Column('instance_id', sa.String(length=255), nullable=False),
    sa.Column('issuer_name', sa.String(length=64), nullable=True),
    sa.Column('workload', sa.String(length=255), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', broker.leases.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', broker.leases.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('terminated_at', broker.leases.models.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('instance_id')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instances_state'), ['state'], unique=False)

    op.create_table('instance_tokens',
    sa.Column('accessor', sa.String(length=128), nullable=False),
    sa.Column('instance_id', sa.String(length=255), nullable=False),
    sa.Column('created_at', broker.leases.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', broker.leases.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', broker.leases.models.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.instance_id'], ),
    sa.PrimaryKeyConstraint('accessor')
    )
    with op.batch_alter_table('instance_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instance_tokens_instance_id'), ['instance_id'], unique=False)

    op.create_table('leases',
    sa.Column('lease_id', sa.String(length=40), nullable=False),
    sa.Column('instance_id', sa.String(length=255), nullable=False),
    sa.Column('workload', sa.String(length=255), nullable=False),
    sa.Column('role', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('vault_lease_id', sa.String(length=512), nullable=True),
    sa.Column('token_accessor', sa.String(length=128), nullable=True),
    sa.Column('renewable', sa.Boolean(), nullable=False),
    sa.Column('created_at', broker.leases.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', broker.leases.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('issued_at', broker.leases.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('expires_at', broker.leases.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('ended_at', broker.leases.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.instance_id'], ),
    sa.PrimaryKeyConstraint('lease_id'),
    sa.UniqueConstraint('vault_lease_id')
    )
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index('ix_leases_instance_state', ['instance_id', 'state'], unique=False)
        batch_op.create_index('ix_leases_role', ['role'], unique=False)
        batch_op.create_index('ix_leases_state_created', ['state', 'created_at'], unique=False)
        batch_op.create_index('ix_leases_workload', ['workload'], unique=False)

    op.create_table('revocation_jobs',
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('instance_id', sa.String(length=255), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', broker.leases.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('claimed_by', sa.String(length=64), nullable=True),
    sa.Column('claimed_until', broker.leases.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.String(length=255), nullable=True),
    sa.Column('requested_by', sa.String(length=64), nullable=False),
    sa.Column('created_at', broker.leases.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', broker.leases.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('completed_at', broker.leases.models.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['instance_id'], ['instances.instance_id'], ),
    sa.PrimaryKeyConstraint('job_id'),
    sa.UniqueConstraint('instance_id')
    )
    with op.batch_alter_table('revocation_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_state_next', ['state', 'next_attempt_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('revocation_jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_state_next')

    op.drop_table('revocation_jobs')
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_index('ix_leases_workload')
        batch_op.drop_index('ix_leases_state_created')
        batch_op.drop_index('ix_leases_role')
        batch_op.drop_index('ix_leases_instance_state')

    op.drop_table('leases')
    with op.batch_alter_table('instance_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instance_tokens_instance_id'))

    op.drop_table('instance_tokens')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instances_state'))

    op.drop_table('instances')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_instance')

    op.drop_table('audit_events')

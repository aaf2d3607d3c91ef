"""the reconciler's indexes: its pass reads what it is about, not the store's history

- ``ix_leases_vault_path``: the Vault paths leases were given under, read one probe per
  distinct path (a loose index scan) instead of every lease that ever had a Vault lease;
- ``ix_leases_unsent_live_path``: the live leases with no revocation sent under one Vault
  path, in the order the reconciler pages through them, so a page reads one page;
- ``ix_instances_active_unseen``: an issuer's active instances by when each was last seen
  (or created), so the unseen are read and not every active instance.

All three are partial (an expression, the last one): their predicates are the queries'
own conditions, as literals (``broker.leases.models``). Nothing else changes: the queries
give the same answers with or without them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 09:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def _partial(where: str) -> dict[str, object]:
    return {"postgresql_where": sa.text(where), "sqlite_where": sa.text(where)}


def upgrade() -> None:
    op.create_index(
        "ix_leases_vault_path",
        "leases",
        ["vault_path"],
        **_partial("vault_lease_id IS NOT NULL"),
    )
    op.create_index(
        "ix_leases_unsent_live_path",
        "leases",
        ["vault_path", "created_at", "lease_id"],
        **_partial("state IN ('active', 'revoking') AND revoke_sent_at IS NULL"),
    )
    op.create_index(
        "ix_instances_active_unseen",
        "instances",
        ["issuer_name", sa.text("coalesce(last_seen_at, created_at)")],
        **_partial("state = 'active'"),
    )


def downgrade() -> None:
    op.drop_index("ix_instances_active_unseen", table_name="instances")
    op.drop_index("ix_leases_unsent_live_path", table_name="leases")
    op.drop_index("ix_leases_vault_path", table_name="leases")

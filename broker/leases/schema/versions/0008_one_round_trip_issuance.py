"""one round trip per issuance step on PostgreSQL: ``broker_begin_issue``,
``broker_record_token`` and ``broker_complete_issue`` do the common case of each store
step server-side, and the composite index the lease limit's count of live leases runs on

The functions serve only the common case: an active instance its own issuer and workload
hold (or one seen for the first time), no active lock anywhere, room under the lease
limit, a token id not used before. Anything else raises SQLSTATE ``BR001`` before the
statement commits, so nothing is written, and the caller runs the general path
(``broker.leases.sql.issuance``), which says precisely why it refuses or does the rest
(superseding leases, a lock's refusal). Both take the instance's advisory lock the general
path takes (``broker.leases.sql.common.lock_instance``), never a shared row lock, which
PostgreSQL would turn into MultiXacts on an instance's busy row.

SQLite has none of the functions: its one writer at a time needs no round trip saved.

Upgrading: replicas before this revision lock a terminated instance's row only, and the
ones after it an advisory lock only, so the two do not exclude each other. Stop the old
replicas before the new ones serve (a termination by an old replica while a new one
issues could leave the job's first pass without the new row: the completion, which reads
the instance again, withholds the credential, and the job cannot finish while the row is
live, but the strict order holds only with one version serving). The index is built
without CONCURRENTLY: about a second per million leases here, during which issuance
waits.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 14:00:00.000000
"""

from alembic import op


revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# The class half of an instance's advisory lock key (the other half: hashtext of its id);
# ``broker.leases.sql.common.INSTANCE_LOCK_CLASS`` is the same number.
_CLASS = 1_386_218_069

# Active locks are few (an incident's): any at all sends issuance to the general path,
# which matches them against the request.
_ANY_LOCK = """
    IF EXISTS (SELECT 1 FROM locks WHERE removed_at IS NULL
               AND (expires_at IS NULL OR expires_at > p_now)) THEN
        RAISE EXCEPTION 'an active lock: the general path decides' USING ERRCODE = 'BR001';
    END IF;
"""

_BEGIN_ISSUE = """
CREATE OR REPLACE FUNCTION broker_begin_issue(
    p_lease_id text, p_instance text, p_issuer text, p_workload text, p_role text,
    p_kind text, p_jti text, p_jti_expires timestamptz, p_max_leases integer,
    p_counted text[], p_external_ref text, p_vault_path text, p_claims text,
    p_now timestamptz
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    st text;
    own text;
    own_workload text;
    live integer;
BEGIN
    @ANY_LOCK@
    -- The lock first, as everywhere: a termination of an id never seen holds it while
    -- it writes the row, and an insert of ours before the lock would wait on it while it
    -- waits on us. Its own statement, so the read below has a snapshot from after it.
    IF p_max_leases IS NULL THEN
        PERFORM pg_advisory_xact_lock_shared(@CLASS@, hashtext(p_instance));
    ELSE
        PERFORM pg_advisory_xact_lock(@CLASS@, hashtext(p_instance));
    END IF;
    -- Looked for before the insert: an insert that meets the row waits for whoever is
    -- updating it (a sighting); a plain read does not.
    IF NOT EXISTS (SELECT 1 FROM instances WHERE instance_id = p_instance) THEN
        INSERT INTO instances (instance_id, issuer_name, workload, state, created_at,
                               updated_at, last_seen_at, claims)
        VALUES (p_instance, p_issuer, p_workload, 'active', p_now, p_now, p_now,
                p_claims::json)
        ON CONFLICT (instance_id) DO NOTHING;
    END IF;
    SELECT state, issuer_name, workload INTO st, own, own_workload
    FROM instances WHERE instance_id = p_instance;
    IF st IS DISTINCT FROM 'active' OR own IS DISTINCT FROM p_issuer
       OR own_workload IS DISTINCT FROM p_workload THEN
        RAISE EXCEPTION 'not an active instance of this issuer and workload'
            USING ERRCODE = 'BR001';
    END IF;
    IF p_jti IS NOT NULL THEN
        INSERT INTO seen_tokens (issuer_name, jti, expires_at)
        VALUES (p_issuer, p_jti, p_jti_expires) ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'a token id used before' USING ERRCODE = 'BR001';
        END IF;
    END IF;
    IF p_max_leases IS NOT NULL THEN
        SELECT count(*) INTO live FROM leases
        WHERE instance_id = p_instance AND role = p_role AND state = ANY (p_counted)
          AND (expires_at IS NULL OR expires_at > p_now);
        IF live + 1 > p_max_leases THEN
            RAISE EXCEPTION 'at the lease limit' USING ERRCODE = 'BR001';
        END IF;
    END IF;
    INSERT INTO leases (lease_id, instance_id, workload, role, kind, state, renewable,
                        created_at, updated_at, external_ref, vault_path)
    VALUES (p_lease_id, p_instance, p_workload, p_role, p_kind, 'issuing', false,
            p_now, p_now, p_external_ref::json, p_vault_path);
END
$$
"""

_COMPLETE_ISSUE = """
CREATE OR REPLACE FUNCTION broker_complete_issue(
    p_lease_id text, p_instance text, p_issuer text, p_workload text, p_role text,
    p_kind text, p_state text, p_vault_lease_id text,
    p_accessor text, p_renewable boolean, p_issued_at timestamptz, p_expires_at timestamptz,
    p_stale timestamptz, p_ref text, p_now timestamptz,
    p_tag bytea, p_at timestamptz, p_actor text, p_action text, p_detail text,
    p_unsequenced bytea
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    st text;
    own text;
BEGIN
    @ANY_LOCK@
    UPDATE leases SET state = p_state, vault_lease_id = p_vault_lease_id,
        token_accessor = p_accessor, renewable = p_renewable, issued_at = p_issued_at,
        expires_at = p_expires_at, updated_at = p_now, credential_ref = p_ref::json
    WHERE lease_id = p_lease_id AND instance_id = p_instance AND workload = p_workload
      AND role = p_role AND kind = p_kind AND state = 'issuing' AND created_at > p_stale;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the issuing row changed' USING ERRCODE = 'BR001';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(@CLASS@, hashtext(p_instance));
    SELECT state, issuer_name INTO st, own FROM instances WHERE instance_id = p_instance;
    -- A credential withheld (its instance terminated meanwhile) is the general path's:
    -- its event says so.
    IF st IS DISTINCT FROM 'active' OR own IS DISTINCT FROM p_issuer THEN
        RAISE EXCEPTION 'not an active instance of this issuer' USING ERRCODE = 'BR001';
    END IF;
    PERFORM audit_append(
        p_tag, p_at, ARRAY[p_actor], ARRAY[p_action], ARRAY[p_instance], ARRAY[p_lease_id],
        ARRAY['ok'], ARRAY[NULL::text], ARRAY[p_detail], ARRAY[p_unsequenced]);
END
$$
"""

_RECORD_TOKEN = """
CREATE OR REPLACE FUNCTION broker_record_token(
    p_instance text, p_accessor text, p_expires_at timestamptz, p_now timestamptz,
    p_tag bytea, p_at timestamptz, p_actor text, p_action text, p_detail text,
    p_unsequenced bytea
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    st text;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(@CLASS@, hashtext(p_instance));
    SELECT state INTO st FROM instances WHERE instance_id = p_instance;
    IF st IS DISTINCT FROM 'active' THEN
        RAISE EXCEPTION 'not an active instance' USING ERRCODE = 'BR001';
    END IF;
    INSERT INTO instance_tokens (accessor, instance_id, created_at, expires_at)
    VALUES (p_accessor, p_instance, p_now, p_expires_at);
    PERFORM audit_append(
        p_tag, p_at, ARRAY[p_actor], ARRAY[p_action], ARRAY[p_instance], ARRAY[NULL::text],
        ARRAY['ok'], ARRAY[NULL::text], ARRAY[p_detail], ARRAY[p_unsequenced]);
END
$$
"""


def _sql(template: str) -> str:
    """The function's text with the constants above put in (no input reaches it)."""
    return template.replace("@ANY_LOCK@", _ANY_LOCK).replace("@CLASS@", str(_CLASS))


def upgrade() -> None:
    # The lease limit counts an instance's live leases of one role: with (instance, role,
    # state) the count reads exactly those entries, whatever the statistics say, instead
    # of walking a role's or an instance's every lease.
    op.create_index("ix_leases_instance_role_state", "leases", ["instance_id", "role", "state"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_sql(_BEGIN_ISSUE))
        op.execute(_sql(_COMPLETE_ISSUE))
        op.execute(_sql(_RECORD_TOKEN))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS broker_record_token")
        op.execute("DROP FUNCTION IF EXISTS broker_complete_issue")
        op.execute("DROP FUNCTION IF EXISTS broker_begin_issue")
    op.drop_index("ix_leases_instance_role_state", table_name="leases")

"""one round trip for a termination on PostgreSQL: ``broker_request_termination`` tombstones
an active instance, queues its revocation job and appends the
``instance.terminate_requested`` event server-side, and says whether the broker ever saw
the instance

It serves the common case only: an active instance, with the issuer and workload the
caller read a moment before (the event names them), no revocation job yet and, for an
instance ending itself, a token id not used before. Anything else (an id never seen, an
instance already terminating, a failed job to re-queue, another owner, a replayed token
id) raises SQLSTATE ``BR001`` before the statement commits, so nothing is written, and
the caller runs the general path (``broker.leases.sql.jobs.request_termination``), which
decides it as before. It takes the instance's exclusive advisory lock first, as the
general path does (``broker.leases.sql.common.lock_instance``), so it waits for every
issuance in flight and the job's first pass sees their rows.

SQLite has none of it: its one writer at a time needs no round trip saved.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 19:40:00.000000
"""

from alembic import op


revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# ``broker.leases.sql.common.INSTANCE_LOCK_CLASS``, as migration 0008 has it.
_CLASS = 1_386_218_069

_REQUEST_TERMINATION = """
CREATE OR REPLACE FUNCTION broker_request_termination(
    p_instance text, p_owner text, p_owner_workload text, p_jti text,
    p_jti_issuer text, p_jti_expires timestamptz, p_job_id text, p_requested_by text,
    p_reason text, p_incident text, p_now timestamptz,
    p_tag bytea, p_at timestamptz, p_actor text, p_action text, p_event_reason text,
    p_detail text, p_unsequenced bytea
) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    st text;
    own text;
    own_workload text;
    seen boolean;
BEGIN
    -- Its own statement, so the read below has a snapshot from after every issuance
    -- that held the instance's lock (their rows are then the job's to revoke).
    PERFORM pg_advisory_xact_lock(@CLASS@, hashtext(p_instance));
    SELECT state, issuer_name, workload, last_seen_at IS NOT NULL
    INTO st, own, own_workload, seen
    FROM instances WHERE instance_id = p_instance FOR UPDATE;
    IF st IS DISTINCT FROM 'active' OR own IS DISTINCT FROM p_owner
       OR own_workload IS DISTINCT FROM p_owner_workload THEN
        RAISE EXCEPTION 'not the active instance the caller read' USING ERRCODE = 'BR001';
    END IF;
    IF EXISTS (SELECT 1 FROM revocation_jobs WHERE instance_id = p_instance) THEN
        RAISE EXCEPTION 'a revocation job exists' USING ERRCODE = 'BR001';
    END IF;
    IF p_jti IS NOT NULL THEN
        INSERT INTO seen_tokens (issuer_name, jti, expires_at)
        VALUES (p_jti_issuer, p_jti, p_jti_expires) ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'a token id used before' USING ERRCODE = 'BR001';
        END IF;
    END IF;
    UPDATE instances SET state = 'terminating', updated_at = p_now
    WHERE instance_id = p_instance;
    INSERT INTO revocation_jobs (job_id, instance_id, state, attempts, next_attempt_at,
                                 requested_by, reason, incident, created_at, updated_at)
    VALUES (p_job_id, p_instance, 'pending', 0, p_now, p_requested_by, p_reason,
            p_incident, p_now, p_now);
    PERFORM audit_append(
        p_tag, p_at, ARRAY[p_actor], ARRAY[p_action], ARRAY[p_instance], ARRAY[NULL::text],
        ARRAY['ok'], ARRAY[p_event_reason], ARRAY[p_detail], ARRAY[p_unsequenced]);
    RETURN seen OR EXISTS (SELECT 1 FROM leases WHERE instance_id = p_instance);
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_REQUEST_TERMINATION.replace("@CLASS@", str(_CLASS)))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS broker_request_termination")

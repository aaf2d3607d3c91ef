"""one round trip for a termination and for its job's end on PostgreSQL:
``broker_request_termination`` tombstones an active instance, queues its revocation job
and appends the ``instance.terminate_requested`` event server-side, and says whether the
broker ever saw the instance; ``broker_finish_job`` records what a job's last pass
confirmed and ends the job and the instance

It serves the common case only: an active instance, with the issuer and workload the
caller read a moment before (the event names them), no revocation job yet and, for an
instance ending itself, a token id not used before. Anything else (an id never seen, an
instance already terminating, a failed job to re-queue, another owner, a replayed token
id) raises SQLSTATE ``BR001`` before the statement commits, so nothing is written, and
the caller runs the general path (``broker.leases.sql.jobs.request_termination``), which
decides it as before. It takes the instance's exclusive advisory lock first, as the
general path does (``broker.leases.sql.common.lock_instance``), so it waits for every
issuance in flight and the job's first pass sees their rows.

``broker_finish_job`` serves the common case of a job's end: every token and lease the
pass confirmed moves (the tokens not yet recorded revoked, the leases live and stamped,
all of the instance), no lease of the instance is left live, and the job still runs
under this worker's claim. Otherwise it raises ``BR001`` having written nothing, and
``broker.leases.sql.revocation.record_confirmed`` with ``broker.leases.sql.jobs.finish_job``
decide as before (what moved, a lease still live, a claim another worker took). It locks
the instance as the general path does: the advisory lock, then the row.

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


_FINISH_JOB = """
CREATE OR REPLACE FUNCTION broker_finish_job(
    p_job_id text, p_instance text, p_worker text, p_tokens text[], p_leases text[],
    p_sources text[], p_live text[], p_now timestamptz,
    p_tag bytea, p_at timestamptz, p_actors text[], p_actions text[], p_details text[],
    p_unsequenced bytea[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    moved integer;
    n integer := cardinality(p_actions);
BEGIN
    PERFORM pg_advisory_xact_lock(@CLASS@, hashtext(p_instance));
    PERFORM 1 FROM instances WHERE instance_id = p_instance FOR UPDATE;
    UPDATE instance_tokens SET revoked_at = p_now
    WHERE accessor = ANY (p_tokens) AND revoked_at IS NULL AND instance_id = p_instance;
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved <> cardinality(p_tokens) THEN
        RAISE EXCEPTION 'not every token moved' USING ERRCODE = 'BR001';
    END IF;
    UPDATE leases SET state = 'revoked', ended_at = p_now, updated_at = p_now
    WHERE lease_id = ANY (p_leases) AND state = ANY (p_sources)
      AND revoke_sent_at IS NOT NULL AND instance_id = p_instance;
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved <> cardinality(p_leases) THEN
        RAISE EXCEPTION 'not every lease moved' USING ERRCODE = 'BR001';
    END IF;
    IF EXISTS (SELECT 1 FROM leases WHERE instance_id = p_instance AND state = ANY (p_live))
    THEN
        RAISE EXCEPTION 'a lease is still live' USING ERRCODE = 'BR001';
    END IF;
    UPDATE revocation_jobs SET state = 'done', completed_at = p_now, updated_at = p_now,
        claimed_until = NULL, last_error = NULL
    WHERE job_id = p_job_id AND state = 'running' AND claimed_by = p_worker;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the claim is not ours' USING ERRCODE = 'BR001';
    END IF;
    UPDATE instances SET state = 'terminated', terminated_at = p_now, updated_at = p_now
    WHERE instance_id = p_instance;
    PERFORM audit_append(
        p_tag, p_at, p_actors, p_actions, array_fill(p_instance, ARRAY[n]),
        array_fill(NULL::text, ARRAY[n]), array_fill('ok'::text, ARRAY[n]),
        array_fill(NULL::text, ARRAY[n]), p_details, p_unsequenced);
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_REQUEST_TERMINATION.replace("@CLASS@", str(_CLASS)))
        op.execute(_FINISH_JOB.replace("@CLASS@", str(_CLASS)))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS broker_finish_job")
        op.execute("DROP FUNCTION IF EXISTS broker_request_termination")

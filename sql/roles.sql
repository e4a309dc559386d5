-- PostgreSQL: the read-only reviewer role for radiologists, analysts and BI tools.
--
-- cxr_reviewer (NOLOGIN: grant it to login roles, e.g. `GRANT cxr_reviewer TO alice;`) can
-- read every contract view (v_*) and append reviews, and nothing else: no base table reads
-- (instances hold header facts, runs hold parameters), no updates or deletes anywhere.
-- Views run with their owner's rights, so SELECT on a view does not open its base tables.
-- Two small reads make `cxr-screen query` and `cxr-screen review` work for a reviewer login:
-- SELECT on alembic_version (the schema version, checked before any work; it holds nothing
-- else) and SELECT on the reviews id sequence (currval gives the id of the review just
-- inserted; the sequence's last value tells how many reviews were ever made, which
-- v_reviews shows anyway). No USAGE on it: reviewers cannot draw ids.
--
-- Idempotent; run after the migrations (and again after a migration adds a view), as a
-- user allowed to create roles: `psql -d DB -f sql/roles.sql` or sql.db.apply_reviewer_role.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cxr_reviewer') THEN
        CREATE ROLE cxr_reviewer NOLOGIN;
    END IF;
END
$roles$;

REVOKE ALL ON ALL TABLES IN SCHEMA public FROM cxr_reviewer;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM cxr_reviewer;
GRANT USAGE ON SCHEMA public TO cxr_reviewer;

DO $grants$
DECLARE
    view_name text;
BEGIN
    FOR view_name IN
        SELECT viewname FROM pg_views
        WHERE schemaname = 'public' AND viewname LIKE 'v\_%'
    LOOP
        EXECUTE format('GRANT SELECT ON %I TO cxr_reviewer', view_name);
    END LOOP;
END
$grants$;

-- Reviews are append-only for reviewers: INSERT of the review columns only (the id and
-- created_at come from their defaults). Reading reviews goes through v_latest_reviews.
GRANT INSERT (study_instance_uid, model_id, decision, reviewer, note, reason) ON reviews
    TO cxr_reviewer;

-- The review web page's login reads its users (names, argon2 password hashes, active);
-- a reviewer login can read them, never add or change one (`cxr-screen web adduser` runs as
-- the owner).
GRANT SELECT ON web_users TO cxr_reviewer;

-- Read-only: the schema version, and the id of the review just inserted (see above).
GRANT SELECT ON alembic_version TO cxr_reviewer;
DO $sequence$
BEGIN
    EXECUTE format(
        'GRANT SELECT ON SEQUENCE %s TO cxr_reviewer',
        pg_get_serial_sequence('reviews', 'review_id')
    );
END
$sequence$;

-- One row per run. For a completed run files_seen = predicted + skipped + failed.
-- Contract columns: run_id, kind, source, started_at, finished_at, status, files_seen,
-- predicted, skipped, failed.
CREATE VIEW v_run_summary AS
SELECT
    r.run_id,
    r.kind,
    r.source,
    r.started_at,
    r.finished_at,
    r.status,
    r.files_seen,
    r.predicted,
    r.skipped,
    r.failed,
    m.name AS model_name,
    m.version AS model_version,
    r.model_id,
    r.prefect_flow_run_id,
    r.error
FROM runs AS r
LEFT JOIN models AS m ON m.model_id = r.model_id

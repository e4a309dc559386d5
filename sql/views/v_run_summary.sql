-- One row per run. For a completed run files_seen = predicted + skipped + failed.
-- status: running, completed, failed, interrupted (stopped by SIGINT or SIGTERM: its counts are
-- those of the shards it committed before it stopped; run the same command again to finish),
-- or abandoned (a run that stopped giving signs of life: its process was killed; error says
-- when and which run noticed). heartbeat_at: the run's last sign of life (its start, then
-- each committed shard).
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
    r.error,
    r.heartbeat_at
FROM runs AS r
LEFT JOIN models AS m ON m.model_id = r.model_id

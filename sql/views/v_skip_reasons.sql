-- Why files were not predicted: one row per outcome (skipped | failed), reason and model
-- version, with the number of files and when such a file was last written.
CREATE VIEW v_skip_reasons AS
SELECT
    fo.outcome,
    fo.reason,
    m.name AS model_name,
    m.version AS model_version,
    fo.model_id,
    COUNT(*) AS n_files,
    MAX(fo.updated_at) AS last_updated_at
FROM file_outcomes AS fo
JOIN models AS m ON m.model_id = fo.model_id
WHERE fo.outcome <> 'predicted'
GROUP BY fo.outcome, fo.reason, m.name, m.version, fo.model_id

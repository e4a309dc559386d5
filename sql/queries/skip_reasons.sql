-- Why files were not predicted: skipped and failed files by reason, most frequent first,
-- counting files whose current outcome was written at or after :since.
-- :since datetime  only outcomes written at or after this time (with a time zone)
SELECT
    fo.outcome,
    fo.reason,
    m.name AS model_name,
    m.version AS model_version,
    COUNT(*) AS n_files
FROM file_outcomes AS fo
JOIN models AS m ON m.model_id = fo.model_id
WHERE fo.outcome <> 'predicted'
    AND fo.updated_at >= :since
GROUP BY fo.outcome, fo.reason, m.name, m.version
ORDER BY n_files DESC, fo.outcome, fo.reason

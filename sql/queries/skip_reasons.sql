-- Why files were not predicted: skipped and failed files by reason, most frequent first,
-- counting files whose current outcome was written at or after :since.
-- :since datetime  only outcomes written at or after this time (with a time zone)
SELECT
    fo.outcome,
    fo.reason,
    fo.model_name,
    fo.model_version,
    COUNT(*) AS n_files
FROM v_instance_outcomes AS fo
WHERE fo.outcome <> 'predicted'
    AND fo.updated_at >= :since
GROUP BY fo.outcome, fo.reason, fo.model_name, fo.model_version
ORDER BY n_files DESC, fo.outcome, fo.reason

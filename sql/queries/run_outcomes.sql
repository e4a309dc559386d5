-- The files a run wrote outcomes for, by outcome and reason (a later run that changed a
-- file's outcome takes that file over).
-- :run_id int  the run
SELECT
    fo.outcome,
    fo.reason,
    COUNT(*) AS n_files
FROM v_instance_outcomes AS fo
WHERE fo.run_id = :run_id
GROUP BY fo.outcome, fo.reason
ORDER BY n_files DESC, fo.outcome, fo.reason

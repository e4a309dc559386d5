-- Per UTC day between two dates (inclusive): runs started and their file counts, and study
-- predictions written that day with how many were positive.
-- :first_day date  first day (YYYY-MM-DD)
-- :last_day date  last day (YYYY-MM-DD)
SELECT
    d.day,
    COALESCE(r.n_runs, 0) AS n_runs,
    COALESCE(r.files_seen, 0) AS files_seen,
    COALESCE(r.predicted, 0) AS predicted,
    COALESCE(r.skipped, 0) AS skipped,
    COALESCE(r.failed, 0) AS failed,
    COALESCE(p.n_studies, 0) AS n_studies,
    COALESCE(p.n_positive, 0) AS n_positive
FROM (
    SELECT date(started_at) AS day FROM v_run_summary
    UNION
    SELECT date(predicted_at) AS day FROM v_study_results
) AS d
LEFT JOIN (
    SELECT
        date(started_at) AS day,
        COUNT(*) AS n_runs,
        SUM(files_seen) AS files_seen,
        SUM(predicted) AS predicted,
        SUM(skipped) AS skipped,
        SUM(failed) AS failed
    FROM v_run_summary
    GROUP BY date(started_at)
) AS r ON r.day = d.day
LEFT JOIN (
    SELECT
        date(predicted_at) AS day,
        COUNT(*) AS n_studies,
        SUM(CASE WHEN label THEN 1 ELSE 0 END) AS n_positive
    FROM v_study_results
    GROUP BY date(predicted_at)
) AS p ON p.day = d.day
WHERE d.day >= :first_day
    AND d.day <= :last_day
ORDER BY d.day

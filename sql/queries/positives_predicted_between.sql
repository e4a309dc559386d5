-- Positive study predictions made in a time window, e.g. by last night's run: every study
-- whose current prediction was written at or after :since and before :until.
-- :since datetime  start of the window (inclusive, with a time zone)
-- :until datetime  end of the window (exclusive, with a time zone)
SELECT
    sr.study_instance_uid,
    sr.accession_number,
    sr.study_date,
    sr.model_name,
    sr.model_version,
    sr.score,
    sr.threshold,
    sr.n_images,
    sr.run_id,
    sr.predicted_at
FROM v_study_results AS sr
WHERE sr.predicted_at >= :since
    AND sr.predicted_at < :until
    AND sr.label = TRUE
ORDER BY sr.score DESC, sr.study_instance_uid, sr.model_version

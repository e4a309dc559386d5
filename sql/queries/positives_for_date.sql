-- Positive studies whose study date is the given day, one row per model version, highest
-- score first. "Yesterday's positives": pass yesterday's date.
-- :day date  the study date (YYYY-MM-DD)
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
WHERE sr.study_date = :day
    AND sr.label = TRUE
ORDER BY sr.score DESC, sr.study_instance_uid, sr.model_version

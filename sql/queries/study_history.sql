-- Everything known about one study, by accession number: each model version's prediction,
-- newest first, with the study's latest review.
-- :accession_number str  the study's accession number
SELECT
    sr.study_instance_uid,
    sr.accession_number,
    sr.study_date,
    sr.model_name,
    sr.model_version,
    sr.score,
    sr.label,
    sr.n_images,
    sr.predicted_at,
    lr.decision AS latest_decision,
    lr.reviewer AS latest_reviewer,
    lr.created_at AS reviewed_at
FROM v_study_results AS sr
LEFT JOIN v_latest_reviews AS lr ON lr.study_instance_uid = sr.study_instance_uid
WHERE sr.accession_number = :accession_number
ORDER BY sr.predicted_at DESC, sr.model_version

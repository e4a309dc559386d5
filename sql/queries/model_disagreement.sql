-- Studies on which two model versions disagree (one positive, one negative), largest score
-- change first. Compare a new version with the one it replaces before switching over.
-- :name_a str  model name of the first version
-- :version_a str  the first version
-- :name_b str  model name of the second version
-- :version_b str  the second version
SELECT
    a.study_instance_uid,
    a.accession_number,
    a.study_date,
    a.score AS score_a,
    a.label AS label_a,
    b.score AS score_b,
    b.label AS label_b,
    b.score - a.score AS score_change
FROM v_study_results AS a
JOIN v_study_results AS b ON b.study_instance_uid = a.study_instance_uid
WHERE a.model_name = :name_a
    AND a.model_version = :version_a
    AND b.model_name = :name_b
    AND b.model_version = :version_b
    AND a.label <> b.label
ORDER BY ABS(b.score - a.score) DESC, a.study_instance_uid

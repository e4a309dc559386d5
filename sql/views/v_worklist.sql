-- The review page's worklist: one row per flagged study prediction (a study and a model
-- version whose study prediction is positive), with the study's latest review, if any.
-- is_latest is 1 when this is the study's most recent prediction of any model version (the
-- one v_review_queue goes by). Reviews belong to the study: the latest one counts whichever
-- model version it was recorded against (review_model_id says which).
CREATE VIEW v_worklist AS
SELECT
    sp.study_instance_uid,
    st.accession_number,
    st.study_date,
    m.name AS model_name,
    m.version AS model_version,
    sp.score,
    sp.threshold,
    sp.n_images,
    sp.model_id,
    sp.run_id,
    sp.predicted_at,
    CASE WHEN EXISTS (
        SELECT 1
        FROM study_predictions AS newer
        WHERE newer.study_instance_uid = sp.study_instance_uid
            AND (
                newer.predicted_at > sp.predicted_at
                OR (newer.predicted_at = sp.predicted_at AND newer.model_id > sp.model_id)
            )
    ) THEN 0 ELSE 1 END AS is_latest,
    rv.review_id,
    rv.decision,
    rv.reason,
    rv.note,
    rv.reviewer,
    rv.created_at AS reviewed_at,
    rv.model_id AS review_model_id
FROM study_predictions AS sp
JOIN studies AS st ON st.study_instance_uid = sp.study_instance_uid
JOIN models AS m ON m.model_id = sp.model_id
LEFT JOIN reviews AS rv ON rv.review_id = (
    SELECT r.review_id
    FROM reviews AS r
    WHERE r.study_instance_uid = sp.study_instance_uid
    ORDER BY r.created_at DESC, r.review_id DESC
    LIMIT 1
)
WHERE sp.label = TRUE

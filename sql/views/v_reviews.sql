-- Every review ever recorded (reviews are append-only history), oldest first within a study;
-- v_latest_reviews has the one that counts. For statistics such as reviewer agreement.
-- reason: why a reviewer disagreed (the review page's short list), NULL otherwise.
CREATE VIEW v_reviews AS
SELECT
    rv.review_id,
    rv.study_instance_uid,
    rv.decision,
    rv.reviewer,
    rv.note,
    rv.created_at,
    rv.model_id,
    m.name AS model_name,
    m.version AS model_version,
    rv.reason
FROM reviews AS rv
LEFT JOIN models AS m ON m.model_id = rv.model_id

-- The review that counts for each study: the latest one (reviews are append-only history).
CREATE VIEW v_latest_reviews AS
SELECT
    r.study_instance_uid,
    r.review_id,
    r.decision,
    r.reviewer,
    r.note,
    r.created_at,
    r.model_id,
    m.name AS model_name,
    m.version AS model_version,
    r.reason
FROM (
    SELECT
        rv.study_instance_uid,
        rv.review_id,
        rv.decision,
        rv.reviewer,
        rv.note,
        rv.created_at,
        rv.model_id,
        rv.reason,
        ROW_NUMBER() OVER (
            PARTITION BY rv.study_instance_uid
            ORDER BY rv.created_at DESC, rv.review_id DESC
        ) AS recency
    FROM reviews AS rv
) AS r
LEFT JOIN models AS m ON m.model_id = r.model_id
WHERE r.recency = 1

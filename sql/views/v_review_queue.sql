-- Studies waiting for a reviewer: the study's latest prediction (the most recent of any model
-- version) is positive and nobody has reviewed the study yet. Highest score first. The
-- thumbnail is that of the study's highest-scoring image under that model version.
CREATE VIEW v_review_queue AS
SELECT
    latest.study_instance_uid,
    st.accession_number,
    st.study_date,
    m.name AS model_name,
    m.version AS model_version,
    latest.score,
    latest.threshold,
    latest.n_images,
    (
        SELECT fo.thumbnail_path
        FROM image_predictions AS ip
        JOIN file_outcomes AS fo
            ON fo.sop_instance_uid = ip.sop_instance_uid AND fo.model_id = ip.model_id
        WHERE ip.study_instance_uid = latest.study_instance_uid
            AND ip.model_id = latest.model_id
            AND fo.outcome = 'predicted'
            AND fo.thumbnail_path IS NOT NULL
        ORDER BY ip.score DESC, fo.source_uri
        LIMIT 1
    ) AS thumbnail_path,
    latest.run_id,
    latest.predicted_at,
    latest.model_id
FROM (
    SELECT
        sp.study_instance_uid,
        sp.model_id,
        sp.score,
        sp.label,
        sp.threshold,
        sp.n_images,
        sp.run_id,
        sp.predicted_at,
        ROW_NUMBER() OVER (
            PARTITION BY sp.study_instance_uid
            ORDER BY sp.predicted_at DESC, sp.model_id DESC
        ) AS recency
    FROM study_predictions AS sp
) AS latest
JOIN studies AS st ON st.study_instance_uid = latest.study_instance_uid
JOIN models AS m ON m.model_id = latest.model_id
WHERE latest.recency = 1
    AND latest.label = TRUE
    AND NOT EXISTS (
        SELECT 1 FROM reviews AS r WHERE r.study_instance_uid = latest.study_instance_uid
    )
ORDER BY latest.score DESC, latest.study_instance_uid

-- One row per study result (study and model version) that no successful publication has sent
-- to a PACS yet, or whose result changed after the last one that was sent (more images
-- arrived, a recomputation): what `cxr-screen publish --unpublished` sends.
-- last_attempt_at / last_status / last_error: the latest attempt for it, if any.
CREATE VIEW v_unpublished AS
SELECT
    sp.study_instance_uid,
    st.accession_number,
    st.study_date,
    m.name AS model_name,
    m.version AS model_version,
    sp.score,
    sp.label,
    sp.threshold,
    sp.n_images,
    sp.predicted_at,
    sp.model_id,
    sp.aggregation,
    last.sent_at AS last_attempt_at,
    last.status AS last_status,
    last.error AS last_error
FROM study_predictions AS sp
JOIN studies AS st ON st.study_instance_uid = sp.study_instance_uid
JOIN models AS m ON m.model_id = sp.model_id
LEFT JOIN publications AS last
    ON last.publication_id = (
        SELECT MAX(p.publication_id)
        FROM publications AS p
        WHERE p.study_instance_uid = sp.study_instance_uid AND p.model_id = sp.model_id
    )
WHERE NOT EXISTS (
    SELECT 1
    FROM publications AS ok
    WHERE ok.study_instance_uid = sp.study_instance_uid
        AND ok.model_id = sp.model_id
        AND ok.status = 'sent'
        AND ok.prediction_at >= sp.predicted_at
)

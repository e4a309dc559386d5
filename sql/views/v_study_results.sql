-- One row per study and model version: the study's aggregated prediction.
-- Contract columns (scripts rely on them): study_instance_uid, accession_number, study_date,
-- model_name, model_version, score, label, threshold, n_images, run_id, predicted_at.
CREATE VIEW v_study_results AS
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
    sp.run_id,
    sp.predicted_at,
    sp.aggregation,
    sp.model_id
FROM study_predictions AS sp
JOIN studies AS st ON st.study_instance_uid = sp.study_instance_uid
JOIN models AS m ON m.model_id = sp.model_id

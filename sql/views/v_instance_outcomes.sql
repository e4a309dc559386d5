-- One row per source file and model version: what happened to the file, and its score if
-- it was predicted. A file that failed before its UIDs were read has NULL UIDs.
-- Contract columns: source_uri, sop_instance_uid, study_instance_uid, outcome
-- (predicted | skipped | failed), reason, score, model_version, run_id.
-- facts: what the pixel path did to a predicted image (decoder, window, inversion,
-- reduction, sizes); view_position and modality from the image's header.
CREATE VIEW v_instance_outcomes AS
SELECT
    fo.source_uri,
    fo.sop_instance_uid,
    fo.study_instance_uid,
    fo.outcome,
    fo.reason,
    ip.score,
    m.version AS model_version,
    fo.run_id,
    m.name AS model_name,
    fo.model_id,
    ip.label,
    fo.thumbnail_path,
    fo.updated_at,
    fo.facts,
    i.view_position,
    i.modality
FROM file_outcomes AS fo
JOIN models AS m ON m.model_id = fo.model_id
LEFT JOIN instances AS i ON i.sop_instance_uid = fo.sop_instance_uid
LEFT JOIN image_predictions AS ip
    ON ip.sop_instance_uid = fo.sop_instance_uid
    AND ip.model_id = fo.model_id
    AND fo.outcome = 'predicted'

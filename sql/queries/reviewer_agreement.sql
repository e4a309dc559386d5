-- How often each reviewer agreed with the model since a given time: counts per decision and
-- the agreement rate agree / (agree + disagree) (NULL when there is no decided review).
-- :since datetime  only reviews recorded at or after this time (with a time zone)
SELECT
    r.reviewer,
    COUNT(*) AS n_reviews,
    SUM(CASE WHEN r.decision = 'agree' THEN 1 ELSE 0 END) AS n_agree,
    SUM(CASE WHEN r.decision = 'disagree' THEN 1 ELSE 0 END) AS n_disagree,
    SUM(CASE WHEN r.decision = 'uncertain' THEN 1 ELSE 0 END) AS n_uncertain,
    CAST(SUM(CASE WHEN r.decision = 'agree' THEN 1 ELSE 0 END) AS DOUBLE PRECISION)
        / NULLIF(SUM(CASE WHEN r.decision IN ('agree', 'disagree') THEN 1 ELSE 0 END), 0)
        AS agreement_rate
FROM v_reviews AS r
WHERE r.created_at >= :since
GROUP BY r.reviewer
ORDER BY r.reviewer

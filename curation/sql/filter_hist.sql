-- Filter-score histograms: rows per (pipeline, filter, bin of 1/50 of its range) and how many were
-- selected. Filters: nsfw and watermark (probabilities, 0..1), clip_similarity (cosine, -1..1); rows
-- without the score (filter off, not scored) are left out. Needs the views of views.sql.
WITH scores AS (
    SELECT src, 'nsfw' AS filter, nsfw AS value, selected FROM manifest
    UNION ALL
    SELECT src, 'watermark', watermark, selected FROM manifest
    UNION ALL
    SELECT src, 'clip_similarity', clip_similarity, selected FROM manifest
)
SELECT s.pipeline, f.filter,
       CASE WHEN f.filter = 'clip_similarity' THEN least(floor((f.value + 1) * 25), 49) / 25 - 1
            ELSE least(floor(f.value * 50), 49) / 50 END AS bin,
       CASE WHEN f.filter = 'clip_similarity' THEN 0.04 ELSE 0.02 END::DOUBLE AS width,
       count(*) AS rows, count(*) FILTER (WHERE f.selected) AS selected
FROM scores f JOIN sources s USING (src)
WHERE f.value IS NOT NULL AND isfinite(f.value)
GROUP BY ALL
ORDER BY s.pipeline, f.filter, bin;

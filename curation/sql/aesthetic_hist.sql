-- Aesthetic-score histogram: rows per (pipeline, 0.1-wide score bin), and how many were selected.
-- Needs the views of views.sql.
SELECT s.pipeline, floor(m.aesthetic * 10) / 10 AS bin, count(*) AS rows,
       count(*) FILTER (WHERE m.selected) AS selected
FROM manifest m JOIN sources s USING (src)
WHERE m.aesthetic IS NOT NULL AND isfinite(m.aesthetic)
GROUP BY ALL
ORDER BY s.pipeline, bin;

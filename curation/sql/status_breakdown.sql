-- Rows per status, and rows per reject reason (a row can carry several ';'-separated reasons;
-- '(selected)' = kept, '(not decided)' = the select stage has not run on it).
-- Needs the views of views.sql.
SELECT s.pipeline, 'status' AS facet, coalesce(m.status, '(none)') AS value, count(*) AS rows
FROM manifest m JOIN sources s USING (src)
GROUP BY ALL
UNION ALL
SELECT pipeline, 'reject_reason', reason, count(*)
FROM (
    SELECT s.pipeline,
           unnest(CASE WHEN m.selected THEN ['(selected)']
                       WHEN m.reject_reason IS NULL OR m.reject_reason = '' THEN ['(not decided)']
                       ELSE string_split(m.reject_reason, ';') END) AS reason
    FROM manifest m JOIN sources s USING (src)
)
GROUP BY ALL
ORDER BY 1, 2 DESC, 4 DESC, 3;

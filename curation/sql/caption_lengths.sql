-- Figure 6 data: number of captions per (pipeline, caption kind, length in words), over all rows.
-- Needs the views of views.sql.
SELECT s.pipeline, n.kind, n.words, count(*) AS captions
FROM caption_nouns n JOIN sources s USING (src)
GROUP BY ALL
ORDER BY s.pipeline, n.kind, n.words;

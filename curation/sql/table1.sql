-- Paper Table 1 (PixArt-Sigma, arXiv 2403.04692): one row per (pipeline, dataset, caption kind).
-- Needs the views of views.sql. Definitions:
--   volume      images in the slice that have a caption of this kind
--   dn          distinct nouns (lowercase lemmas)
--   vn          distinct nouns occurring MORE than vn_min_count (default 10) times in the slice+kind
--   total_noun  all noun occurrences
--   acl         average caption length in words (whitespace-separated)
--   avg_nouns   total_noun / volume  (the paper's "Average", nouns per image)
-- With several outputs in `outs` there are also rows for their union (pipeline 'a+b').
WITH named AS (
    SELECT s.pipeline, s.src AS pord, d.dataset, d.ord, d.src, d.key
    FROM dataset_rows d JOIN sources s USING (src)
), all_rows AS (
    SELECT * FROM named
    UNION ALL
    SELECT (SELECT string_agg(pipeline, '+' ORDER BY src) FROM sources), 1000000, dataset, ord, src, key
    FROM named WHERE (SELECT count(*) FROM sources) > 1
), caps AS (
    SELECT r.pipeline, r.pord, r.dataset, r.ord, n.kind, n.words, n.n_nouns, n.nouns
    FROM all_rows r JOIN caption_nouns n ON n.src = r.src AND n.key = r.key
), totals AS (
    SELECT pipeline, pord, dataset, ord, kind,
           count(*) AS volume, sum(n_nouns)::BIGINT AS total_noun, avg(words) AS acl
    FROM caps GROUP BY ALL
), noun_freq AS (
    SELECT pipeline, dataset, kind, noun, count(*) AS occurrences
    FROM (SELECT pipeline, dataset, kind, unnest(nouns) AS noun FROM caps)
    GROUP BY ALL
), vocab AS (
    SELECT pipeline, dataset, kind, count(*) AS dn,
           count(*) FILTER (WHERE occurrences > coalesce(getvariable('vn_min_count'), 10)) AS vn
    FROM noun_freq GROUP BY ALL
)
SELECT t.pipeline, t.dataset, t.kind AS caption, t.volume,
       coalesce(v.vn, 0)::BIGINT AS vn, coalesce(v.dn, 0)::BIGINT AS dn, t.total_noun,
       t.acl, t.total_noun / t.volume AS avg_nouns
FROM totals t LEFT JOIN vocab v USING (pipeline, dataset, kind)
ORDER BY t.pord, t.ord, t.dataset,
         CASE t.kind WHEN 'raw' THEN 1 WHEN 'long' THEN 2 WHEN 'derived_short' THEN 3 ELSE 4 END;

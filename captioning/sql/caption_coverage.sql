-- Caption coverage: how many manifest rows have both captions (long + short), one, or none.
-- The 60/40 long/short training mix needs both captions per row; rows with one caption train on it alone.
-- short = caption_short (the alt text, or the long caption's first sentence when the alt text is junk);
--         the stage fills it for every row (junk alt text and no long caption: null);
--         parts the stage has not reached fall back to the raw alt text `caption`.
-- long  = caption_long (null when the stage has not run, the image failed, or the output was degenerate).
-- Usage (duckdb CLI, from the repo root):
--   duckdb -c "SET VARIABLE manifest = 'runs/demo/manifest/*.parquet'" -c ".read captioning/sql/caption_coverage.sql"
WITH m AS (
    SELECT selected,
           caption_long IS NOT NULL AND trim(caption_long) <> '' AS has_long,
           CASE WHEN caption_short_derived IS NOT NULL THEN coalesce(trim(caption_short), '') <> ''
                ELSE coalesce(trim(caption), '') <> '' END AS has_short
    FROM read_parquet(getvariable('manifest'), union_by_name = true)
)
SELECT CASE WHEN has_long AND has_short THEN 'both'
            WHEN has_long THEN 'long_only'
            WHEN has_short THEN 'short_only'
            ELSE 'none' END AS coverage,
       count(*) AS rows,
       count(*) FILTER (WHERE selected) AS selected_rows
FROM m
GROUP BY coverage
ORDER BY CASE coverage WHEN 'both' THEN 0 WHEN 'long_only' THEN 1 WHEN 'short_only' THEN 2 ELSE 3 END;

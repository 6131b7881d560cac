-- Views for the caption-statistics queries (curation.stats). Every query file in this folder reads
-- only these views, which read two source views, one row per output row with `src` = the output's
-- 1-based position in `outs`:
--   manifest_files       the manifest parts           (columns as stored; stages not run yet are absent)
--   caption_nouns_files  the stats stage's noun rows  (key, kind, words, n_nouns, nouns, error)
-- Python (curation.stats.table1.connect) defines them over pyarrow datasets registered in DuckDB, so
-- local and object-store outputs work alike; the duckdb CLI defines them with files.sql, which
-- globs local folders (local outputs only: the CLI has no object-store access offline).
--
-- Set before running (the stats command writes them to <output>/report/stats_setup.sql):
--   SET VARIABLE outs = ['runs/demo'];          -- one or more pipeline output folders
--   SET VARIABLE pipelines = ['demo'];          -- optional display names, same order (default: folder)
--   SET VARIABLE vn_min_count = 10;             -- optional, VN = nouns occurring MORE than this (default 10)
--
-- CLI:   duckdb -c "SET VARIABLE outs = ['runs/demo']" -c ".read curation/sql/files.sql" \
--               -c ".read curation/sql/views.sql" -c ".read curation/sql/table1.sql"
-- (add  -c ".read runs/demo/report/stats_slices.sql"  after views.sql for the configured slices)

-- One row per pipeline output: src is the 1-based position in `outs`.
CREATE OR REPLACE TEMP VIEW sources AS
SELECT i::INTEGER AS src,
       coalesce(getvariable('pipelines')[i], rtrim(getvariable('outs')[i], '/')) AS pipeline,
       rtrim(getvariable('outs')[i], '/') AS out
FROM (SELECT unnest(generate_series(1, len(getvariable('outs')))) AS i);

-- The manifest of every output. The typed empty row set first makes the columns the queries use
-- exist (as NULL) even when a stage has not run yet (no `selected`, no caption columns, ...).
CREATE OR REPLACE TEMP VIEW manifest AS
WITH typed AS (
    SELECT NULL::INTEGER AS src, NULL::VARCHAR AS key, NULL::VARCHAR AS url, NULL::VARCHAR AS caption,
           NULL::VARCHAR AS status, NULL::VARCHAR AS error, NULL::BIGINT AS width, NULL::BIGINT AS height,
           NULL::DOUBLE AS aspect_ratio, NULL::DOUBLE AS aesthetic, NULL::DOUBLE AS nsfw,
           NULL::DOUBLE AS watermark, NULL::DOUBLE AS clip_similarity, NULL::BOOLEAN AS text_truncated,
           NULL::VARCHAR AS duplicate_of,
           NULL::BOOLEAN AS selected, NULL::VARCHAR AS reject_reason, NULL::VARCHAR AS caption_long,
           NULL::VARCHAR AS caption_status, NULL::VARCHAR AS caption_short, NULL::BOOLEAN AS caption_short_derived
    WHERE false
)
SELECT * FROM typed
UNION ALL BY NAME
SELECT * FROM manifest_files;

-- Output of the stats stage: one row per (key, caption kind) with words, n_nouns, nouns (lemmas).
CREATE OR REPLACE TEMP VIEW caption_nouns AS
SELECT src, key, kind, words, n_nouns, nouns, error FROM caption_nouns_files;

-- Configured slices (StatsConfig.slices): empty here; <output>/report/stats_slices.sql replaces it.
CREATE OR REPLACE TEMP VIEW extra_slices AS
SELECT NULL::VARCHAR AS dataset, NULL::INTEGER AS ord, NULL::INTEGER AS src, NULL::VARCHAR AS key
WHERE false;

-- Named slices ("Dataset" column of Table 1): built-in ones, then the configured ones.
--   all       every manifest row
--   selected  rows the select stage kept
--   4k        width * height >= 3840 * 2160 pixels (UHD pixel count, so portrait, landscape and square
--             images are treated alike; a min-side rule would drop e.g. 5000x2000 panoramas)
CREATE OR REPLACE TEMP VIEW dataset_rows AS
SELECT 'all' AS dataset, 1 AS ord, src, key FROM manifest
UNION ALL
SELECT 'selected', 2, src, key FROM manifest WHERE selected
UNION ALL
SELECT '4k', 3, src, key FROM manifest WHERE width * height >= 3840 * 2160
UNION ALL
SELECT dataset, 100 + ord, src, key FROM extra_slices;

-- Source views of views.sql for the duckdb CLI: local output folders only (globs over the files;
-- Python registers pyarrow datasets instead, which also read object stores). Needs `outs` set
-- (see views.sql). `src` = position of the output in `outs`, found from each file's folder.
CREATE OR REPLACE TEMP VIEW manifest_files AS
SELECT list_position(list_transform(getvariable('outs'), lambda o: rtrim(o, '/')),
                     parse_dirpath(parse_dirpath(filename)))::INTEGER AS src,
       * EXCLUDE (filename)
FROM read_parquet(
    list_transform(getvariable('outs'), lambda o: rtrim(o, '/') || '/manifest/part-*.parquet'),
    union_by_name = true, filename = true);

-- <out>/stats/nouns/part-NNNNN.parquet: three folders up is the output.
CREATE OR REPLACE TEMP VIEW caption_nouns_files AS
SELECT list_position(list_transform(getvariable('outs'), lambda o: rtrim(o, '/')),
                     parse_dirpath(parse_dirpath(parse_dirpath(filename))))::INTEGER AS src,
       * EXCLUDE (filename)
FROM read_parquet(
    list_transform(getvariable('outs'), lambda o: rtrim(o, '/') || '/stats/nouns/part-*.parquet'),
    union_by_name = true, filename = true);

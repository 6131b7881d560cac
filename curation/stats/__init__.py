"""Stats stage: caption statistics of a pipeline output, as in PixArt-Sigma Table 1 and Figure 6.

Entry points:
- `run_stats(cfg, out, progress=True) -> dict`: the last stage of `curation.run`.
- `python -m curation.stats --config pipelines.yaml --pipeline NAME [--pipeline OTHER ...]
  [--output DIR] [--set k=v] [--paper]`: the same, plus the table printed (and the paper's rows).

What it writes:
- `<output>/stats/nouns/part-NNNNN.parquet`: per manifest part, one row per (key, caption kind) with
  words, n_nouns, nouns (lowercase lemmas), error; written by Ray workers, resumable per part
  (see extract.py).
- `<output>/report/table1.csv` (exact numbers) and `table1.md` (the paper's layout),
  `caption_length_hist.png` (Figure 6), `aesthetic_hist.png`, `filter_hist.png` (nsfw, watermark,
  clip_similarity with the select thresholds), `status_breakdown.png`,
  `stats_setup.sql` + `stats_slices.sql` (to rerun the same SQL in the duckdb CLI, local outputs).
All of it through _sigma.fs: the output may be a local folder or an object-store URI.

Definitions (nouns.py and curation/sql/table1.sql give the details):
- caption kinds: raw (alt text), long (captioner), derived_short (short caption derived from the long
  one); nouns: spaCy NOUN + PROPN tokens as lowercase lemmas; words: whitespace-separated tokens.
- Volume = images of the slice with that caption kind; VN = distinct nouns occurring more than 10
  times (11 counts, 10 does not); DN = distinct nouns; Total Noun = all noun occurrences;
  ACL = mean words per caption; Average = Total Noun / Volume.
- slices ("Dataset"): all, selected, 4k (width*height >= 3840*2160), plus `stats.slices`
  (name -> SQL WHERE clause over the manifest); several pipelines also give their union.
"""
from __future__ import annotations

import time

from _sigma import fs
from curation.stats import report, table1
from curation.stats.extract import extract_nouns, nouns_dir

__all__ = ["run_stats", "build_report", "extract_nouns", "nouns_dir", "filter_thresholds"]


def build_report(outs: list[str], names: list[str], scfg, report_dir: str, aesthetic_min: float | None = None,
                 paper: bool = False, thresholds: dict | None = None) -> dict:
    """Run the SQL over the outputs' manifests and caption nouns; write tables and figures.
    `thresholds`: the select config's filter rules drawn on the filter histograms (nsfw_max, ...)."""
    report_dir = fs.normalize(report_dir)
    outs = [fs.normalize(o) for o in outs]

    def at(name: str) -> str:
        return fs.join(report_dir, name)

    con = table1.connect(outs, names, scfg.slices, scfg.vn_min_count)
    try:
        t1 = table1.query(con, "table1")
        lengths = table1.query(con, "caption_lengths")
        aes = table1.query(con, "aesthetic_hist")
        filt = table1.query(con, "filter_hist")
        status = table1.query(con, "status_breakdown")
    finally:
        con.close()
    rows = table1.display_rows(t1, paper=paper)
    fs.write_text(at("table1.csv"), table1.to_csv(t1))
    fs.write_text(at("table1.md"), "# Caption statistics (PixArt-Sigma Table 1 layout)\n\n"
                  + table1.to_markdown(table1.display_rows(t1, paper=True)) + "\n" + table1.cli_help(report_dir))
    fs.write_text(at("stats_setup.sql"), table1.setup_sql(outs, names, scfg.vn_min_count))
    fs.write_text(at("stats_slices.sql"), table1.slices_sql(scfg.slices))
    figures = [report.caption_length_hist(lengths, at("caption_length_hist.png")),
               report.aesthetic_hist(aes, at("aesthetic_hist.png"), aesthetic_min),
               report.filter_hist(filt, at("filter_hist.png"), thresholds),
               report.status_breakdown(status, at("status_breakdown.png"))]
    return {"table": t1, "rows": rows, "text": table1.to_text(rows),
            "files": [at("table1.csv"), at("table1.md")] + figures}


def filter_thresholds(select_cfg) -> dict:
    """The select rules of the filter columns, for the histogram lines."""
    return {k: getattr(select_cfg, k, None) for k in ("nsfw_max", "watermark_max", "clip_similarity_min")}


def run_stats(cfg, out: str, progress: bool = True) -> dict:
    """The stats stage: nouns of every caption (resumable), then Table 1 + figures into <out>/report."""
    from _sigma import manifest

    out = fs.normalize(out)
    if not manifest.list_parts(out):
        return {"skipped": "no manifest parts yet"}
    t0 = time.time()
    ext = extract_nouns(cfg, out, progress)
    t1 = time.time()
    rep = build_report([out], [cfg.name], cfg.stats, fs.join(out, "report"), cfg.select.aesthetic_min,
                       thresholds=filter_thresholds(cfg.select))
    table = rep["table"].to_pylist()
    return {**{k: v for k, v in ext.items() if k != "path"}, "extract_s": round(t1 - t0, 2),
            "report_s": round(time.time() - t1, 2), "table1_rows": len(table),
            "all": {r["caption"]: {"volume": r["volume"], "vn": r["vn"], "dn": r["dn"], "acl": round(r["acl"], 1)}
                    for r in table if r["dataset"] == "all"},
            "report": fs.join(out, "report")}

"""The report page's data: what the stages wrote under `<out>/report/` and `<out>/eval/`.

Table 1 comes from `report/table1.csv` (curation.stats) laid out beside the paper's rows by
curation.stats.table1.display_rows; figures are the PNGs the stats stage (Figure 6 =
caption_length_hist.png), training and sampling wrote; the stage summary is `report/summary.json`
(curation.run); eval scores are `eval/scores/*.json` (eval.score). Everything is read through
_sigma.fs, so an object-store run works the same. Missing pieces are reported as missing.

`served_files` is the whitelist of run files the browser may send: only names found by listing
report/ (recursively), eval/, eval/scores/ and train/<stage>/training_curves.png inside the run
are ever opened, so no request path reaches outside it (app.py also refuses a local symlink that
leads out of the run).
"""
from __future__ import annotations

import csv
import io
import json
import time

import pyarrow as pa

from _sigma import fs, manifest

SERVED_EXT = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".md": "text/plain; charset=utf-8",
              ".csv": "text/plain; charset=utf-8", ".json": "application/json", ".sql": "text/plain; charset=utf-8"}
SERVED_DIRS = (("report", True), ("eval", False), ("eval/scores", False))  # (folder, recursive)
LIST_TTL_S = 10.0
_listed: dict[str, tuple[float, dict]] = {}
MAX_SERVED = 64 << 20  # bytes; run files bigger than this are not sent
FIGURES = {"caption_length_hist.png": "Figure 6: caption length per caption kind",
           "aesthetic_hist.png": "Aesthetic scores (selected stacked on the rest)",
           "filter_hist.png": "Filter scores: NSFW, watermark, CLIP image-text similarity (selected stacked)",
           "status_breakdown.png": "Rows per status and per reject reason"}
NUMERIC = ("volume", "vn", "dn", "total_noun", "acl", "avg_nouns")


def served_files(out: str) -> dict[str, int]:
    """{path relative to the run: size} of every file the browser may send (listed again at most
    every LIST_TTL_S seconds: a request for a figure must not list an object store each time)."""
    now = time.monotonic()
    hit = _listed.get(out)
    if hit and now - hit[0] < LIST_TTL_S:
        return hit[1]
    files = {}
    for d, recursive in SERVED_DIRS:  # eval/ holds generations by the thousand: its top level only
        for rel, size in fs.list_files(fs.join(out, *d.split("/")), recursive=recursive):
            name = f"{d}/{rel}"
            if any(name.lower().endswith(e) for e in SERVED_EXT) and size <= MAX_SERVED and ".." not in rel.split("/"):
                files[name] = size
    for stage in fs.listdir(fs.join(out, "train")):
        rel = f"train/{stage}/training_curves.png"
        if fs.isfile(fs.join(out, rel)):
            files[rel] = fs.size(fs.join(out, rel)) or 0
    _listed[out] = (now, files)
    return files


def _read_json(uri: str):
    try:
        return fs.read_json(uri) if fs.exists(uri) else None
    except (OSError, ValueError):
        return None


def table1(out: str) -> dict:
    from curation.stats.table1 import TABLE1_COLUMNS, display_rows

    uri = fs.join(out, "report", "table1.csv")
    if not fs.exists(uri):
        return {"missing": "report/table1.csv not written yet: run `python -m curation.stats` (or the stats stage)",
                "rows": display_rows(pa.table({c: [] for c in TABLE1_COLUMNS}), paper=True)}
    rows = list(csv.DictReader(io.StringIO(fs.read_text(uri))))
    for r in rows:
        for c in NUMERIC:
            r[c] = float(r[c]) if r.get(c) not in (None, "") else 0.0
    t = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in TABLE1_COLUMNS})
    return {"rows": display_rows(t, paper=True)}


def eval_scores(out: str) -> dict:
    d = fs.join(out, "eval", "scores")
    runs = []
    for name in fs.listdir(d):
        if not name.endswith(".json"):
            continue
        s = _read_json(fs.join(d, name)) or {}
        gen = (s.get("protocol") or {}).get("generation") or {}
        runs.append({"run": s.get("run", name[:-5]), "checkpoint": gen.get("checkpoint"), "fid": s.get("fid"),
                     "clip_score": s.get("clip_score"), "n_scored": s.get("n_scored"),
                     "n_benchmark": s.get("n_benchmark"), "scored_at": s.get("scored_at")})
    md = fs.join(out, "eval", "report.md")
    return {"runs": runs, "report_md": "eval/report.md" if fs.exists(md) else None}


def dedup_recall(out: str) -> dict | None:
    """The dedup stage's measured recall (dedup/_done.json: a sample of rows searched exactly, per
    cosine band with 95 % Wilson intervals), or None before dedup finished."""
    done = _read_json(fs.join(out, "dedup", "_done.json")) or {}
    rec = done.get("recall")
    if not rec:
        return None
    return {"cosine": rec.get("cosine"), "sample_rows": rec.get("sample_rows"), "recall": rec.get("recall"),
            "interval": rec.get("interval"), "pairs": rec.get("pairs"), "assignments": done.get("assignments"),
            "bands": [{"band": k, **v} for k, v in (rec.get("bands") or {}).items()]}


def report(out: str) -> dict:
    files = served_files(out)
    figures = [{"path": p, "title": FIGURES.get(fs.basename(p), fs.basename(p))}
               for p in sorted(files, key=lambda p: (fs.basename(p) not in FIGURES, p))
               if p.endswith((".png", ".jpg", ".jpeg"))]
    summary = _read_json(fs.join(out, "report", "summary.json"))
    footers = manifest.run_summary(out)
    return {"table1": table1(out), "figures": figures, "summary": summary, "footers": footers,
            "eval": eval_scores(out), "files": sorted(files), "dedup": dedup_recall(out),
            "summary_json": json.dumps(summary, indent=1, default=str)[:20000] if summary else None}

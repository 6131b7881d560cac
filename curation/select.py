"""Select stage: thresholds and duplicate resolution. Adds selected, reject_reason, duplicate_of,
dup_kind, dup_similarity; never recomputes scores or similarities.

1. Duplicates (select.drop_duplicates): refuses unless dedup finished for the current scores and
   dedup settings (`<out>/dedup/_done.json`). One worker task resolves the stored candidate pairs
   at select.dedup_threshold with select's own criteria (curation/dedup/resolve.py) and writes
   `<out>/dedup/resolved/<fingerprint>/part-NNNNN.parquet` (+ `_done.json`).
2. One Ray task per pending part (_sigma.partstage.run_tasks) reads the part and its resolved
   rows and writes the manifest part with the select columns.
So changing a threshold and rerunning `--stages select` costs a read of the stored pairs, the
involved rows' fields and one pass over the parts; the driver sees counts only.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from _sigma import fs, manifest
from _sigma.config import ConfigError, fingerprint

DUP_COLUMNS = pa.schema([("key", pa.string()), ("duplicate_of", pa.string()), ("dup_kind", pa.string()),
                         ("dup_similarity", pa.float32())])


def _num(t: pa.Table, name: str) -> np.ndarray:
    if name not in t.column_names:
        return np.full(t.num_rows, np.nan)
    return pc.cast(t.column(name), pa.float64()).to_numpy(zero_copy_only=False)


def reject_reasons(t: pa.Table, cfg) -> list[str | None]:
    """Per row, every failing criterion except duplicates, ';'-joined (None: the row passes).

    A row whose status is not ok fails with its status only; else not_scored (no size), too_small,
    aspect_ratio (h/w outside [min_aspect_ratio, max_aspect_ratio]), low_aesthetic, and the
    filters when set: nsfw (nsfw > nsfw_max), watermark (watermark > watermark_max),
    low_clip_similarity (clip_similarity < clip_similarity_min); a missing score fails its rule.
    The one definition of eligibility: the duplicate resolution uses it too."""
    n = t.num_rows
    status = t.column("status").to_pylist() if "status" in t.column_names else [None] * n
    w, h, aes = _num(t, "width"), _num(t, "height"), _num(t, "aesthetic")
    ok = np.array([s == "ok" for s in status], bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        unscored = ok & (np.isnan(w) | np.isnan(h))
        sized = ok & ~unscored
        small = sized & (np.fmin(w, h) < cfg.min_side)
        ratio = h / w
        aspect = sized & ((w <= 0) | (ratio > cfg.max_aspect_ratio) | (ratio < cfg.min_aspect_ratio))
        low = ok & (cfg.aesthetic_min is not None) & (np.isnan(aes) | (aes < (cfg.aesthetic_min or 0)))
        filters = []  # (reason, failing rows) of each filter that is set; NaN (not scored) fails
        for reason, col, limit, above in (("nsfw", "nsfw", cfg.nsfw_max, True),
                                          ("watermark", "watermark", cfg.watermark_max, True),
                                          ("low_clip_similarity", "clip_similarity", cfg.clip_similarity_min, False)):
            if limit is not None:
                v = _num(t, col)
                filters.append((reason, ok & (np.isnan(v) | ((v > limit) if above else (v < limit)))))
    out: list[str | None] = [None] * n
    bad = ~ok | unscored | small | aspect | low
    for _, m in filters:
        bad = bad | m
    for i in np.flatnonzero(bad).tolist():
        if not ok[i]:
            out[i] = status[i] or "no_status"
            continue
        r = ["not_scored"] if unscored[i] else [x for x, m in (("too_small", small), ("aspect_ratio", aspect)) if m[i]]
        if low[i]:
            r.append("low_aesthetic")
        r += [reason for reason, m in filters if m[i] and not unscored[i]]  # not_scored says it all
        out[i] = ";".join(r)
    return out


def select_table(t: pa.Table, cfg) -> pa.Table:
    """key, selected, reject_reason of a part whose duplicate_of column is already set."""
    reasons = reject_reasons(t, cfg)
    if cfg.drop_duplicates and "duplicate_of" in t.column_names:
        dup = pc.is_valid(t.column("duplicate_of")).to_numpy(zero_copy_only=False)
        reasons = [(f"{r};duplicate" if r else "duplicate") if d else r for r, d in zip(reasons, dup)]
    return pa.table({"key": t.column("key"), "selected": pa.array([r is None for r in reasons], pa.bool_()),
                     "reject_reason": pa.array(reasons, pa.string())})


def _reason_counts(reasons) -> dict[str, int]:
    c: Counter = Counter()
    for r in reasons:
        c.update(x for x in (r or "").split(";") if x)
    return dict(c)


def select_part(item: dict, *, out: str, cfg, resolved: str | None) -> dict:
    """On a worker: one part's select columns, committed atomically with its select fingerprint."""
    part = item["part"]
    t = manifest.read_part(out, part)
    dups = DUP_COLUMNS.empty_table()
    if resolved and item.get("has_dups"):
        dups = fs.read_parquet(fs.join(resolved, f"part-{part:05d}.parquet"))
    t = manifest.merge_columns(t, dups)  # replaces any earlier duplicate columns; rows without a match: null
    sel = select_table(t, cfg)
    t = manifest.merge_columns(t, sel)
    summary = manifest.write_part(out, part, t, "select", item["fp"])
    return {"part": part, "rows": summary["rows"], "selected": summary.get("selected", 0),
            "reasons": _reason_counts(sel.column("reject_reason").to_pylist())}


def count_part(item: dict, *, out: str) -> dict:
    t = manifest.read_part(out, item["part"], ["selected", "reject_reason"])
    return {"part": item["part"], "rows": t.num_rows, "selected": int(pc.sum(t.column("selected")).as_py() or 0),
            "reasons": _reason_counts(t.column("reject_reason").to_pylist())}


def _resolve_task(item: dict, *, out: str, cfg, target: str, fp: str) -> dict:
    from curation.dedup.resolve import resolve

    return resolve(out, cfg, target, fp)


def resolve_duplicates(cfg, out: str, parts: list[int], progress: bool) -> tuple[str | None, dict]:
    """(folder of the resolved rows, its _done info), resolving unless already done for these
    settings. Raises ConfigError when dedup has not finished for the current scores."""
    from _sigma.partstage import run_tasks
    from curation.dedup import dedup_fingerprint, read_done
    from curation.dedup.pairs import dedup_dir

    if not cfg.select.drop_duplicates:
        return None, {}
    done = read_done(out)
    if not done or done.get("fingerprint") != dedup_fingerprint(cfg, out, parts):
        why = "has not run" if not done else "ran for other scores or dedup settings"
        raise ConfigError(f"select: dedup {why} on {out}: run the dedup stage first (--stages dedup,select), "
                          "or set select.drop_duplicates=false")
    fp = fingerprint({"select": cfg.select, "dedup": done["fingerprint"]})
    root = fs.join(dedup_dir(out), "resolved")
    target = fs.join(root, fp)
    try:
        info = fs.read_json(fs.join(target, "_done.json"))
    except (FileNotFoundError, OSError, ValueError):
        info = None
    if not info or info.get("fingerprint") != fp:
        info = run_tasks(_resolve_task, [{"fp": fp}], kwargs={"out": out, "cfg": cfg.select, "target": target, "fp": fp},
                         desc="select resolve", progress=progress)[0]
    for name in fs.listdir(root):  # earlier resolutions: superseded
        if name != fp:
            fs.delete_dir(fs.join(root, name))
    return target, info


def run_select(cfg, out: str, progress: bool = True) -> dict:
    from _sigma.partstage import nodes_of, run_tasks

    out = fs.normalize(out)
    parts = manifest.list_parts(out)
    resolved, info = resolve_duplicates(cfg, out, parts, progress)
    rfp = info.get("fingerprint")
    with_dups = set(info.get("parts", ()))
    with ThreadPoolExecutor(16) as ex:
        fps = list(ex.map(lambda p: manifest.part_fingerprints(out, p), parts))
    todo, done = [], []
    for p, f in zip(parts, fps):
        fp = fingerprint({"select": cfg.select, "resolved": rfp, "up": [f.get("download"), f.get("score")]})
        (done if f.get("select") == fp else todo).append({"part": p, "fp": fp, "has_dups": p in with_dups})
    results = run_tasks(select_part, todo, kwargs={"out": out, "cfg": cfg.select, "resolved": resolved},
                        desc="select", progress=progress, stage="select")
    results += run_tasks(count_part, done, kwargs={"out": out}, desc="select (done)", progress=progress)
    reasons: Counter = Counter()
    for r in results:
        reasons.update(r["reasons"])
    return {"rows": sum(r["rows"] for r in results), "selected": sum(r["selected"] for r in results),
            "parts_written": len(todo), "reject_reasons": dict(sorted(reasons.items())),
            "duplicate_groups": info.get("groups"), "nodes": nodes_of(results)}

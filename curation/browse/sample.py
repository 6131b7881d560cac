"""Synthetic runs for the browser's tests, benchmark and README screenshot (no models, no Ray).

`make_run(out)` writes, through _sigma.manifest / _sigma.fs (so `out` may be s3://), a small run
with every piece the browser reads: manifest parts with the columns of every stage, download
tars laid out as img2dataset writes them (shard i = part i, `sigma_key` in the json member), one
ok row whose stored bytes no longer decode, dedup candidate pairs in the format of this round's
contract (`dedup/pairs/part-*.parquet` + `_done.json`), `selected` / `duplicate_of` / ... as
select writes them (computed here by a plain row-by-row loop, independent of the what-if's code),
config.resolved.yaml, report/ (table1.csv, the stats stage's real figures, summary.json) and
eval/scores/. `make_manifest(out, rows)` writes a large manifest only (benchmark).
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import tempfile

import numpy as np
import pyarrow as pa
import yaml

from _sigma import fs, manifest

SELECT = {"aesthetic_min": 5.0, "min_side": 512, "max_aspect_ratio": 4.5, "min_aspect_ratio": 1 / 4.5,
          "drop_duplicates": True, "dedup_threshold": 0.95}
CANDIDATE = 0.9
SIZES = [(1024, 1024), (2048, 1536), (1536, 2048), (640, 480), (400, 300), (3000, 600), (512, 2400),
         (1200, 1800), (4000, 2250), (800, 800), (2560, 1440), (700, 1400)]
WORDS = ("dog cat tree river mountain city street car bird flower house boat beach forest sky cloud "
         "woman man child chair table lamp window bridge train field").split()


def _caption(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


_PHOTOS: list = []


def _photos() -> list:
    """The real photographs scikit-image / scikit-learn ship (the demo's own; no download)."""
    if not _PHOTOS:
        from curation.demo_data import photos

        _PHOTOS.extend(im.convert("RGB") for _, im in photos())
    return _PHOTOS


def _image(rng: random.Random, w: int, h: int, photo: int | None = None, jitter: float = 0.0) -> bytes:
    """A JPEG of w x h / 8 (the manifest keeps the full size): a crop of a real photo when there is
    one (`jitter` shifts the crop and the brightness a little: a near duplicate), else shapes."""
    from PIL import Image, ImageDraw, ImageEnhance, ImageOps

    w, h = max(8, w // 8), max(8, h // 8)
    pics = _photos()
    if pics and photo is not None:
        src = pics[photo % len(pics)]
        im = ImageOps.fit(src, (w, h), Image.Resampling.LANCZOS, centering=(0.5 + jitter, 0.5 - jitter))
        im = ImageEnhance.Brightness(im).enhance(1.0 + 2 * jitter)
    else:
        im = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        for _ in range(4):
            x0, y0 = rng.randrange(w), rng.randrange(h)
            d.ellipse([x0, y0, x0 + rng.randrange(4, w), y0 + rng.randrange(4, h)],
                      fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_run(out: str, parts: int = 3, rows_per_part: int = 20, seed: int = 0, report: bool = True) -> dict:
    """Write a small synthetic run into `out` (local or s3://); returns what was written."""
    rng = random.Random(seed)
    out = fs.normalize(out)
    rows, images = [], {}
    for p in range(parts):
        for i in range(rows_per_part):
            key = f"{p:05d}_{i:06d}"
            w, h = rng.choice(SIZES)
            status = "ok" if i % 10 not in (7, 9) else ("failed_download" if i % 10 == 7 else "invalid_input")
            alt = _caption(rng, rng.randrange(2, 8)) if i % 6 else "IMG_1234.jpg"
            cap_status = "degenerate" if i % 11 == 5 else ("too_long" if i % 13 == 4 else "ok")
            long = None if cap_status == "degenerate" else _caption(rng, 40 if cap_status == "ok" else 320)
            rows.append({"key": key, "url": f"http://img.example/{key}.jpg", "caption": alt, "status": status,
                         "error": None if status == "ok" else f"{status} (synthetic)",
                         "width": w if status == "ok" else None, "height": h if status == "ok" else None,
                         "aspect_ratio": h / w if status == "ok" else None,
                         "aesthetic": round(rng.uniform(3.0, 7.5), 3) if status == "ok" else None,
                         "duplicate_of": None, "dup_kind": None, "dup_similarity": None,
                         "caption_long": long if status == "ok" else None,
                         "caption_status": cap_status if status == "ok" else None,
                         "caption_short": (_caption(rng, 6) if i % 6 == 0 else alt) if status == "ok" else None,
                         "caption_short_derived": (i % 6 == 0) if status == "ok" else None,
                         "caption_model": "tiny-captioner" if status == "ok" else None,
                         "caption_t5_tokens": (len(long.split()) + 2 if long else None) if status == "ok" else None})
            if status == "ok":
                images[key] = _image(rng, w, h, photo=i if i % 4 else None)
    ok = [r for r in rows if r["status"] == "ok"]
    pairs = []
    def passing(r, w, h, photo=None, jitter=0.0):  # pair members pass the other criteria: dedup decides
        r.update(width=w, height=h, aspect_ratio=h / w, aesthetic=round(rng.uniform(5.2, 7.5), 3))
        images[r["key"]] = _image(rng, w, h, photo, jitter)

    for j in range(0, min(len(ok) - 1, 12), 3):  # exact twins: same bytes, same size and score
        a, b = ok[j], ok[j + 1]
        passing(a, *SIZES[j % 3], photo=j + 1)
        b.update(width=a["width"], height=a["height"], aspect_ratio=a["aspect_ratio"], aesthetic=a["aesthetic"])
        images[b["key"]] = images[a["key"]]
        pairs.append((a["key"], b["key"], 1.0, "exact"))
    for j in range(14, min(len(ok) - 2, 40), 4):  # near pairs around the 0.95 threshold, in chains
        for n, r in enumerate(ok[j:j + 3]):  # one photo, three slightly different crops
            passing(r, *rng.choice(SIZES[:3] + SIZES[7:]), photo=j, jitter=0.03 * n)
        sims = [0.97, 0.93, 0.955, 0.91, 0.99, 0.94][(j // 4) % 6]
        pairs.append((ok[j]["key"], ok[j + 1]["key"], sims, "near"))
        pairs.append((ok[j + 1]["key"], ok[j + 2]["key"], round(sims - 0.01, 3), "near"))
    pairs = sorted({(min(a, b), max(a, b), s, k) for a, b, s, k in pairs})
    for r in rows:
        r["sha256"] = hashlib.sha256(images[r["key"]]).hexdigest() if r["key"] in images else None
    in_pairs = {k for a, b, _, _ in pairs for k in (a, b)}
    broken = next((r["key"] for r in reversed(ok[1:]) if r["key"] not in in_pairs), None)
    if broken:
        images[broken] = images[broken][:60]  # the stored bytes no longer decode (truncated JPEG)
    _select_rows(rows, pairs, SELECT)
    for p in range(parts):
        part_rows = [r for r in rows if r["key"].startswith(f"{p:05d}_")]
        manifest.write_part(out, p, pa.Table.from_pylist(part_rows, schema=SCHEMA), "select", "synthetic")
        fs.write_bytes(fs.join(out, "download", f"{p:05d}.tar"), _tar(p, part_rows, images))
    fs.write_parquet(fs.join(out, "dedup", "pairs", "part-00000.parquet"), pa.table({
        "a": pa.array([x[0] for x in pairs], pa.string()), "b": pa.array([x[1] for x in pairs], pa.string()),
        "similarity": pa.array([x[2] for x in pairs], pa.float32()),
        "kind": pa.array([x[3] for x in pairs], pa.string())}))
    fs.write_json(fs.join(out, "dedup", "_done.json"),
                  {"fingerprint": "synthetic", "rows": len(ok), "pairs": len(pairs), "candidate_threshold": CANDIDATE})
    fs.write_text(fs.join(out, "config.resolved.yaml"), yaml.safe_dump({"resolved": {
        "name": "sample", "output": out, "select": SELECT, "dedup": {"keep": "best", "candidate_threshold": CANDIDATE},
        "features": {"resolutions": [256]}, "caption": {"quality": {"max_t5_tokens": 300}}}}))
    if report:
        _report(out, rows)
    return {"out": out, "rows": rows, "pairs": pairs, "broken": broken, "images": images}


SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("status", pa.string()),
                    ("error", pa.string()), ("sha256", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                    ("aspect_ratio", pa.float64()), ("aesthetic", pa.float64()), ("duplicate_of", pa.string()),
                    ("dup_kind", pa.string()), ("dup_similarity", pa.float64()), ("selected", pa.bool_()),
                    ("reject_reason", pa.string()), ("caption_long", pa.string()), ("caption_status", pa.string()),
                    ("caption_short", pa.string()), ("caption_short_derived", pa.bool_()),
                    ("caption_model", pa.string()), ("caption_t5_tokens", pa.int64())])


def _select_rows(rows: list[dict], pairs: list[tuple], cfg: dict) -> None:
    """select's rule, row by row: thresholds first, then greedy duplicates in rank order."""
    reasons = {}
    for r in rows:
        why = []
        if r["status"] != "ok":
            why.append(r["status"])
        else:
            if min(r["width"], r["height"]) < cfg["min_side"]:
                why.append("too_small")
            ratio = r["height"] / r["width"]
            if ratio > cfg["max_aspect_ratio"] or ratio < cfg["min_aspect_ratio"]:
                why.append("aspect_ratio")
            if cfg["aesthetic_min"] is not None and r["aesthetic"] < cfg["aesthetic_min"]:
                why.append("low_aesthetic")
        reasons[r["key"]] = why
    ranked = sorted((r for r in rows if not reasons[r["key"]]),
                    key=lambda r: (-r["width"] * r["height"], -r["aesthetic"], r["key"]))
    kept: list[str] = []
    for r in ranked:
        best = None
        for a, b, s, kind in pairs:
            other = b if a == r["key"] else a if b == r["key"] else None
            if other in kept and s >= cfg["dedup_threshold"] and (best is None or s > best[1]):
                best = (other, s, kind)
        if best:
            r["duplicate_of"], r["dup_similarity"], r["dup_kind"] = best[0], float(best[1]), best[2]
            reasons[r["key"]].append("duplicate")
        else:
            kept.append(r["key"])
    for r in rows:
        r["selected"] = not reasons[r["key"]]
        r["reject_reason"] = ";".join(reasons[r["key"]]) or None


def _tar(part: int, rows: list[dict], images: dict) -> bytes:
    """img2dataset's layout: <shard><idx>.jpg + .json (with our key as sigma_key) per image."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, r in enumerate(rows):
            if r["key"] not in images:
                continue
            base = f"{part:05d}{i:04d}"
            for name, data in ((base + ".jpg", images[r["key"]]),
                               (base + ".json", json.dumps({"sigma_key": r["key"], "url": r["url"]}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _report(out: str, rows: list[dict]) -> None:
    """report/ as the stats stage and curation.run write it, eval/scores/ as eval.score does."""
    from curation.stats import report as figs
    from curation.stats.table1 import TABLE1_COLUMNS

    t1 = [("sample", "all", "raw", 48, 3, 25, 160, 4.5, 3.3), ("sample", "all", "long", 40, 20, 25, 800, 40.0, 20.0),
          ("sample", "selected", "long", 12, 2, 25, 240, 40.0, 20.0)]
    fs.write_text(fs.join(out, "report", "table1.csv"),
                  ",".join(TABLE1_COLUMNS) + "\n" + "\n".join(",".join(map(str, r)) for r in t1) + "\n")
    lengths = pa.table({"pipeline": ["sample"] * 4, "kind": ["raw", "raw", "long", "long"], "words": [3, 5, 40, 41],
                        "captions": [20, 28, 30, 10]})
    aes = pa.table({"pipeline": ["sample"] * 3, "bin": [4.0, 5.0, 6.0], "rows": [10, 12, 8], "selected": [0, 5, 7]})
    status = pa.table({"pipeline": ["sample"] * 2, "facet": ["status", "reject_reason"], "value": ["ok", "too_small"],
                       "rows": [48, 9]})
    with tempfile.TemporaryDirectory() as d:
        import pathlib

        for name, fn, arg in (("caption_length_hist.png", figs.caption_length_hist, lengths),
                              ("aesthetic_hist.png", figs.aesthetic_hist, aes),
                              ("status_breakdown.png", figs.status_breakdown, status)):
            fn(arg, pathlib.Path(d) / name)
            fs.write_bytes(fs.join(out, "report", name), (pathlib.Path(d) / name).read_bytes())
    fs.write_json(fs.join(out, "report", "summary.json"), {
        "pipeline": "sample", "rows": len(rows), "selected": sum(r["selected"] for r in rows),
        "status": {},
        "stages": [{"stage": "select", "seconds": 0.1, "rows_per_s": 600.0, "result": {"rows": len(rows)}}]})
    fs.write_json(fs.join(out, "eval", "scores", "sample-256.json"), {
        "run": "sample-256", "fid": 321.5, "clip_score": 18.25, "n_scored": 8, "n_benchmark": 8,
        "scored_at": "2026-01-01T00:00:00", "protocol": {"generation": {"checkpoint": "train/sample-256"}}})


def make_manifest(out: str, rows: int, part_rows: int = 100_000, pair_frac: float = 0.01, seed: int = 0) -> None:
    """A large manifest (no images) with realistic columns, and candidate pairs (benchmark)."""
    rng = np.random.default_rng(seed)
    out = fs.normalize(out)
    caps = np.array([" ".join(rng.choice(WORDS, 25)) for _ in range(512)])
    sizes = np.array(SIZES)
    for p in range(0, (rows + part_rows - 1) // part_rows):
        n = min(part_rows, rows - p * part_rows)
        keys = np.char.add(f"{p:05d}_", np.char.zfill(np.arange(n).astype(str), 6))
        wh = sizes[rng.integers(0, len(sizes), n)]
        aes = rng.normal(5.5, 1.0, n)
        ok = rng.random(n) > 0.1
        sel = ok & (aes > 5.0) & (wh.min(1) >= 512)
        t = pa.table({"key": keys, "url": np.char.add("http://img.example/", keys),
                      "caption": caps[rng.integers(0, 512, n)], "status": np.where(ok, "ok", "failed_download"),
                      "width": pa.array(wh[:, 0], pa.int64()), "height": pa.array(wh[:, 1], pa.int64()),
                      "aesthetic": aes, "selected": sel,
                      "reject_reason": pa.array(np.where(sel, None, np.where(ok, "low_aesthetic", "failed_download")),
                                                pa.string()),
                      "caption_long": caps[rng.integers(0, 512, n)], "caption_status": np.where(ok, "ok", None),
                      "caption_t5_tokens": rng.integers(20, 400, n)})
        manifest.write_part(out, p, t, "select", "synthetic")
        m = int(n * pair_frac)
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        keep = a < b
        fs.write_parquet(fs.join(out, "dedup", "pairs", f"part-{p:05d}.parquet"), pa.table({
            "a": keys[a[keep]], "b": keys[b[keep]],
            "similarity": pa.array(rng.uniform(0.9, 1.0, keep.sum()), pa.float32()),
            "kind": np.full(keep.sum(), "near")}))

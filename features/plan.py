"""The features shard plan: which rows go into which shard, computed per manifest part on workers.

Shards never span manifest parts. A part's rows to featurise (selected, status ok, with a size and
a caption, not held out), sorted by key, are cut into shards at `shard_max_samples` / estimated
`shard_max_bytes`: a pure function of the part's rows and the config. Consequences:
- the plan of a part is computed where the part is read (`plan_part`, one Ray task per part,
  returning a few numbers per shard), and recomputed by the read step of the stage on the worker
  that reads the part's images (`rows_for`); the driver never holds a row or a key list;
- a change in one part (new captions, a new hold-out key) replans and rewrites only that part's
  shards; shard names carry the part (`shard-PPPPP-NNNNNN.tar`) so nothing else is renumbered;
- cost: each part ends with one partial shard per resolution (at most 1 shard per part smaller
  than the cut), i.e. with 10,000-row parts and 1,000-sample shards at most ~10 % extra shards.
Exclusions (`features.exclude_keys` and the eval hold-out of this output) are read by the workers
through _sigma.fs, so they work on local and object-store outputs alike.
"""
from __future__ import annotations

import functools
import json

from _sigma import fs, manifest
from _sigma.config import ConfigError
from _sigma import buckets, shards

MANIFEST_COLS = ["key", "url", "caption", "caption_short", "caption_long", "aesthetic", "width", "height",
                 "selected", "status"]
HOLDOUT = "eval-holdout"  # exclusion source: _sigma.holdout.excluded_keys(out), the eval hold-out


def exclusion_sources(out: str, fc) -> list[str]:
    """Where the keys never to put in a shard come from (checked on the driver, read by workers):
    `features.exclude_keys` (a text file, one key a line, or a parquet with a `key` column; local
    or URI) plus, always, this output's eval hold-out (every benchmark version's exclusion list):
    a benchmark image in a training shard would flatter FID."""
    sources = []
    if fc.exclude_keys:
        uri = fs.normalize(fc.exclude_keys)
        if not fs.exists(uri):
            raise ConfigError(f"features.exclude_keys: {fc.exclude_keys} does not exist")
        sources.append(uri)
    return sources + [HOLDOUT]


def read_key_list(uri: str) -> set[str]:
    if uri.endswith(".parquet"):
        return {str(k) for k in fs.read_parquet(uri, columns=["key"]).column("key").to_pylist() if k is not None}
    return {ln.strip() for ln in fs.read_text(uri).splitlines() if ln.strip() and not ln.startswith("#")}


def load_exclusions(out: str, sources: list[str]) -> set[str]:
    keys: set[str] = set()
    for src in sources:
        if src == HOLDOUT:
            from _sigma.holdout import excluded_keys

            keys |= excluded_keys(out)
        else:
            keys |= read_key_list(src)
    return keys


def _text(v) -> str | None:
    return v if isinstance(v, str) and v.strip() else None


def part_rows(out: str, part: int, exclude: set[str]) -> tuple[list[dict], dict]:
    """One part's rows to featurise (sorted by key) and counts of what was left out and why."""
    t = manifest.read_part(out, part, MANIFEST_COLS)
    if "selected" not in t.column_names:
        raise ConfigError(f"{out}: manifest part {part} has no `selected` column: run the select stage first")
    rows, stats = [], {"selected": 0, "excluded": 0, "no_caption": 0, "no_image": 0}
    for r in t.to_pylist():
        if not r.get("selected"):
            continue
        stats["selected"] += 1
        if r["key"] in exclude:
            stats["excluded"] += 1
            continue
        if r.get("status", "ok") != "ok" or not r.get("width") or not r.get("height"):
            stats["no_image"] += 1
            continue
        long_ = _text(r.get("caption_long"))
        short = _text(r.get("caption_short")) or _text(r.get("caption"))
        if long_ is None and short is None:
            stats["no_caption"] += 1
            continue
        rows.append({"key": r["key"], "url": r.get("url"), "text_long": long_, "text_short": short,
                     "aesthetic": r.get("aesthetic"), "orig_width": int(r["width"]), "orig_height": int(r["height"])})
    rows.sort(key=lambda r: r["key"])
    return rows, stats


def content_hash(rows: list[dict]) -> str:
    """What a shard's bytes depend on besides the config: its rows (keys, captions, metadata)."""
    blob = [[r["key"], r["url"], r["text_long"], r["text_short"], r["aesthetic"], r["orig_width"],
             r["orig_height"]] for r in rows]
    return shards.keys_hash([json.dumps(b, default=str) for b in blob])


def estimate_bytes(row: dict, resolution: int, dim: int, n_tokens: int, text_dtype: str = "fp16") -> int:
    """Tar bytes of one sample: latent (8, h/8, w/8) fp16 + T5 tokens (+ fp8 scales) + json + tar headers."""
    _, h, w = buckets.assign(row["orig_width"], row["orig_height"], resolution)
    texts = len(row["text_long"] or "") + len(row["text_short"] or "")
    return 8 * (h // 8) * (w // 8) * 2 + shards.token_bytes(n_tokens, dim, text_dtype) + texts + 400 + 4 * (512 + 256) + 3 * 128


def plan_shards(rows: list[dict], resolution: int, max_samples: int, max_bytes: int, dim: int,
                n_tokens: list[int], text_dtype: str = "fp16") -> list[list[int]]:
    """Cut the key-sorted rows into shards (lists of row indices); a pure function of its inputs."""
    plan, cur, size = [], [], 0
    for i, r in enumerate(rows):
        est = estimate_bytes(r, resolution, dim, n_tokens[i], text_dtype)
        if cur and (len(cur) >= max_samples or (max_bytes and size + est > max_bytes)):
            plan.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += est
    if cur:
        plan.append(cur)
    return plan


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    from _sigma.fetch import local_model

    return AutoTokenizer.from_pretrained(local_model(name))  # folder | hub name | s3:// / gs:// (cached per node)


def count_tokens(fc, rows: list[dict]) -> list[int]:
    """T5 tokens per row (long + short), only needed for the byte cut (0s when there is none)."""
    if not fc.shard_max_bytes:
        return [0] * len(rows)
    tok = _tokenizer(fc.t5)
    counts = [0] * len(rows)
    for kind in ("text_long", "text_short"):
        idx = [i for i, r in enumerate(rows) if r[kind]]
        for s in range(0, len(idx), 4096):
            chunk = idx[s:s + 4096]
            enc = tok([rows[i][kind] for i in chunk], max_length=fc.t5_max_length, truncation=True)["input_ids"]
            for i, ids in zip(chunk, enc):
                counts[i] += len(ids)
    return counts


def part_plan(out: str, part: int, fc, dim: int, sources: list[str]):
    """(rows, stats, {resolution: [row indices per shard]}) of one part."""
    rows, stats = part_rows(out, part, load_exclusions(out, sources))
    n_tokens = count_tokens(fc, rows)
    plans = {res: plan_shards(rows, res, fc.shard_max_samples, fc.shard_max_bytes, dim, n_tokens, fc.text_dtype)
             for res in fc.resolutions}
    return rows, stats, plans


def plan_part(part: int, *, out: str, fc, dim: int, fps: dict, sources: list[str]) -> dict:
    """The plan task of one part: its shards, each with `side` (the verified sidecar summary) when
    it is already done, else `why` it must be (re)computed. A few numbers per shard, no rows."""
    rows, stats, plans = part_plan(out, part, fc, dim, sources)
    entries = []
    for res, plan in plans.items():
        d = shards.shards_dir(out, res)
        for i, idx in enumerate(plan):
            name, h = shards.shard_name(part, i), content_hash([rows[j] for j in idx])
            side, why = shards.check_shard(fs.join(d, name), h, fps[res], fc.verify_shards)
            e = {"res": res, "part": part, "idx": i, "name": name, "hash": h, "planned": len(idx), "why": why}
            if side is not None:
                e["side"] = {k: side[k] for k in ("name", "samples", "bytes", "sha256", "buckets")}
                e["side"]["n_failed"] = len(side.get("failed", []))
            entries.append(e)
    return {"part": part, "rows": len(rows), "stats": stats, "shards": entries}


def rows_for(out: str, part: int, fc, dim: int, sources: list[str], todo: dict) -> list[dict]:
    """The read step's rows of one part: each row of a shard to compute, with `targets` (json
    [[resolution, shard group id], ...]: T5 runs once per row, the VAE once per target).

    `todo`: {(resolution, shard index): (group id, planned content hash)}. The plan is recomputed
    here; a different hash means the manifest or the exclusions changed since planning."""
    rows, _, plans = part_plan(out, part, fc, dim, sources)
    targets: dict[int, list] = {}
    for res, plan in plans.items():
        for i, idx in enumerate(plan):
            if (res, i) not in todo:
                continue
            gid, h = todo[(res, i)]
            if content_hash([rows[j] for j in idx]) != h:
                raise RuntimeError(f"features: part {part} changed while the stage ran; rerun the same command")
            for j in idx:
                targets.setdefault(j, []).append([res, gid])
    return [dict(rows[j], targets=json.dumps(tg)) for j, tg in sorted(targets.items())]

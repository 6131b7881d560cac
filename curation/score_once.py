"""Score each distinct image once: byte-identical copies (same sha256) get the values of one scoring.

A CLIP forward's float sums depend on the batch an image lands in, so the same bytes scored twice
differ in the last bits (5.257122039 vs 5.257122516), and `dedup_keep: best` then kept whichever
copy happened to round up instead of the lowest key. Crawls are full of copies (the same image
under many URLs), so scoring each once is also cheaper. Three steps, on the workers:

1. owners (`map_owners`): every downloaded row of the pending parts as (sha256, part, key), hash-
   bucketed by sha256 (a Ray task per part; the buckets travel as object refs) and grouped per
   bucket (a task per bucket of up to ROWS_PER_BUCKET rows). Per sha256 the lowest key is the
   owner; the owner rows, each with the list of its copies (part, key, and the copy's alt text
   where a score reads it), are written as pieces per (bucket, owner part) under
   `<output>/_work/score_owners/`. The driver sees object refs and counts per part only.
2. read (`owner_images`): per owner part, its tar is streamed once for the owner keys.
3. score (`ScoreOnce`): the stage's Scorer on the owner rows, then one output row per copy with
   the owner's values, its own part and key; commit_groups regroups them per part as before.
   Columns that depend on the row's alt text (clip_similarity, text_truncated) are computed per
   copy from the shared image embedding when the copy's alt text differs from the owner's.

Scope: copies among the parts one run scores. A part committed before a kill keeps its values; the
copies scored after the resume agree with them to float rounding, not bit for bit. A row with no
sha256 is its own group. The recorded sha256 is trusted to describe the tar's bytes (download
verifies the tars it reuses).
"""
from __future__ import annotations

import uuid
import zlib
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from _sigma import fs, manifest
from _sigma.partstage import PART_COL, WORK

OWNERS = "score_owners"
CAPTION_COLUMNS = ("clip_similarity", "text_truncated")  # the score columns that read the alt text


def _work_root(out: str) -> str:
    return fs.join(fs.normalize(out), WORK, OWNERS)


def _route(out: str, part: int, buckets: int, captions: bool) -> pa.Table | tuple[pa.Table, ...]:
    """A Ray task per part: its downloaded rows as (sha, _part, key[, caption]), one table per
    sha256 bucket (num_returns = buckets: the owner tasks fetch only their bucket)."""
    t = manifest.read_part(out, part, ["key", "download_status", "sha256"] + (["caption"] if captions else []))
    t = t.filter(pc.equal(t.column("download_status"), "success"))  # the rows score reads
    keys = t.column("key").to_pylist()
    shas = t.column("sha256").to_pylist() if "sha256" in t.column_names else [None] * len(keys)
    shas = [s if s else f"key:{k}" for s, k in zip(shas, keys)]  # no hash: a group of its own
    cols = {"sha": pa.array(shas, pa.string()), PART_COL: pa.array([part] * len(keys), pa.int64()),
            "key": pa.array(keys, pa.string())}
    if captions:
        cols["caption"] = (t.column("caption").cast(pa.string()) if "caption" in t.column_names
                           else pa.nulls(len(keys), pa.string()))
    rows = pa.table(cols)
    bucket = np.array([zlib.crc32(s.encode()) % buckets for s in shas], dtype=np.int64)
    tables = tuple(rows.filter(pa.array(bucket == b)) for b in range(buckets))
    return tables[0] if buckets == 1 else tables


def _owners(t: pa.Table, work: str, captions: bool) -> pa.Table:
    """One bucket's rows (all copies of its hashes): per sha256 the lowest key owns the copies; the
    owner rows are written as pieces per owner part. Returns (part, owners) counts."""
    if t.num_rows == 0:
        return pa.table({"part": pa.array([], pa.int64()), "owners": pa.array([], pa.int64())})
    t = t.sort_by([("sha", "ascending"), ("key", "ascending")])
    sha = np.asarray(t.column("sha").to_pylist(), dtype=object)
    first = np.ones(len(sha), bool)
    first[1:] = sha[1:] != sha[:-1]
    starts = np.flatnonzero(first)
    fields = [PART_COL, "key"] + (["caption"] if captions else [])
    copies = pa.ListArray.from_arrays(pa.array(np.append(starts, len(sha)), pa.int32()),
                                      pa.StructArray.from_arrays([t.column(f).combine_chunks() for f in fields],
                                                                 names=fields))
    idx = pa.array(starts)
    owners = pa.table({PART_COL: t.column(PART_COL).take(idx), "key": t.column("key").take(idx),
                       **({"caption": t.column("caption").take(idx)} if captions else {}), "copies": copies})
    parts, counts = [], []
    for p in pc.unique(owners.column(PART_COL)).to_pylist():
        piece = owners.filter(pc.equal(owners.column(PART_COL), p))
        fs.write_parquet(fs.join(work, f"p-{p:05d}", f"{uuid.uuid4().hex}.parquet"), piece)
        parts.append(p), counts.append(piece.num_rows)
    return pa.table({"part": pa.array(parts, pa.int64()), "owners": pa.array(counts, pa.int64())})


def _owner_task(work: str, captions: bool, *tables: pa.Table) -> dict:
    """A Ray task per bucket: its tables from every part's routing task -> {owner part: owners}."""
    return dict(zip(*(_owners(pa.concat_tables(tables), work, captions).column(c).to_pylist()
                      for c in ("part", "owners"))))


ROWS_PER_BUCKET = 1_000_000  # (sha, part, key) rows one owner task holds: ~150 MB


def map_owners(out: str, parts: dict[int, int], captions: bool = False) -> dict:
    """Step 1 over `parts` ({part: downloaded rows}): {"work": folder of owner pieces, "parts":
    {owner part: owners}, "distinct": distinct images}. Plain Ray tasks: one per part routes its rows
    into sha256 buckets (object refs, never through the driver), one per bucket finds the owners.
    Pieces of a killed run are deleted first."""
    import ray

    out = fs.normalize(out)
    root = _work_root(out)
    fs.delete_dir(root)
    work = fs.join(root, uuid.uuid4().hex[:12])
    if not parts:
        return {"work": work, "parts": {}, "distinct": 0}
    buckets = max(1, min(len(parts), -(-sum(parts.values()) // ROWS_PER_BUCKET)))
    route = ray.remote(num_cpus=0.25, max_retries=2, num_returns=buckets)(_route)
    route = route.options(scheduling_strategy="SPREAD")
    routed = [route.remote(out, p, buckets, captions) for p in parts]
    routed = [r if buckets > 1 else [r] for r in routed]
    owner = ray.remote(num_cpus=0.25, max_retries=2)(_owner_task).options(scheduling_strategy="SPREAD")
    counts: dict[int, int] = {}
    for res in ray.get([owner.remote(work, captions, *[r[b] for r in routed]) for b in range(buckets)]):
        for p, n in res.items():
            counts[p] = counts.get(p, 0) + n
    return {"work": work, "parts": dict(sorted(counts.items())), "distinct": sum(counts.values())}


def _read_owner_images(item: dict) -> Iterator[dict]:
    """flat_map (one owner part): its owner rows with `image` (None when not in the part's tar)."""
    from _sigma.images import iter_download_images

    part, folder = int(item["part"]), fs.join(item["work"], f"p-{int(item['part']):05d}")
    rows = {}
    for name, _ in fs.list_files(folder):
        for r in fs.read_parquet(fs.join(folder, name)).to_pylist():
            rows[r["key"]] = r
    for key, data in iter_download_images(item["out"], part, set(rows)):
        r = rows.pop(key, None)
        if r is not None:
            yield {**r, "image": data}
    for r in rows.values():
        yield {**r, "image": None}


def owner_images(out: str, owners: dict):
    """Step 2: a Ray dataset of the owner rows with their bytes, one block per owner part."""
    import ray

    items = [{"out": fs.normalize(out), "work": owners["work"], "part": p} for p in owners["parts"]]
    return ray.data.from_items(items, override_num_blocks=len(items)).flat_map(_read_owner_images)


class ScoreOnce:
    """Step 3, a Ray actor stage: the Scorer (built from the same kwargs) on owner rows, one output
    row per copy. The Scorer's own columns pass through unchanged, whatever they are."""

    def __init__(self, **scorer_kwargs):
        from curation.score import Scorer

        self.scorer = Scorer(**scorer_kwargs)

    def __call__(self, batch: pa.Table) -> pa.Table:
        copies = batch.column("copies").combine_chunks()
        scored = self.scorer(batch.drop_columns(["copies"]))
        return fan_out(scored, copies, batch, self.scorer)


def fan_out(scored: pa.Table, copies: pa.ListArray, batch: pa.Table, scorer=None) -> pa.Table:
    """scored (one row per owner) -> one row per copy: the owner's values, the copy's _part and key."""
    from curation.score import MISSING

    flat = pc.list_flatten(copies)
    parent = pc.list_parent_indices(copies)
    out = scored.take(parent)
    owner_key = out.column("key").combine_chunks()
    for name in (PART_COL, "key"):
        out = out.set_column(out.column_names.index(name), name, flat.field(name).cast(out.schema.field(name).type))
    is_copy = pc.not_equal(out.column("key"), owner_key)
    err = out.column("score_error").to_pylist()
    if MISSING in err:  # say which copy's bytes were missing: this row's own tar may be fine
        err = [f"{MISSING} (byte-identical copy {o} is scored for it)" if e == MISSING and c else e
               for e, c, o in zip(err, is_copy.to_pylist(), owner_key.to_pylist())]
        out = out.set_column(out.column_names.index("score_error"), "score_error", pa.array(err, pa.string()))
    if scorer is not None and "caption" in flat.type.names and getattr(scorer, "similarity", False):
        out = _own_captions(out, flat.field("caption"), batch.column("caption").combine_chunks().take(parent),
                            scorer)
    return out


def _own_captions(out: pa.Table, caption: pa.Array, owner_caption: pa.Array, scorer) -> pa.Table:
    """The alt-text columns of copies whose alt text is not the owner's: their own text against
    the shared image embedding (Scorer.text_similarity: the computation the Scorer uses itself)."""
    cap, own = caption.to_pylist(), owner_caption.to_pylist()
    emb = out.column("embedding").to_pylist()
    rows = [i for i, (c, o, e) in enumerate(zip(cap, own, emb)) if c != o and e is not None]
    if not rows:
        return out
    cols = {name: out.column(name).to_pylist() for name in CAPTION_COLUMNS}
    texts = [i for i in rows if isinstance(cap[i], str)]
    for i in rows:
        cols["clip_similarity"][i] = cols["text_truncated"][i] = None  # no alt text: nothing to compare
    if texts:
        sims, cut = scorer.text_similarity(np.asarray([emb[i] for i in texts], np.float32), [cap[i] for i in texts])
        for i, s, t in zip(texts, sims, cut):
            cols["clip_similarity"][i], cols["text_truncated"][i] = s, t
    for name in CAPTION_COLUMNS:
        out = out.set_column(out.column_names.index(name), name, pa.array(cols[name], out.schema.field(name).type))
    return out


def cleanup(out: str) -> None:
    fs.delete_dir(_work_root(out))

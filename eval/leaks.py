"""The exclusion list of a benchmark version: everything that must stay out of training.

A row of the manifest is held out when it
- is a benchmark row (`benchmark`);
- has the sha256 of a benchmark image (`same_sha256`): byte-identical copies under other URLs;
- has a CLIP image embedding within cosine `eval.leak_threshold` of a benchmark image
  (`near_duplicate`): resized / re-encoded / lightly edited copies. Searched exhaustively against
  EVERY row that has an embedding (not only within a dedup cluster, and not only rows selected
  today, so a later re-tuned select cannot bring one back);
- has any caption (caption, caption_short, caption_long) equal to a benchmark prompt, compared
  lower-cased with collapsed whitespace (`same_prompt`): the model must not have seen the text.

One Ray task per manifest part (common.partstage.run_tasks) reads the part's columns and
embeddings, compares them with the benchmark (its embeddings (B, D) float32, sha256s and prompts
are shipped once through the object store) in blocks of rows, and writes its matches as a piece;
the driver never loads the manifest's embeddings, it concatenates the pieces (O(held-out rows))
into `exclude.parquet` (common.holdout is the reader).
"""
from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa

from common import fs, holdout, manifest
from common.partstage import run_tasks

BLOCK = 4096  # manifest rows per similarity block: (4096, B) float32 scores at a time
SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("benchmark_key", pa.string()),
                    ("similarity", pa.float32())])


def _norm(p) -> str:
    from eval.stratify import normalise_prompt

    return normalise_prompt(p) if isinstance(p, str) else ""


def _part_matches(part: int, out: str, work: str, bench: dict, threshold: float) -> dict:
    """Held-out rows of one part -> a piece file (only when there are any) and counts."""
    t = manifest.read_part(out, part, ["key", "sha256", "caption", "caption_short", "caption_long"])
    keys = t.column("key").to_pylist()
    hits: dict[str, dict] = {}

    def add(k: str, reason: str, bkey: str | None, sim: float | None = None):
        h = hits.setdefault(k, {"reasons": [], "benchmark_key": bkey, "similarity": sim})
        if reason not in h["reasons"]:
            h["reasons"].append(reason)
        if sim is not None and (h["similarity"] is None or sim > h["similarity"]):
            h["similarity"], h["benchmark_key"] = sim, bkey

    for k in keys:
        if k in bench["keys"]:
            add(k, "benchmark", k)
    if "sha256" in t.column_names:
        for k, s in zip(keys, t.column("sha256").to_pylist()):
            if s and s in bench["sha"] and bench["sha"][s] != k:  # not the benchmark row itself
                add(k, "same_sha256", bench["sha"][s])
    for c in ("caption", "caption_short", "caption_long"):
        if c in t.column_names:
            for k, p in zip(keys, t.column(c).to_pylist()):
                n = _norm(p)
                if n and n in bench["prompts"] and k not in bench["keys"]:  # another row's caption
                    add(k, "same_prompt", bench["prompts"][n])
    E, bkeys = bench["emb"], bench["emb_keys"]
    ek, emb = manifest.read_part_embeddings(out, part)
    near = 0
    if len(ek) and len(bkeys):
        for s in range(0, len(ek), BLOCK):
            x = emb[s:s + BLOCK].astype(np.float32)
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            sims = x @ E.T  # (block, B) cosines
            best = sims.argmax(axis=1)
            top = sims[np.arange(len(x)), best]
            for i in np.flatnonzero(top >= threshold):
                k = str(ek[s + i])
                if k != bkeys[best[i]]:  # a benchmark row is trivially within 1.0 of itself
                    near += 1
                    add(k, "near_duplicate", bkeys[best[i]], float(top[i]))
    counts = {r: 0 for r in holdout.REASONS}
    for h in hits.values():
        for r in h["reasons"]:
            counts[r] += 1
    piece = None
    if hits:
        ks = sorted(hits)
        table = pa.table({"key": ks, "reason": [";".join(hits[k]["reasons"]) for k in ks],
                          "benchmark_key": [hits[k]["benchmark_key"] for k in ks],
                          "similarity": pa.array([hits[k]["similarity"] for k in ks], pa.float32())}, schema=SCHEMA)
        piece = fs.join(work, f"part-{part:05d}-{uuid.uuid4().hex[:8]}.parquet")
        fs.write_parquet(piece, table)
    return {"part": part, "rows": len(keys), "held_out": len(hits), "counts": counts, "piece": piece,
            "embeddings_searched": int(len(ek))}


def benchmark_side(rows: list[dict], emb: dict[str, np.ndarray] | None) -> dict:
    """What every part task compares with: benchmark keys, sha256 -> key, prompt -> key, embeddings."""
    sha = {r["sha256"]: r["key"] for r in rows if r.get("sha256")}
    prompts = {}
    for r in rows:
        for c in ("prompt", "prompt_long", "prompt_short"):
            n = _norm(r.get(c))
            if n:
                prompts.setdefault(n, r["key"])
    ekeys = [r["key"] for r in rows if emb and r["key"] in emb]
    E = np.stack([emb[k] for k in ekeys]).astype(np.float32) if ekeys else np.zeros((0, 1), np.float32)
    return {"keys": {r["key"] for r in rows}, "sha": sha, "prompts": prompts, "emb": E, "emb_keys": ekeys}


def build_exclusions(out: str, version: str, rows: list[dict], emb: dict[str, np.ndarray] | None,
                     threshold: float, progress: bool = False) -> dict:
    """Write `<out>/eval/benchmarks/<version>/exclude.parquet` for benchmark `rows` (with their
    embeddings {key: (D,) float32 L2-normalised}, or None for a prompt set without any); its summary."""
    vdir = holdout.version_dir(out, version)
    work = fs.join(vdir, "_work", uuid.uuid4().hex[:12])
    bench = benchmark_side(rows, emb)
    parts = manifest.list_parts(out)
    res = run_tasks(_part_matches, parts, kwargs={"out": out, "work": work, "bench": bench, "threshold": threshold},
                    desc="hold-out search", progress=progress)
    tables = [fs.read_parquet(r["piece"]) for r in res if r["piece"]]
    # Rows of a published prompt set (MJHQ, COCO) are not manifest rows: listed all the same.
    found = set()
    for tb in tables:
        found.update(tb.column("key").to_pylist())
    extra = sorted(bench["keys"] - found)
    if extra:
        tables.append(pa.table({"key": extra, "reason": ["benchmark"] * len(extra), "benchmark_key": extra,
                                "similarity": pa.array([None] * len(extra), pa.float32())}, schema=SCHEMA))
    table = pa.concat_tables(tables).sort_by("key") if tables else SCHEMA.empty_table()
    fs.write_parquet(holdout.exclude_uri(out, version), table)
    fs.delete_dir(fs.join(vdir, "_work"))
    counts = {r: sum(x["counts"][r] for x in res) for r in holdout.REASONS}
    counts["benchmark"] = len(bench["keys"])
    return {"held_out": table.num_rows, "by_reason": counts, "threshold": threshold,
            "rows_searched": sum(x["rows"] for x in res), "embeddings_searched": sum(x["embeddings_searched"] for x in res),
            "benchmark_embeddings": len(bench["emb_keys"]), "parts": len(parts), "nodes": _nodes(res)}


def _nodes(res):
    from common.partstage import nodes_of

    return nodes_of(res)

"""The exclusion list of a benchmark version: everything that must stay out of training.

A row of the manifest is held out when it
- is a benchmark row (`benchmark`);
- has the sha256 of a benchmark image (`same_sha256`): byte-identical copies under other URLs;
- has a CLIP image embedding within cosine `eval.leak_threshold` of a benchmark image
  (`near_duplicate`): resized / re-encoded / lightly edited copies. For MJHQ-30K / COCO-30K the
  reference images are embedded with the same CLIP (eval.sources.reference_clip_embeddings). Searched exhaustively against
  EVERY row that has an embedding (not only within a dedup cluster, and not only rows selected
  today, so a later re-tuned select cannot bring one back);
- has any caption (caption, caption_short, caption_long) equal to a benchmark prompt, compared
  lower-cased with collapsed whitespace (`same_prompt`): the model must not have seen the text.

One Ray task per manifest part (_sigma.partstage.run_tasks) reads the part's columns and
embeddings, compares them with the benchmark (its embeddings (B, D) float32, sha256s and prompts
are shipped once through the object store) in blocks of rows, and writes its matches as a piece;
the driver never loads the manifest's embeddings, it concatenates the pieces (O(held-out rows))
into `exclude.parquet` (_sigma.holdout is the reader).
"""
from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa

from _sigma import fs, holdout, manifest
from _sigma.partstage import run_tasks

STATE_KEY = holdout.STATE_KEY  # parquet footer: {part: part_state} of the parts already searched
BLOCK = 1024  # manifest rows per similarity block: (1024, B) float32 scores (~120 MB at B = 30K)
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
        if emb.shape[1] != E.shape[1]:  # not the same CLIP: cosines would be meaningless
            raise ValueError(f"{manifest.embeddings_uri(out, part)}: {emb.shape[1]}-d embeddings, the benchmark's are "
                             f"{E.shape[1]}-d (computed with another CLIP than score.clip_model; rerun the score stage)")
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


part_state = holdout.part_state  # the part's sha256 + size and its embeddings' size (_sigma.holdout)


def _previous(out: str, version: str) -> tuple[pa.Table | None, dict]:
    uri = holdout.exclude_uri(out, version)
    if not fs.isfile(uri):
        return None, {}
    return fs.read_parquet(uri).replace_schema_metadata(None), holdout.recorded_states(out, version)


def _merge(tables: list[pa.Table]) -> pa.Table:
    """One row per key; reasons of a key found several times are joined (first benchmark_key kept)."""
    rows: dict[str, dict] = {}
    for t in tables:
        for r in t.to_pylist():
            cur = rows.setdefault(r["key"], dict(r, reason=""))
            reasons = [x for x in (cur["reason"] + ";" + (r["reason"] or "")).split(";") if x]
            cur["reason"] = ";".join(x for x in holdout.REASONS if x in reasons)
    keys = sorted(rows)
    return pa.table({"key": keys, "reason": [rows[k]["reason"] for k in keys],
                     "benchmark_key": [rows[k]["benchmark_key"] for k in keys],
                     "similarity": pa.array([rows[k]["similarity"] for k in keys], pa.float32())}, schema=SCHEMA)


def update_exclusions(out: str, version: str, rows: list[dict], emb_fn, threshold: float,
                      progress: bool = False) -> dict:
    """Write or refresh `<out>/eval/benchmarks/<version>/exclude.parquet` for benchmark `rows`.

    Searches every manifest part whose state (part_state) differs from the one recorded at the
    last search, so parts added or rewritten after the benchmark was built are checked too; the
    list only grows (a key once held out stays held out). `emb_fn()` -> {key: (D,) float32
    L2-normalised} of the benchmark rows, or None for a prompt set without embeddings; only
    called when some part needs a search."""
    import json

    vdir = holdout.version_dir(out, version)
    old, searched = _previous(out, version)
    states = {p: part_state(out, p) for p in manifest.list_parts(out)}
    todo = [p for p, st in states.items() if searched.get(p) != st]
    if old is not None and not todo:
        return _summary(old, threshold, states, [], unchanged=True)
    work = fs.join(vdir, "_work", uuid.uuid4().hex[:12])
    bench = benchmark_side(rows, emb_fn() if todo else None)
    res = run_tasks(_part_matches, todo, kwargs={"out": out, "work": work, "bench": bench, "threshold": threshold},
                    desc="hold-out search", progress=progress)
    tables = ([old] if old is not None else []) + [fs.read_parquet(r["piece"]) for r in res if r["piece"]]
    # Rows of a published prompt set (MJHQ, COCO) are not manifest rows: listed all the same.
    tables.append(pa.table({"key": sorted(bench["keys"]), "reason": ["benchmark"] * len(bench["keys"]),
                            "benchmark_key": sorted(bench["keys"]),
                            "similarity": pa.array([None] * len(bench["keys"]), pa.float32())}, schema=SCHEMA))
    table = _merge(tables)
    searched.update({p: states[p] for p in todo})
    meta = {STATE_KEY: json.dumps(searched).encode()}
    fs.write_parquet(holdout.exclude_uri(out, version), table.replace_schema_metadata(meta))
    fs.delete_dir(fs.join(vdir, "_work"))
    s = _summary(table, threshold, states, res)
    s["benchmark_embeddings"] = len(bench["emb_keys"])
    return s


def _summary(table: pa.Table, threshold: float, states: dict, res: list[dict], unchanged: bool = False) -> dict:
    from _sigma.partstage import nodes_of

    counts = {r: 0 for r in holdout.REASONS}
    for reason in table.column("reason").to_pylist():
        for r in (reason or "").split(";"):
            if r:
                counts[r] += 1
    return {"held_out": table.num_rows, "by_reason": counts, "threshold": threshold, "parts": len(states),
            "parts_searched": len(res), "rows_searched": sum(x["rows"] for x in res),
            "embeddings_searched": sum(x["embeddings_searched"] for x in res), "nodes": nodes_of(res),
            "unchanged": unchanged}

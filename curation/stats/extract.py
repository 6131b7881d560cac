"""Resumable noun extraction over the manifest: `<output>/stats/nouns/part-NNNNN.parquet`.

Stage IO is _sigma.partstage: per manifest part a plan task computes the texts to tag
(`nouns.caption_rows`) and hashes them together with the extraction settings (spaCy model +
version, POS set, max_chars). A part whose noun file carries the same fingerprint is skipped; the
others are read again on the workers (`_read_texts`), tagged by spaCy actors on Ray Data, and each
part's noun file is written by a commit task on a worker, atomically (one PUT on object stores),
with the fingerprint and its row / error counts in the parquet footer. The driver sees counts
only. A killed run therefore resumes at part granularity. The SQL (curation/sql) reads the
per-part files directly: there is no assembled table to rebuild.
"""
from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from _sigma import fs, manifest
from _sigma.config import fingerprint
from curation.stats.nouns import KINDS, NOUN_SCHEMA, SOURCE_COLUMNS, NounTagger, caption_rows

STATS_DIR = "stats"
NOUNS_DIR = "nouns"
STAGE = "stats"
_META = b"sigma.stats"


def nouns_dir(out: str) -> str:
    return fs.join(fs.normalize(out), STATS_DIR, NOUNS_DIR)


def nouns_uri(out: str, part: int) -> str:
    return fs.join(nouns_dir(out), f"part-{part:05d}.parquet")


def settings_fingerprint(scfg) -> str:
    """Everything that changes the nouns of a given text (not workers/batch sizes)."""
    import spacy

    try:
        model_version = spacy.util.get_package_version(scfg.spacy_model)
    except Exception:  # noqa: BLE001 - a local folder model has no package version
        model_version = None
    return fingerprint({"model": scfg.spacy_model, "model_version": model_version, "spacy": spacy.__version__,
                        "pos": sorted(scfg.pos), "max_chars": scfg.max_chars, "rules": 1})


def texts_fingerprint(texts: pa.Table, settings_fp: str) -> str:
    h = hashlib.sha256(settings_fp.encode())
    for k, kind, t in zip(*(texts.column(c).to_pylist() for c in ("key", "kind", "text"))):
        h.update(f"{k}\x1f{kind}\x1f{t}\x1e".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def read_meta(out: str, part: int) -> dict:
    """{fp, rows, errors} recorded in a part's noun file ({} when absent or unreadable: redone)."""
    try:
        meta = fs.read_parquet_schema(nouns_uri(out, part)).metadata or {}
        return json.loads(meta.get(_META, b"{}"))
    except Exception:  # noqa: BLE001 - a missing, torn or foreign file is simply redone
        return {}


def part_texts(out: str, part: int) -> pa.Table:
    return caption_rows(manifest.read_part(out, part, list(SOURCE_COLUMNS)))


def plan_part(part: int, out: str, settings_fp: str) -> dict:
    """Plan task: the part's text count and fingerprint, and whether its noun file is current."""
    texts = part_texts(out, part)
    fp = texts_fingerprint(texts, settings_fp)
    meta = read_meta(out, part)
    return {"part": part, "n": texts.num_rows, "fp": fp, "cached": meta.get("fp") == fp,
            "rows": meta.get("rows", 0), "errors": meta.get("errors", 0)}


def _read_texts(item: dict):
    """flat_map step: the (key, kind, text) rows of one part, tagged with the part."""
    for r in part_texts(item["out"], item["part"]).to_pylist():
        yield {"_part": item["part"], **r}


def _sorted(table: pa.Table) -> pa.Table:
    """Deterministic row order inside a part: by kind (KINDS order), then key."""
    order = {k: i for i, k in enumerate(KINDS)}
    rank = pa.array([order.get(k, len(KINDS)) for k in table.column("kind").to_pylist()], pa.int32())
    return table.append_column("_r", rank).sort_by([("_r", "ascending"), ("key", "ascending")]).drop_columns(["_r"])


def commit_part(part: int, table: pa.Table | None, out: str, fps: dict) -> dict:
    """Commit task (on a worker): the part's noun rows, sorted, written atomically with their
    fingerprint and counts in the footer."""
    t = NOUN_SCHEMA.empty_table() if table is None else _sorted(table.select(NOUN_SCHEMA.names).cast(NOUN_SCHEMA))
    errors = t.num_rows - t.column("error").null_count
    meta = {"fp": fps[part], "rows": t.num_rows, "errors": errors}
    fs.write_parquet(nouns_uri(out, part), t.replace_schema_metadata({_META: json.dumps(meta).encode()}))
    return {"rows": t.num_rows, "errors": errors}


def nouns_dataset(out: str):
    """The noun rows of the manifest's parts as a lazy pyarrow dataset (or an empty table) for DuckDB."""
    import pyarrow.dataset as pads

    files = [u for u in (nouns_uri(out, p) for p in manifest.list_parts(out)) if fs.exists(u)]
    if not files:
        return NOUN_SCHEMA.empty_table()
    fsys, _ = fs.resolve(files[0])
    return pads.dataset([fs.resolve(f)[1] for f in files], schema=NOUN_SCHEMA, filesystem=fsys, format="parquet")


def extract_nouns(cfg, out: str, progress: bool = True) -> dict:
    """Bring stats/nouns/ up to date with the manifest; returns counts."""
    import ray

    from _sigma.config import Resources
    from _sigma.partstage import commit_groups, nodes_of, run_tasks
    from _sigma.raystage import init_ray, map_stage

    out, scfg = fs.normalize(out), cfg.stats
    init_ray(getattr(cfg, "ray", None))
    parts = manifest.list_parts(out)
    plans = run_tasks(plan_part, parts, kwargs={"out": out, "settings_fp": settings_fingerprint(scfg)},
                      desc="caption nouns plan", progress=progress)
    todo = [p for p in plans if not p["cached"]]
    expected, fps = {p["part"]: p["n"] for p in todo}, {p["part"]: p["fp"] for p in todo}
    busy = [p for p, n in expected.items() if n]
    ds = None
    if busy:
        ds = ray.data.from_items([{"out": out, "part": p} for p in busy], override_num_blocks=len(busy))
        ds = ds.flat_map(_read_texts)
        # The spaCy actors never take every CPU: the read and piece-writing tasks need a slot too
        # (an actor pool holding all CPUs of a 2-core machine would wait forever for its input).
        room = max(1, int((ray.cluster_resources().get("CPU", 1) - 0.5) // scfg.num_cpus))
        res = Resources(batch_size=scfg.batch_size, actors=min(scfg.workers, sum(expected.values()), room),
                        num_cpus=scfg.num_cpus)
        ds = map_stage(ds, NounTagger, res, constructor_kwargs={
            "spacy_model": scfg.spacy_model, "pos": tuple(scfg.pos), "max_chars": scfg.max_chars,
            "pipe_batch": scfg.batch_size})
    done = commit_groups(ds, expected, commit_part, out=out, stage=STAGE, kwargs={"out": out, "fps": fps},
                         desc="caption nouns", progress=progress)
    keep = {fs.basename(nouns_uri(out, p)) for p in parts}  # files of parts no longer in the manifest
    for name in fs.listdir(nouns_dir(out)):
        if name not in keep:
            fs.delete(fs.join(nouns_dir(out), name))
    rows = sum(done[p["part"]]["rows"] if p["part"] in done else p["rows"] for p in plans)
    errors = sum(done[p["part"]]["errors"] if p["part"] in done else p["errors"] for p in plans)
    return {"parts": len(parts), "parts_skipped": len(plans) - len(todo), "captions_tagged": sum(expected.values()),
            "noun_rows": rows, "tag_errors": errors, "path": nouns_dir(out),
            "nodes": nodes_of(list(plans) + list(done.values()))}

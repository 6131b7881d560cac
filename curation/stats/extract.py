"""Resumable noun extraction over the manifest: `<output>/stats/caption_nouns.parquet`.

Per manifest part, the texts to tag (`nouns.caption_rows`) are hashed together with the extraction
settings (spaCy model + version, POS set, max_chars). A part whose cache file
`stats/nouns/part-NNNNN.parquet` carries the same fingerprint is skipped; the others go through
spaCy actors on Ray Data in rounds of at most `chunk_rows` captions (bounded driver memory), and each
part is committed atomically as soon as all its rows are back. A killed run therefore resumes at
part granularity. `caption_nouns.parquet` is then rebuilt (streamed, atomic) only when the set of
part fingerprints changed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common import manifest
from common.config import fingerprint
from curation.stats.nouns import KINDS, NOUN_SCHEMA, NounTagger, caption_rows

STATS_DIR = "stats"
NOUNS_FILE = "caption_nouns.parquet"
CACHE_DIR = "nouns"
_META = b"sigma.stats"


def nouns_path(out: Path) -> Path:
    return Path(out) / STATS_DIR / NOUNS_FILE


def cache_path(out: Path, part: int) -> Path:
    return Path(out) / STATS_DIR / CACHE_DIR / f"part-{part:05d}.parquet"


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


def _read_fp(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta.get(_META, b"{}")).get("fp")
    except Exception:  # noqa: BLE001 - a torn/foreign file is simply redone
        return None


def _write_atomic(table: pa.Table, target: Path, fp: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    pq.write_table(table.replace_schema_metadata({_META: json.dumps({"fp": fp}).encode()}), tmp, compression="zstd")
    os.replace(tmp, target)


def _sorted(table: pa.Table) -> pa.Table:
    """Deterministic row order inside a part: by kind (KINDS order), then key."""
    order = {k: i for i, k in enumerate(KINDS)}
    rank = pa.array([order.get(k, len(KINDS)) for k in table.column("kind").to_pylist()], pa.int32())
    return table.append_column("_r", rank).sort_by([("_r", "ascending"), ("key", "ascending")]).drop_columns(["_r"])


def _run_round(pending: list[tuple[int, pa.Table, str]], out: Path, scfg, ray_cfg, progress: bool) -> int:
    """Tag one round of parts on Ray Data (actor pool of spaCy taggers); commit each part as it completes."""
    from common.raystage import PART_COL, collect_by_part, init_ray, map_stage
    from curation.config import Resources

    init_ray(ray_cfg)
    import ray
    from ray.data import DataContext

    if not progress:
        DataContext.get_current().enable_progress_bars = False

    blocks, expected, fps = [], {}, {}
    for part, texts, fp in pending:
        expected[part], fps[part] = texts.num_rows, fp
        t = texts.append_column(PART_COL, pa.array([part] * texts.num_rows, pa.int32()))
        # Blocks of one batch each, so the actor pool gets work in parallel even from a single part.
        blocks += [t.slice(i, scfg.batch_size) for i in range(0, t.num_rows, scfg.batch_size)]
    ds = ray.data.from_arrow(blocks)
    res = Resources(batch_size=scfg.batch_size, actors=min(scfg.workers, len(blocks)), num_cpus=scfg.num_cpus)
    ds = map_stage(ds, NounTagger, res, constructor_kwargs={
        "spacy_model": scfg.spacy_model, "pos": tuple(scfg.pos), "max_chars": scfg.max_chars,
        "pipe_batch": scfg.batch_size})

    def on_part(part: int, table: pa.Table) -> None:
        _write_atomic(_sorted(table.select(NOUN_SCHEMA.names).cast(NOUN_SCHEMA)), cache_path(out, part), fps[part])

    collect_by_part(ds, expected, on_part, desc="caption nouns", progress=progress)
    return sum(expected.values())


def extract_nouns(cfg, out: Path, progress: bool = True) -> dict:
    """Bring stats/caption_nouns.parquet up to date with the manifest; returns counts."""
    out = Path(out)
    scfg = cfg.stats
    settings_fp = settings_fingerprint(scfg)
    parts = manifest.list_parts(out)
    part_fps: dict[int, str] = {}
    pending: list[tuple[int, pa.Table, str]] = []
    n_pending = tagged = skipped = 0
    for p in parts:
        texts = caption_rows(manifest.read_part(out, p))
        fp = texts_fingerprint(texts, settings_fp)
        part_fps[p] = fp
        if _read_fp(cache_path(out, p)) == fp:
            skipped += 1
            continue
        if texts.num_rows == 0:
            _write_atomic(NOUN_SCHEMA.empty_table(), cache_path(out, p), fp)
            continue
        pending.append((p, texts, fp))
        n_pending += texts.num_rows
        if n_pending >= scfg.chunk_rows:
            tagged += _run_round(pending, out, scfg, cfg.ray, progress)
            pending, n_pending = [], 0
    if pending:
        tagged += _run_round(pending, out, scfg, cfg.ray, progress)

    # Assemble the one table the SQL reads, only when some part changed.
    target = nouns_path(out)
    all_fp = hashlib.sha256(json.dumps(sorted(part_fps.items())).encode()).hexdigest()[:16]
    rows = errors = 0
    if _read_fp(target) != all_fp:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        schema = NOUN_SCHEMA.with_metadata({_META: json.dumps({"fp": all_fp}).encode()})
        with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
            for p in parts:
                t = pq.read_table(cache_path(out, p)).select(NOUN_SCHEMA.names).cast(NOUN_SCHEMA)
                errors += t.num_rows - t.column("error").null_count
                rows += t.num_rows
                w.write_table(t.replace_schema_metadata(schema.metadata))
        os.replace(tmp, target)
        rebuilt = True
    else:
        err = pq.read_table(target, columns=["error"]).column("error")
        rows, errors, rebuilt = len(err), len(err) - err.null_count, False
    return {"parts": len(parts), "parts_skipped": skipped, "captions_tagged": tagged, "noun_rows": rows,
            "tag_errors": errors, "rebuilt": rebuilt, "path": str(target)}

"""The eval hold-out: which keys must never enter a training shard (reader; eval builds the lists).

Layout (written by eval.build_benchmark / the `eval_split` stage, one folder per benchmark version):
  <out>/eval/benchmarks/<version>/exclude.parquet   key (str), reason (str: ';'-joined of
      `benchmark`, `same_sha256`, `near_duplicate`, `same_prompt`), plus benchmark_key and
      similarity (the benchmark row it matches and their cosine, for audits)
  <out>/eval/benchmarks/<version>/benchmark.parquet, benchmark.json   (eval's own files)
exclude.parquet is written before the benchmark files, so a version that exists at all is held out.

The features stage excludes the UNION over every version kept under the output: building a new
version never returns an older version's keys to training. Deleting a version folder is the only
way to release its keys.

What a list was computed over: its parquet footer (`sigma.searched`) maps every manifest part it
searched to that part's state at the time (`part_state`: the part file's sha256 and size from its
integrity record `manifest/_sums/part-NNNNN.json`, and the size of its CLIP embeddings file). A list
whose recorded states differ from the current ones (a part added, or rewritten, after the last
search) does not cover the manifest: `check_current` raises StaleHoldoutError naming the version
and the parts, and the features stage calls it before planning, so a grown manifest never reaches
a shard unsearched (eval_split searches the new parts; eval.score extends the list itself). The
check reads only the small integrity records and footers, never rows.
"""
from __future__ import annotations

import json

from _sigma import fs, manifest

EVAL_DIR = "eval"
BENCHMARKS = "benchmarks"
EXCLUDE = "exclude.parquet"
REASONS = ("benchmark", "same_sha256", "near_duplicate", "same_prompt")
STATE_KEY = b"sigma.searched"  # exclude.parquet footer: {part: part_state} of the parts searched


class StaleHoldoutError(RuntimeError):
    """A benchmark's exclusion list was computed over fewer / other manifest parts than exist now."""


def benchmarks_root(out: str) -> str:
    return fs.join(fs.normalize(out), EVAL_DIR, BENCHMARKS)


def version_dir(out: str, version: str) -> str:
    return fs.join(benchmarks_root(out), version)


def exclude_uri(out: str, version: str) -> str:
    return fs.join(version_dir(out, version), EXCLUDE)


def versions(out: str) -> list[str]:
    """Benchmark versions that hold an exclusion list, sorted by name."""
    root = benchmarks_root(out)
    return [v for v in fs.listdir(root) if not v.startswith((".", "_")) and fs.isfile(exclude_uri(out, v))]


def version_keys(out: str, version: str) -> set[str]:
    """Keys held out by one benchmark version."""
    t = fs.read_parquet(exclude_uri(out, version), columns=["key"])
    return {k for k in t.column("key").to_pylist() if k is not None}


def excluded_keys(out: str) -> set[str]:
    """Union of the exclusion lists of every benchmark version kept under `out` (empty if none)."""
    keys: set[str] = set()
    for v in versions(out):
        keys |= version_keys(out, v)
    return keys


def part_state(out: str, part: int) -> dict:
    """What a part's search depends on: the manifest part's sha256 + size (its integrity record,
    written with the part; hashed from the bytes when a legacy part has none) and the size of its
    embeddings file (the score stage rewrites both together)."""
    import hashlib

    try:
        rec = fs.read_json(manifest.sums_uri(out, part))
        sha, size = rec["sha256"], rec["size"]
    except (OSError, ValueError, KeyError, TypeError):
        data = fs.read_bytes(manifest.part_uri(out, part))
        sha, size = hashlib.sha256(data).hexdigest(), len(data)
    emb = manifest.embeddings_uri(out, part)
    return {"sha256": sha, "size": size, "embeddings_bytes": fs.size(emb) if fs.exists(emb) else 0}


def recorded_states(out: str, version: str) -> dict[int, dict]:
    """{part: state} recorded in the footer of a version's exclusion list ({} when absent)."""
    uri = exclude_uri(out, version)
    if not fs.isfile(uri):
        return {}
    meta = fs.read_parquet_schema(uri).metadata or {}
    return {int(k): v for k, v in json.loads(meta.get(STATE_KEY, b"{}")).items()}


def stale_parts(out: str, version: str, states: dict[int, dict] | None = None) -> list[int]:
    """Manifest parts whose current state is not the one the version's list was computed over."""
    states = states if states is not None else {p: part_state(out, p) for p in manifest.list_parts(out)}
    seen = recorded_states(out, version)
    return sorted(p for p, st in states.items() if seen.get(p) != st)


def check_current(out: str) -> dict:
    """Raise StaleHoldoutError unless every version's list covers every current manifest part;
    else {version: parts covered}."""
    vs = versions(out)
    if not vs:
        return {}
    states = {p: part_state(out, p) for p in manifest.list_parts(out)}
    bad = {v: stale_parts(out, v, states) for v in vs}
    bad = {v: ps for v, ps in bad.items() if ps}
    if bad:
        desc = "; ".join(f"{v}: parts {ps[:8]}{' ...' if len(ps) > 8 else ''} ({len(ps)})" for v, ps in bad.items())
        raise StaleHoldoutError(
            f"the eval hold-out does not cover the current manifest (parts added or rewritten after the last "
            f"search: {desc}); their rows could be copies of benchmark images. Run the eval_split stage first "
            f"(python -m curation.run ... --stages eval_split, or python -m eval.build_benchmark with the "
            f"benchmark's config): it searches only those parts")
    return {v: len(states) for v in vs}

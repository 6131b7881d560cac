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
"""
from __future__ import annotations

from _sigma import fs

EVAL_DIR = "eval"
BENCHMARKS = "benchmarks"
EXCLUDE = "exclude.parquet"
REASONS = ("benchmark", "same_sha256", "near_duplicate", "same_prompt")


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

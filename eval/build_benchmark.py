"""`python -m eval.build_benchmark --config pipelines.yaml --pipeline NAME`: the eval benchmark.

From the curated manifest, choose `eval.n` (image, prompt) pairs the way PixArt-Sigma's internal
30K set is described (high aesthetic, both captions), and make the choice reproducible and leak-free:

1. eligible rows: status ok, selected (when the select stage ran), aesthetic scored, a long AND a
   short caption, a CLIP image embedding, and not already in a training shard;
2. high aesthetic: `aesthetic >= eval.aesthetic_min`, or the `eval.aesthetic_quantile` of eligible rows;
3. strata = aspect bucket (nearest PixArt ratio key) x caption-length bin (quantiles of prompt words);
   each stratum gets a share of N proportional to its size (largest remainder);
4. inside a stratum rows are drawn in the order of sha256(seed:key) -- independent of part order
   or row order, so the same manifest always gives the same draw;
5. greedy acceptance in that order: no prompt seen before (case/space-normalised), no CLIP
   cosine >= eval.dedup_threshold to an accepted row; strata short of rows are filled afterwards.

Outputs (atomic), all under <output>/eval/:
  benchmark/<version>/benchmark.parquet   key, prompt, prompt_long, prompt_short, image, sha256,
                                          aesthetic, bucket, width, height, length_bin, clip_tokens
  benchmark/<version>/benchmark.json      checksum (sha256 of the canonical rows), counts,
                                          selection config, prompt-length distribution
  benchmark_keys.txt                      one key per line: the features stage's `exclude_keys`
A version is immutable: rebuilding verifies the existing one (checksum, no key in the training
shards) instead of redrawing; --force redraws (the draw itself is deterministic: same manifest,
same config -> same checksum).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from eval.clipscore import clip_token_counts, length_summary
from eval.stratify import load_candidates, nearest_bucket, normalise_prompt, quotas, select  # noqa: F401

FORMAT = "sigma-eval-benchmark/1"
EVAL_DIR = "eval"
KEYS_FILE = "benchmark_keys.txt"
COLUMNS = ["key", "prompt", "prompt_long", "prompt_short", "image", "sha256", "aesthetic", "bucket",
           "width", "height", "length_bin", "clip_tokens"]


def benchmark_dir(out: Path, version: str) -> Path:
    return Path(out) / EVAL_DIR / "benchmark" / version


def keys_path(out: Path) -> Path:
    return Path(out) / EVAL_DIR / KEYS_FILE


def training_shard_keys(out: Path) -> set[str]:
    """Keys already in any training shard (<output>/shards/*/shard-*.tar): tar headers only."""
    keys: set[str] = set()
    for tar in sorted((Path(out) / "shards").glob("*/shard-*.tar")):
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                if m.isfile():
                    keys.add(m.name.rsplit("/", 1)[-1].partition(".")[0])
    return keys


def checksum(rows: list[dict]) -> str:
    """sha256 over the canonical JSON lines of the benchmark rows (sorted by key)."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["key"]):
        h.update(json.dumps({c: r.get(c) for c in COLUMNS}, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_benchmark(out: Path, version: str, rows: list[dict], info: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = benchmark_dir(out, version)
    d.mkdir(parents=True, exist_ok=True)
    table = pa.table({c: pa.array([r.get(c) for r in rows],
                                  type={"aesthetic": pa.float64(), "width": pa.int64(), "height": pa.int64(),
                                        "length_bin": pa.int32(), "clip_tokens": pa.int32()}.get(c, pa.string()))
                      for c in COLUMNS})
    tmp = d / f".benchmark.parquet.tmp{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, d / "benchmark.parquet")
    _atomic_text(d / "benchmark.json", json.dumps(info, indent=2, sort_keys=True))
    _atomic_text(keys_path(out), "".join(f"{r['key']}\n" for r in rows))


def read_benchmark(out: Path, version: str) -> tuple[list[dict], dict]:
    """(rows in benchmark order, info json). Raises if the checksum does not match the rows."""
    import pyarrow.parquet as pq

    d = benchmark_dir(out, version)
    if not (d / "benchmark.json").exists():
        raise FileNotFoundError(f"{d}: no benchmark (run python -m eval.build_benchmark first)")
    info = json.loads((d / "benchmark.json").read_text())
    rows = pq.read_table(d / "benchmark.parquet").to_pylist()
    if checksum(rows) != info["checksum"]:
        raise ValueError(f"{d}: benchmark.parquet does not match the checksum in benchmark.json")
    return rows, info


def build(cfg, force: bool = False) -> dict:
    """Build the benchmark of pipeline config `cfg` (or verify an existing version); its info dict.

    An existing version is never silently replaced: it is re-read, its checksum verified and its
    keys checked against the training shards (a leak is an error). Once features has run, the
    eligible set shrinks (training keys are excluded), so rebuilding would pick different rows;
    --force rebuilds anyway.
    """
    out, ecfg = Path(cfg.output), cfg.eval
    exclude = training_shard_keys(out)
    if (benchmark_dir(out, ecfg.version) / "benchmark.json").exists() and not force:
        rows, info = read_benchmark(out, ecfg.version)
        leaked = sorted({r["key"] for r in rows} & exclude)
        if leaked:
            raise RuntimeError(f"benchmark {ecfg.version}: {len(leaked)} keys are in training shards "
                               f"(e.g. {leaked[:3]}); rebuild the shards with features.exclude_keys = "
                               f"{keys_path(out)}")
        _atomic_text(keys_path(out), "".join(f"{r['key']}\n" for r in rows))
        return dict(info, unchanged=True)
    cand, counts = load_candidates(out, ecfg, exclude)
    chosen, sel = select(out, cand, ecfg)
    tok = None
    if chosen:
        from open_clip.tokenizer import SimpleTokenizer

        tok = SimpleTokenizer()
    long_counts = clip_token_counts([r["prompt_long"] for r in chosen], tok)
    short_counts = clip_token_counts([r["prompt_short"] for r in chosen], tok)
    prompt_counts = long_counts if ecfg.prompt == "caption_long" else short_counts
    for r, c in zip(chosen, prompt_counts):
        r["clip_tokens"] = int(c)
    buckets: dict[str, int] = {}
    for r in chosen:
        buckets[r["bucket"]] = buckets.get(r["bucket"], 0) + 1
    info = {
        "format": FORMAT, "version": ecfg.version, "checksum": checksum(chosen), "n": len(chosen),
        "n_requested": ecfg.n, "pipeline": getattr(cfg, "name", None),
        "selection": {"seed": ecfg.seed, "prompt": ecfg.prompt, "aesthetic_min": ecfg.aesthetic_min,
                      "aesthetic_quantile": ecfg.aesthetic_quantile, "dedup_threshold": ecfg.dedup_threshold,
                      "length_bins": ecfg.length_bins, **sel},
        "counts": dict(counts, excluded_training_keys=len(exclude)),
        "buckets": dict(sorted(buckets.items(), key=lambda kv: float(kv[0]))),
        "prompt_clip_tokens": {"prompt": length_summary(prompt_counts), "long": length_summary(long_counts),
                               "short": length_summary(short_counts)},
        "prompt_words": length_summary(np.array([len(r["prompt"].split()) for r in chosen], dtype=np.int64)),
    }
    if not chosen:
        hint = (" (every eligible row is already in a training shard: build the benchmark BEFORE the "
                "features stage, which then skips its keys via features.exclude_keys)"
                if counts["ineligible"].get("in_training_shards") else "")
        raise RuntimeError(f"no eligible benchmark rows: {counts}{hint}")
    if len(chosen) < ecfg.n:
        print(f"[eval.build_benchmark] warning: only {len(chosen)} of {ecfg.n} pairs could be chosen", flush=True)
    write_benchmark(out, ecfg.version, [{c: r.get(c) for c in COLUMNS} for r in chosen], info)
    return info


def summary_text(info: dict) -> str:
    p = info["prompt_clip_tokens"]
    lines = [f"benchmark {info['version']}: {info['n']} pairs (requested {info['n_requested']}), "
             f"checksum {info['checksum']}",
             f"  eligible {info['counts']['eligible']} of {info['counts']['manifest_rows']} manifest rows; "
             f"ineligible {info['counts']['ineligible']}; aesthetic cut {info['selection'].get('aesthetic_cut')}",
             f"  buckets {info['buckets']}"]
    for name in ("long", "short"):
        s = p[name]
        if s["n"]:
            lines.append(f"  {name} captions, CLIP tokens: median {s['percentiles']['p50']:.0f}, "
                         f"p95 {s['percentiles']['p95']:.0f}, max {s['percentiles']['max']:.0f}; "
                         f"over 77 tokens: {s['over_context']} ({100 * s['frac_over_context']:.1f} %)")
            lines.append(f"    histogram {s['histogram']}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    from common.config import save_resolved
    from curation.config import load_pipeline

    ap = argparse.ArgumentParser(description="Build the eval benchmark from a curated manifest.")
    ap.add_argument("--config", default="pipelines.yaml")
    ap.add_argument("--pipeline", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    ap.add_argument("--force", action="store_true", help="overwrite an existing version with a different selection")
    args = ap.parse_args(argv)
    cfg = load_pipeline(args.config, args.pipeline, args.overrides, check=False)
    save_resolved(cfg, cfg.output)
    info = build(cfg, force=args.force)
    print(summary_text(info) + (" (unchanged)" if info.get("unchanged") else ""), flush=True)
    print(f"  keys for features.exclude_keys: {keys_path(Path(cfg.output))}", flush=True)
    return info


if __name__ == "__main__":
    main()

"""The eval benchmark and its hold-out list: the `eval_split` stage of curation.run (between caption
and features), also `python -m eval.build_benchmark --config pipelines.yaml --pipeline NAME`.

Prompt sets (`eval.benchmark`): `ours` draws `eval.n` (image, prompt) pairs from the curated
manifest the way PixArt-Sigma's internal 30K set is described (high aesthetic, both captions; see
eval.stratify for the draw); `mjhq-30k` / `coco-30k` read a published set (eval.sources).

Every version is immutable and lives in `<out>/eval/benchmarks/<label>-<fp>/` where fp is the
fingerprint of the selection settings (EvalConfig.selection): a changed config builds a NEW
version beside the old one, the same config finds and verifies the existing one. Files, in the
order written (the last one marks the version complete):
  exclude.parquet   what training must never see (eval.leaks; read by _sigma.holdout for features)
  benchmark.parquet key, prompt, prompt_long, prompt_short, image, sha256, aesthetic, bucket,
                    width, height, length_bin, clip_tokens, category
  benchmark.json    checksum (sha256 of the canonical rows), counts, the selection report
                    (aesthetic cut and its relaxation, rejections, why short), hold-out summary
Honest sizes: fewer pairs than `eval.n` is an error unless `eval.allow_smaller` / --allow-smaller.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from _sigma import fs, holdout
from _sigma.config import fingerprint
from _sigma.shards import shard_keys
from eval.clipscore import clip_token_counts, length_summary
from eval.stratify import length_bins

FORMAT = "sigma-eval-benchmark/2"
COLUMNS = ["key", "prompt", "prompt_long", "prompt_short", "image", "sha256", "aesthetic", "bucket",
           "width", "height", "length_bin", "clip_tokens", "category"]


class BenchmarkError(RuntimeError):
    """The benchmark cannot be built as configured (too few rows, ...): the message says why."""


def version_id(ecfg) -> str:
    return f"{ecfg.version}-{fingerprint({'format': FORMAT, **ecfg.selection()})[:8]}"


def benchmark_dir(out: str, version: str) -> str:
    return holdout.version_dir(out, version)


def checksum(rows: list[dict]) -> str:
    """sha256 over the canonical JSON lines of the benchmark rows (sorted by key)."""
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r["key"]):
        h.update(json.dumps({c: r.get(c) for c in COLUMNS}, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _table(rows: list[dict]):
    import pyarrow as pa

    types = {"aesthetic": pa.float64(), "width": pa.int64(), "height": pa.int64(), "length_bin": pa.int32(),
             "clip_tokens": pa.int32()}
    return pa.table({c: pa.array([r.get(c) for r in rows], type=types.get(c, pa.string())) for c in COLUMNS})


def read_benchmark(out: str, version: str) -> tuple[list[dict], dict]:
    """(rows sorted by key, info json). Raises if absent or if the checksum does not match."""
    d = benchmark_dir(out, version)
    if not fs.isfile(fs.join(d, "benchmark.json")):
        raise FileNotFoundError(f"{d}: no benchmark (run the eval_split stage or python -m eval.build_benchmark)")
    info = fs.read_json(fs.join(d, "benchmark.json"))
    rows = fs.read_parquet(fs.join(d, "benchmark.parquet")).to_pylist()
    if checksum(rows) != info["checksum"]:
        raise ValueError(f"{d}: benchmark.parquet does not match the checksum in benchmark.json")
    return rows, info


def current(cfg) -> tuple[str, list[dict], dict]:
    """(version, rows, info) of the benchmark that the pipeline's current eval config selects."""
    v = version_id(cfg.eval)
    rows, info = read_benchmark(cfg.out, v)
    return v, rows, info


def _draw_ours(out: str, ecfg, training: set[str], progress: bool) -> tuple[list[dict], dict, dict]:
    from eval.stratify import draw, load_candidates

    cand, counts = load_candidates(out, ecfg, training, progress)
    if counts["eligible"] < ecfg.n and not ecfg.allow_smaller:
        raise BenchmarkError(f"only {counts['eligible']} eligible rows for n = {ecfg.n} (ineligible: "
                             f"{counts['ineligible']}); curate more data, lower eval.n, or pass --allow-smaller"
                             + (" (rows already in training shards are never eligible: run the eval_split stage "
                                "BEFORE features)" if counts["ineligible"].get("in_training_shards") else ""))
    if counts["eligible"] == 0:
        raise BenchmarkError(f"no eligible benchmark rows: {counts}")
    chosen, sel = draw(out, cand, ecfg)
    for r in chosen:
        r["category"] = None
    return chosen, sel, counts


def _draw_source(ecfg) -> tuple[list[dict], dict, dict]:
    from eval.sources import load_source

    rows = load_source(ecfg)
    words = np.array([len(r["prompt"].split()) for r in rows], np.int64)
    lbin, edges = length_bins(words, ecfg.length_bins)
    for r, b in zip(rows, lbin):
        r["length_bin"] = int(b)
    cats: dict[str, int] = {}
    for r in rows:
        cats[str(r.get("category"))] = cats.get(str(r.get("category")), 0) + 1
    sel = {"source": ecfg.benchmark, "path": ecfg.benchmark_path, "length_bin_edges_words": [float(e) for e in edges],
           "categories": cats, "short_because": None if len(rows) >= ecfg.n else
           f"the {ecfg.benchmark} folder holds {len(rows)} usable prompts"}
    return rows, sel, {"source_rows": len(rows)}


def build(cfg, progress: bool = False) -> dict:
    """Build the benchmark + exclusion list of `cfg` (or verify the existing version); its info."""
    out, ecfg = cfg.out, cfg.eval
    vid = version_id(ecfg)
    d = benchmark_dir(out, vid)
    training = shard_keys(out)  # keys already in a training shard
    if fs.isfile(fs.join(d, "benchmark.json")):
        rows, info = read_benchmark(out, vid)
        if not fs.isfile(holdout.exclude_uri(out, vid)):
            raise BenchmarkError(f"{d}: benchmark without exclude.parquet (tampered?)")
        # the rows are fixed; parts added or rewritten since the last search are searched now
        return dict(info, unchanged=True, hold_out=_hold_out(out, vid, rows, ecfg, training, progress, cfg))
    if ecfg.benchmark == "ours":
        chosen, sel, counts = _draw_ours(out, ecfg, training, progress)
    else:
        chosen, sel, counts = _draw_source(ecfg)
    if len(chosen) < ecfg.n and not ecfg.allow_smaller:
        raise BenchmarkError(f"benchmark {vid}: {sel.get('short_because')}; pass --allow-smaller "
                             "(eval.allow_smaller: true) to build it anyway")
    if not chosen:
        raise BenchmarkError(f"benchmark {vid}: no rows ({sel.get('short_because')})")
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    long_counts = clip_token_counts([r["prompt_long"] for r in chosen], tok)
    short_counts = clip_token_counts([r["prompt_short"] for r in chosen], tok)
    prompt_counts = clip_token_counts([r["prompt"] for r in chosen], tok)
    for r, c in zip(chosen, prompt_counts):
        r["clip_tokens"] = int(c)
    rows = [{c: r.get(c) for c in COLUMNS} for r in sorted(chosen, key=lambda r: r["key"])]
    leaks_summary = _hold_out(out, vid, rows, ecfg, training, progress, cfg)
    buckets: dict[str, int] = {}
    for r in rows:
        buckets[r["bucket"]] = buckets.get(r["bucket"], 0) + 1
    info = {
        "format": FORMAT, "version": vid, "label": ecfg.version, "fingerprint": vid.rsplit("-", 1)[1],
        "checksum": checksum(rows), "n": len(rows), "n_requested": ecfg.n, "allow_smaller": ecfg.allow_smaller,
        "short": len(rows) < ecfg.n, "source": ecfg.benchmark, "pipeline": getattr(cfg, "name", None),
        "settings": ecfg.selection(), "selection": sel, "counts": dict(counts, training_shard_keys=len(training)),
        "hold_out": leaks_summary,
        "buckets": dict(sorted(buckets.items(), key=lambda kv: float(kv[0]))),
        "prompt_clip_tokens": {"prompt": length_summary(prompt_counts), "long": length_summary(long_counts),
                               "short": length_summary(short_counts)},
        "prompt_words": length_summary(np.array([len(r["prompt"].split()) for r in rows], dtype=np.int64)),
    }
    fs.write_parquet(fs.join(d, "benchmark.parquet"), _table(rows))
    fs.write_json(fs.join(d, "benchmark.json"), info, sort_keys=True)  # last: marks the version complete
    return info


def _hold_out(out, vid, rows, ecfg, training, progress, cfg=None) -> dict:
    from eval.leaks import update_exclusions
    from eval.stratify import fetch_pool

    def embeddings():  # the benchmark rows' CLIP embeddings: ours from the manifest, a published set's computed
        if ecfg.benchmark == "ours":
            return fetch_pool(out, [r["key"] for r in rows], ecfg.prompt)[1]
        from eval.sources import reference_clip_embeddings

        return reference_clip_embeddings(dataclasses.replace(cfg, output=out), vid, rows, progress)

    s = update_exclusions(out, vid, rows, embeddings, ecfg.leak_threshold, progress)
    leaked = sorted(holdout.version_keys(out, vid) & training)
    # Rows drawn now are never in shards, but their copies may already be (a version built after
    # features ran): rerunning features drops them; eval.score refuses until then.
    s["already_in_training_shards"] = len(leaked)
    s["already_in_training_shards_examples"] = leaked[:5]
    return s


def summary_text(info: dict) -> str:
    sel, h = info["selection"], info["hold_out"]
    lines = [f"benchmark {info['version']} ({info['source']}): {info['n']} pairs (requested {info['n_requested']}"
             f"{', SMALLER: ' + str(sel.get('short_because')) if info.get('short') else ''}), checksum {info['checksum'][:16]}"]
    if info["source"] == "ours":
        c = info["counts"]
        lines.append(f"  eligible {c['eligible']} of {c['manifest_rows']} manifest rows; ineligible {c['ineligible']}")
        lines.append(f"  aesthetic cut {sel['aesthetic_cut']} (preferred quantile {sel['aesthetic_preferred_quantile']}, "
                     f"used {sel['aesthetic_quantile_used']}{', relaxed to meet the size target' if sel['aesthetic_relaxed'] else ''}); "
                     f"rejected {sel['rejected']}")
    else:
        lines.append(f"  categories {sel.get('categories')}")
    lines.append(f"  held out of training: {h['held_out']} rows {h['by_reason']} (cosine >= {h['threshold']}; "
                 f"{h['parts_searched']} of {h['parts']} parts searched now, {h['embeddings_searched']} embeddings)")
    if h.get("already_in_training_shards"):
        lines.append(f"  WARNING: {h['already_in_training_shards']} held-out keys are already in training shards "
                     f"(e.g. {h['already_in_training_shards_examples']}): rerun the features stage before eval.score")
    lines.append(f"  buckets {info['buckets']}")
    for name in ("long", "short"):
        s = info["prompt_clip_tokens"][name]
        if s["n"]:
            lines.append(f"  {name} captions, CLIP tokens: median {s['percentiles']['p50']:.0f}, p95 "
                         f"{s['percentiles']['p95']:.0f}; over 77 tokens: {s['over_context']} "
                         f"({100 * s['frac_over_context']:.1f} %)")
    return "\n".join(lines)


def run_eval_split(cfg, out: str, progress: bool = True) -> dict:
    """The `eval_split` stage of curation.run: build (or verify) the configured benchmark version."""
    cfg = dataclasses.replace(cfg, output=out)
    info = build(cfg, progress)
    print(summary_text(info) + (" (unchanged)" if info.get("unchanged") else ""), flush=True)
    return {"version": info["version"], "n": info["n"], "held_out": info["hold_out"]["held_out"],
            "unchanged": bool(info.get("unchanged"))}


def main(argv=None) -> dict:
    from curation.config import pipeline_from_args
    from eval.cli import benchmark_parser

    args = benchmark_parser().parse_args(argv)
    cfg = pipeline_from_args(args, ["eval.allow_smaller=true"] if args.allow_smaller else [])
    info = build(cfg, progress=True)
    print(summary_text(info) + (" (unchanged)" if info.get("unchanged") else ""), flush=True)
    print(f"  hold-out list: {holdout.exclude_uri(cfg.out, info['version'])}", flush=True)
    return info


if __name__ == "__main__":  # = sigma-eval-...: checks first, library logs to <output>/logs
    from eval import cli

    raise SystemExit(cli.build_benchmark())

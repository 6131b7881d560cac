"""`python -m eval.score --config pipelines.yaml --pipeline NAME [--run RUN ...]`: FID + CLIP-Score.

For each generation run (<output>/eval/generations/<run>/, default: all of them):
- FID: torchmetrics FrechetInceptionDistance (eval.fid: pinned settings), real side = the cached
  reference statistics of the benchmark (eval.reference), fake side = the run's images through the
  same preprocess (resize policy, side) and extractor;
- CLIP-Score: 100 x cosine between the open_clip image embedding of each generated image and its
  prompt (77-token truncation; the truncated fraction is reported);
then writes <output>/eval/scores/<run>.json (numbers + the whole protocol + package versions) and
re-renders the markdown comparison of all scored runs (eval.report).
Missing or unreadable generated images are counted and listed, never fatal; the score is over the
images that exist, and the report shows how many that is.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eval import fid
from eval.build_benchmark import EVAL_DIR, read_benchmark
from eval.clipscore import CONTEXT, ClipScorer, clip_token_counts
from eval.generate import META, image_path, run_dir
from eval.reference import reference_stats

FORMAT = "sigma-eval-scores/1"


def scores_dir(out: Path) -> Path:
    return Path(out) / EVAL_DIR / "scores"


def versions() -> dict:
    import open_clip
    import torchmetrics

    return {"python": platform.python_version(), "torch": torch.__version__, "torchmetrics": torchmetrics.__version__,
            "open_clip": open_clip.__version__, "numpy": np.__version__, "pillow": __import__("PIL").__version__}


def list_runs(out: Path) -> list[str]:
    d = Path(out) / EVAL_DIR / "generations"
    return sorted(p.name for p in d.iterdir() if p.is_dir() and (p / META).exists()) if d.exists() else []


def _load_png(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB"), None
    except FileNotFoundError:
        return None, "missing"
    except Exception as e:  # noqa: BLE001 - unreadable file is a per-image reason
        return None, f"unreadable: {str(e)[:200]}"


def score_run(cfg, run: str, device: str = "cpu", progress: bool = True, clip: ClipScorer | None = None) -> dict:
    out, ecfg = Path(cfg.output), cfg.eval
    rows, info = read_benchmark(out, ecfg.version)
    d = run_dir(out, run)
    gen_meta = json.loads((d / META).read_text()) if (d / META).exists() else {}
    if gen_meta and gen_meta.get("benchmark_checksum") != info["checksum"]:
        raise RuntimeError(f"run {run} was generated for benchmark {gen_meta.get('benchmark_checksum', '?')[:12]}, "
                           f"not {info['checksum'][:12]}")
    t0 = time.time()
    ref, ref_meta, cached = reference_stats(cfg, device, progress)
    metric = fid.make_metric(ecfg, device)
    fid.set_stats(metric, ref, real=True)
    clip = clip or ClipScorer(ecfg.clip_model, ecfg.clip_pretrained, device)
    prompts = {r["key"]: r["prompt"] for r in rows}
    clip_scores, failed, used = [], [], 0
    bar = tqdm(total=len(rows), desc=f"score {run}", unit="img", disable=not progress, mininterval=1.0)
    bs = ecfg.fid_batch_size
    for s in range(0, len(rows), bs):
        imgs, keys = [], []
        for r in rows[s:s + bs]:
            img, err = _load_png(image_path(d, r["key"]))
            if img is None:
                failed.append({"key": r["key"], "reason": err})
            else:
                imgs.append(img)
                keys.append(r["key"])
        bar.update(len(rows[s:s + bs]))
        if not imgs:
            continue
        batch = torch.from_numpy(np.stack([fid.preprocess(im, ecfg.fid_size, ecfg.fid_resize) for im in imgs]))
        metric.update(batch.to(device), real=False)
        for c in range(0, len(imgs), ecfg.clip_batch_size):
            clip_scores.append(clip(imgs[c:c + ecfg.clip_batch_size], [prompts[k] for k in keys[c:c + ecfg.clip_batch_size]]))
        used += len(imgs)
    bar.close()
    fid_value = fid.compute_fid(metric) if used >= 2 and ref["n"] >= 2 else None
    cs = np.concatenate(clip_scores) if clip_scores else np.zeros(0)
    tokens = clip_token_counts([r["prompt"] for r in rows])
    result = {
        "format": FORMAT, "run": run, "scored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_benchmark": len(rows), "n_scored": used, "n_missing": len(failed), "missing": failed[:100],
        "fid": fid_value, "clip_score": float(cs.mean()) if len(cs) else None,
        "clip_score_std": float(cs.std()) if len(cs) else None,
        "prompts_over_77_tokens": int((tokens > CONTEXT).sum()),
        "prompts_truncated_frac": float((tokens > CONTEXT).mean()) if len(tokens) else 0.0,
        "protocol": {
            "benchmark_version": info["version"], "benchmark_checksum": info["checksum"],
            "prompt": ecfg.prompt, "fid_extractor": fid.extractor_id(ecfg),
            "fid_metric": "torchmetrics FrechetInceptionDistance(normalize=False, reset_real_features=False, "
                          "antialias=True), float64 sums",
            "fid_resize": ecfg.fid_resize, "fid_size": ecfg.fid_size, "fid_interpolation": "bicubic (PIL)",
            "reference_images": ref_meta.get("n_images"), "reference_failed": len(ref_meta.get("failed", [])),
            "reference_cache": ref_meta.get("cache_id"), "reference_from_cache": cached,
            "clip_model": ecfg.clip_model, "clip_pretrained": ecfg.clip_pretrained,
            "clip_score": "100 x cosine, no clamp, 77-token truncation",
            "generation": gen_meta.get("protocol", {}),
        },
        "versions": versions(), "seconds": round(time.time() - t0, 2),
    }
    sd = scores_dir(out)
    sd.mkdir(parents=True, exist_ok=True)
    tmp = sd / f".{run}.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, sd / f"{run}.json")
    return result


def main(argv=None) -> list[dict]:
    from common.config import save_resolved
    from curation.config import load_pipeline
    from eval.report import write_report

    ap = argparse.ArgumentParser(description="Score generation runs (FID, CLIP-Score) and write the report.")
    ap.add_argument("--config", default="pipelines.yaml")
    ap.add_argument("--pipeline", required=True)
    ap.add_argument("--run", action="append", default=[], help="generation run name (repeatable; default: all)")
    ap.add_argument("--stage", action="append", default=[],
                    help="runs of a training stage (<stage>-step-*, as eval.generate --stage names them)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cfg = load_pipeline(args.config, args.pipeline, args.overrides, check=False)
    save_resolved(cfg, cfg.output)
    out = Path(cfg.output)
    runs = list(args.run) + [r for r in list_runs(out) for st in args.stage if r == st or r.startswith(f"{st}-step-")]
    runs = list(dict.fromkeys(runs)) or ([] if args.stage else list_runs(out))
    if not runs:
        raise SystemExit(f"no generation runs under {out / EVAL_DIR / 'generations'} (run python -m eval.generate)")
    clip = ClipScorer(cfg.eval.clip_model, cfg.eval.clip_pretrained, args.device)
    results = []
    for run in runs:
        r = score_run(cfg, run, args.device, clip=clip)
        results.append(r)
        fid_s = f"{r['fid']:.4f}" if r["fid"] is not None else "n/a"
        cs_s = f"{r['clip_score']:.3f}" if r["clip_score"] is not None else "n/a"
        print(f"[eval.score] {run}: FID {fid_s}  CLIP-Score {cs_s}  ({r['n_scored']}/{r['n_benchmark']} images, "
              f"{100 * r['prompts_truncated_frac']:.1f} % prompts over 77 tokens)", flush=True)
    md = write_report(out)
    print(f"[eval.score] report: {md}", flush=True)
    return results


if __name__ == "__main__":
    main()

"""`python -m eval.score --config pipelines.yaml --pipeline NAME [--run RUN ...]`: the numbers.

For each generation run (<output>/eval/generations/<run>/, default: all of them), against the
benchmark version that the pipeline's eval config selects:
0. extends that version's exclusion list over manifest parts added or rewritten since its last
   search, then refuses to score when any key of the training shards (_sigma.shards, the only
   reader) is in it: the number would be flattered by a leak;
1. FID under `eval.fid_protocol` with `eval.fid_extractor` (eval.fid), real side = the cached
   reference features (eval.reference), KID (mean, std and standard error), CMMD (eval.cmmd: RBF
   MMD of CLIP image embeddings, reference embeddings cached the same way);
2. CLIP-Score = 100 x cosine with the pipeline's CLIP (`score.clip_model`), 77-token truncation
   (the truncated fraction is reported); reward models of `eval.rewards` (eval.rewards);
3. intervals (FID and CMMD: half-samples without duplicates; CLIP-Score, rewards: bootstrap), per-stratum tables (aspect
   bucket x prompt length; category for MJHQ-30K) (eval.metrics);
then writes <output>/eval/scores/<run>.json (numbers + the whole protocol: FID protocol, extractor
sha256, N, reference set, versions), <run>.rows.parquet (per prompt) and re-renders the report.
A run with fewer images than prompts is scored but marked incomparable (its FID is not the
benchmark's FID). All paths go through _sigma.fs (local or object store).
"""
from __future__ import annotations

import io
import platform
import time
from datetime import datetime, timezone

import numpy as np
import torch
from tqdm import tqdm

from _sigma import fs, holdout
from _sigma.device import pick_device
from _sigma.holdout import EVAL_DIR
from _sigma.shards import shard_keys
from eval import cmmd as cmmd_mod
from eval import fid, metrics
from eval.build_benchmark import current
from eval.clipscore import CONTEXT, ClipScorer, clip_token_counts
from eval.generate import META, existing_keys, image_path, run_dir
from eval.reference import reference_features

FORMAT = "sigma-eval-scores/2"


class LeakError(RuntimeError):
    """Training shards hold a key of the benchmark's exclusion list: scoring would flatter the model."""


def scores_dir(out: str) -> str:
    return fs.join(fs.normalize(out), EVAL_DIR, "scores")


def versions() -> dict:
    import open_clip

    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": np.__version__, "pillow": __import__("PIL").__version__,
            "torchvision": __import__("torchvision").__version__, "scipy": __import__("scipy").__version__}


def list_runs(out: str) -> list[str]:
    d = fs.join(fs.normalize(out), EVAL_DIR, "generations")
    return [n for n in fs.listdir(d) if fs.isfile(fs.join(d, n, META))]


def verify_hold_out(out: str, version: str, cfg=None) -> dict:
    """Raise LeakError when a training-shard key is held out by benchmark `version`.

    First the list must cover the current manifest (_sigma.holdout.stale_parts): with the pipeline
    config `cfg` the parts added or rewritten since the last search are searched now (the list is
    extended, as eval_split would); without it a stale list raises StaleHoldoutError."""
    stale = holdout.stale_parts(out, version)
    extended = None
    if stale:
        if cfg is None:
            raise holdout.StaleHoldoutError(f"benchmark {version}: its hold-out list does not cover manifest parts "
                                            f"{stale[:8]} (added or rewritten after the last search)")
        from eval.build_benchmark import build

        extended = {"parts": stale, "held_out_now": build(cfg)["hold_out"]["held_out"]}
    held = holdout.version_keys(out, version)
    shard = shard_keys(out)
    leaked = sorted(held & shard)
    if leaked:
        raise LeakError(f"benchmark {version}: {len(leaked)} held-out keys are in the training shards (e.g. "
                        f"{leaked[:3]}); rerun the features stage (it drops every held-out key) and retrain "
                        "before scoring")
    return {"held_out": len(held), "training_shard_keys": len(shard), "leaked": 0, "extended_over": extended}


def _load_png(uri: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(fs.read_bytes(uri))) as im:
            return im.convert("RGB"), None
    except FileNotFoundError:
        return None, "missing"
    except Exception as e:  # noqa: BLE001 - unreadable file is a per-image reason
        return None, f"unreadable: {str(e)[:200]}"


def score_run(cfg, run: str, device: str = "cpu", progress: bool = True, clip: ClipScorer | None = None,
              rewards: dict | None = None, extractor=None, embedder=None) -> dict:
    out, ecfg = cfg.out, cfg.eval
    version, rows, info = current(cfg)
    leak_check = verify_hold_out(out, version, cfg)
    d = run_dir(out, run)
    gen_meta = fs.read_json(fs.join(d, META)) if fs.isfile(fs.join(d, META)) else {}
    if gen_meta and gen_meta.get("benchmark_checksum") != info["checksum"]:
        raise RuntimeError(f"run {run} was generated for benchmark {gen_meta.get('benchmark_checksum', '?')[:12]}, "
                           f"not {version} ({info['checksum'][:12]})")
    t0 = time.time()
    extractor = extractor or fid.make_extractor(ecfg, device)
    ref, ref_meta, cached = reference_features(cfg, rows, info, extractor, device, progress)
    clip = clip or ClipScorer(cfg.score.clip_model, cfg.score.clip_pretrained, device)
    embedder = embedder or cmmd_mod.make_embedder(cfg, device, clip)
    ref_emb, emb_meta, emb_cached = cmmd_mod.reference_embeddings(cfg, rows, info, embedder, progress)
    rewards = {} if rewards is None else rewards
    have = existing_keys(d)
    keys, gen_feats, gen_embs, clip_s, rew, failed = [], [], [], [], {k: [] for k in rewards}, []
    bar = tqdm(total=len(rows), desc=f"score {run}", unit="img", disable=not progress, mininterval=1.0)
    bs = ecfg.batch_size
    for s in range(0, len(rows), bs):
        imgs, batch = [], []
        for r in rows[s:s + bs]:
            img, err = _load_png(image_path(d, r["key"])) if r["key"] in have else (None, "missing")
            if img is None:
                failed.append({"key": r["key"], "reason": err})
            else:
                imgs.append(img)
                batch.append(r)
        bar.update(len(rows[s:s + bs]))
        if not imgs:
            continue
        prompts = [r["prompt"] for r in batch]
        gen_feats.append(fid.features(extractor, imgs, ecfg.fid_protocol, device))
        gen_embs.append(embedder(imgs))  # (B, D) unit CLIP embeddings for CMMD
        clip_s.append(clip(imgs, prompts))
        for name, model in rewards.items():
            rew[name].append(model(imgs, prompts))
        keys.extend(r["key"] for r in batch)
    bar.close()
    gen = np.concatenate(gen_feats) if gen_feats else np.zeros((0, 1))
    cs = np.concatenate(clip_s) if clip_s else np.zeros(0)
    rew = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in rew.items()}
    ref_all = np.stack(list(ref.values())).astype(np.float64) if ref else np.zeros((0, gen.shape[1]))
    emb = np.concatenate(gen_embs) if gen_embs else np.zeros((0, 1), np.float32)
    result = _numbers(cfg, rows, keys, gen, cs, rew, ref, ref_all, emb, ref_emb)
    tokens = clip_token_counts([r["prompt"] for r in rows])
    n_ref = ref_meta.get("n_images", 0)
    reasons = ([f"{len(failed)} of {len(rows)} prompts have no usable image"] if failed else []) + \
              ([f"{len(rows) - n_ref} reference images unusable"] if n_ref < len(rows) else [])
    ext = fid.extractor_info(ecfg)
    result.update({
        "format": FORMAT, "run": run, "scored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_benchmark": len(rows), "n_scored": len(keys), "n_missing": len(failed), "missing": failed[:100],
        "comparable": not reasons, "incomparable_because": "; ".join(reasons) or None,
        "prompts_over_77_tokens": int((tokens > CONTEXT).sum()),
        "prompts_truncated_frac": float((tokens > CONTEXT).mean()) if len(tokens) else 0.0,
        "protocol": {
            "benchmark_version": version, "benchmark_checksum": info["checksum"], "benchmark_source": info["source"],
            "prompt": ecfg.prompt if info["source"] == "ours" else "prompt",
            "reference_set": {"source": info["source"], "path": ecfg.benchmark_path, "version": version,
                              "n_images": n_ref, "failed": len(ref_meta.get("failed", [])),
                              "cache": ref_meta.get("cache_id"), "from_cache": cached},
            "fid_protocol": ecfg.fid_protocol, "fid_extractor": ext["extractor"], "fid_extractor_sha256": ext["sha256"],
            "fid_extractor_file": ext["file"], "N": len(keys),
            "kid": f"clean-fid kernel_distance scheme, {ecfg.kid_subsets} subsets of up to {ecfg.kid_subset_size}",
            "bootstrap": ecfg.bootstrap, "ci": ecfg.ci, "ci_methods": metrics.CI_METHODS,
            **{k: v for k, v in cmmd_mod.protocol(cfg).items() if k in ("cmmd_model", "cmmd_pretrained")},
            "cmmd": dict(cmmd_mod.protocol(cfg), n_reference=len(ref_emb), reference_failed=len(emb_meta.get("failed", [])),
                         cache=emb_meta.get("cache_id"), from_cache=emb_cached),
            "clip_model": cfg.score.clip_model, "clip_pretrained": cfg.score.clip_pretrained,
            "clip_score": "100 x cosine, no clamp, 77-token truncation",
            "rewards": dict(ecfg.rewards), "hold_out_check": leak_check,
            "generation": gen_meta.get("protocol", {}),
        },
        "versions": versions(), "seconds": round(time.time() - t0, 2),
    })
    _save(out, run, keys, gen, cs, rew, result, emb)
    return result


def _numbers(cfg, rows, keys, gen, cs, rew, ref: dict, ref_all: np.ndarray, emb: np.ndarray | None = None,
             ref_emb: dict | None = None) -> dict:
    """FID / KID / CMMD over all images; CIs and strata over the prompts that have both images."""
    ecfg = cfg.eval
    by_key = {r["key"]: r for r in rows}
    pair = [i for i, k in enumerate(keys) if k in ref]
    prows = [by_key[keys[i]] for i in pair]
    pref = np.stack([ref[keys[i]] for i in pair]).astype(np.float64) if pair else np.zeros((0, gen.shape[1]))
    pgen = gen[pair] if pair else np.zeros((0, gen.shape[1]))
    per_prompt = {"clip_score": cs[pair] if pair else cs[:0], **{k: v[pair] for k, v in rew.items()}}
    ref_emb = ref_emb or {}
    epair = [i for i, k in enumerate(keys) if k in ref_emb] if emb is not None and len(emb) == len(keys) else []
    emb_all = np.stack(list(ref_emb.values())) if ref_emb else None
    fid_all = fid.fid_of(ref_all, gen)
    cmmd_all = cmmd_mod.mmd(emb_all, emb) if emb_all is not None and emb is not None else None
    # The intervals are over the prompts with both images; when that is every image on both sides
    # they are put around the reported numbers themselves.
    full = len(pair) == len(gen) == len(ref_all)
    efull = len(epair) == len(keys) == (0 if emb_all is None else len(emb_all))
    cis = metrics.bootstrap_cis(pref, pgen, per_prompt, ecfg.bootstrap, ecfg.ci, seed=ecfg.gen_seed,
                                ref_emb=np.stack([ref_emb[keys[i]] for i in epair]) if epair else None,
                                gen_emb=emb[epair] if epair else None,
                                fid_point=fid_all if full else None, cmmd_point=cmmd_all if efull else None)
    strata = metrics.strata(prows, pref, pgen, per_prompt, ("bucket", "length_bin"))
    cats = metrics.strata(prows, pref, pgen, per_prompt, "category") if any(r.get("category") for r in prows) else []
    return {
        "fid": fid_all, "fid_ci": cis.get("fid"), "cmmd": cmmd_all, "cmmd_ci": cis.get("cmmd"),
        "kid": metrics.kid(ref_all, gen, ecfg.kid_subsets, ecfg.kid_subset_size, seed=ecfg.gen_seed),
        "clip_score": float(cs.mean()) if len(cs) else None, "clip_score_std": float(cs.std()) if len(cs) else None,
        "clip_score_ci": cis.get("clip_score"),
        "rewards": {k: {"mean": float(v.mean()) if len(v) else None, "ci": cis.get(k)} for k, v in rew.items()},
        "strata": strata, "categories": cats,
    }


def _save(out: str, run: str, keys, gen, cs, rew, result, emb: np.ndarray) -> None:
    import pyarrow as pa

    sd = scores_dir(out)
    fs.write_parquet(fs.join(sd, f"{run}.rows.parquet"),
                     pa.table({"key": keys, "clip_score": cs, **{k: v for k, v in rew.items()}}))
    buf = io.BytesIO()
    np.savez(buf, keys=np.asarray(keys, dtype=str), feats=gen.astype(np.float32), clip_embeddings=emb.astype(np.float32))
    fs.write_bytes(fs.join(sd, f"{run}.features.npz"), buf.getvalue())
    fs.write_json(fs.join(sd, f"{run}.json"), result)  # last: the report reads these


def main(argv=None) -> list[dict]:
    from curation.config import pipeline_from_args
    from eval.cli import score_parser
    from eval.report import write_report
    from eval.rewards import load_rewards

    args = score_parser().parse_args(argv)
    args.device = args.device or pick_device()
    cfg = pipeline_from_args(args)
    out = cfg.out
    runs = list(args.run) + [r for r in list_runs(out) for st in args.stage if r == st or r.startswith(f"{st}-step-")]
    runs = list(dict.fromkeys(runs)) or ([] if args.stage else list_runs(out))
    if not runs:
        raise SystemExit(f"no generation runs under {fs.join(out, EVAL_DIR, 'generations')} (run python -m eval.generate)")
    clip = ClipScorer(cfg.score.clip_model, cfg.score.clip_pretrained, args.device)
    rewards = load_rewards(cfg.eval.rewards, args.device)
    extractor = fid.make_extractor(cfg.eval, args.device)
    embedder = cmmd_mod.make_embedder(cfg, args.device, clip)
    results = []
    for run in runs:
        r = score_run(cfg, run, args.device, clip=clip, rewards=rewards, extractor=extractor, embedder=embedder)
        results.append(r)
        print(f"[eval.score] {run}: FID {_fmt(r['fid'])} {_ci(r['fid_ci'])}  CMMD {_fmt(r['cmmd'], '.4f')} "
              f"{_ci(r['cmmd_ci'])}  KID "
              f"{_fmt((r['kid'] or {}).get('kid'), '.5f')}  CLIP-Score {_fmt(r['clip_score'], '.3f')} "
              f"{_ci(r['clip_score_ci'], '.3f')}  ({r['n_scored']}/{r['n_benchmark']} images"
              f"{'' if r['comparable'] else ', INCOMPARABLE: ' + r['incomparable_because']})", flush=True)
    md = write_report(out)
    print(f"[eval.score] report: {md}", flush=True)
    return results


def _fmt(v, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def _ci(ci, spec: str = ".4f") -> str:
    return "" if not ci else f"[{ci[0]:{spec}}, {ci[1]:{spec}}]"


if __name__ == "__main__":  # = sigma-eval-...: checks first, library logs to <output>/logs
    from eval import cli

    raise SystemExit(cli.score())

"""Scoring end to end: FID ~0 for the reference images themselves, larger for distorted ones, KID,
CIs, strata, rewards, the protocol in every report, partial runs marked incomparable."""
from __future__ import annotations

import json

import numpy as np
from PIL import ImageFilter

from _sigma import fs
from eval import build_benchmark as bb
from eval import generate as g
from eval import report, score
from eval.reference import iter_reference_images
from evaldata import gen_cfg, make_output


def _fake_run(out, cfg, name, transform, skip=()):
    """A 'generation run' made of the benchmark's own reference images (optionally distorted)."""
    _, rows, info = bb.current(cfg)
    d = g.run_dir(str(out), name)
    meta = {"format": g.FORMAT, "run": name, "benchmark_checksum": info["checksum"],
            "protocol": {"checkpoint": f"/ckpt/{name}", "sampler": "dpm", "steps": 20, "cfg_scale": 4.5,
                         "gen_seed": 0, "resolution": 256, "aspect": "bucket"}}
    fs.write_json(fs.join(d, g.META), meta)
    for key, img, err in iter_reference_images(str(out), rows):
        if key not in skip:
            g.save_png(np.asarray(transform(img)), g.image_path(d, key))


def test_score_runs_and_report(tmp_path, tiny_models):
    out = tmp_path / "run"
    make_output(out)
    rewards = {"PickScore": str(tiny_models / "rewards" / "pickscore"), "HPSv2": str(tiny_models / "rewards" / "hpsv2")}
    cfg = gen_cfg(out, tiny_models, n=20, rewards=rewards)
    bb.build(cfg)
    _fake_run(out, cfg, "same", lambda im: im)
    _fake_run(out, cfg, "blurred", lambda im: im.filter(ImageFilter.GaussianBlur(3)))
    _, rows, _ = bb.current(cfg)
    _fake_run(out, cfg, "partial", lambda im: im, skip={rows[0]["key"]})
    assert score.list_runs(str(out)) == ["blurred", "partial", "same"]
    from eval.rewards import load_rewards

    models = load_rewards(rewards)
    res = {r: score.score_run(cfg, r, progress=False, rewards=models) for r in ("same", "blurred", "partial")}
    same, blurred, partial = res["same"], res["blurred"], res["partial"]
    assert abs(same["fid"]) < 1e-6 and blurred["fid"] > 1e-3  # PNG of the decoded reference pixels
    assert blurred["fid_ci"][0] < blurred["fid"] < blurred["fid_ci"][1]
    assert blurred["kid"]["kid"] > same["kid"]["kid"] and blurred["kid"]["kid_std"] > 0
    assert same["clip_score_ci"][0] <= same["clip_score"] <= same["clip_score_ci"][1]
    # CMMD beside FID: ~0 for the reference images, the clip-mmd package's value on the same embeddings
    from clip_mmd import calculation
    from eval import reference

    assert abs(same["cmmd"]) < 1e-6 and blurred["cmmd"] > 1e-4
    assert blurred["cmmd_ci"][0] <= blurred["cmmd"] <= blurred["cmmd_ci"][1]
    pc = blurred["protocol"]["cmmd"]
    assert pc["sigma"] == 10 and pc["scale"] == 1000 and pc["cmmd_model"] == cfg.score.clip_model and pc["from_cache"]
    _, ref_emb, _ = reference.load(reference.cache_uri(str(out), pc["cache"]))
    with np.load(fs.join(score.scores_dir(str(out)), "blurred.features.npz")) as z:
        gen_emb = z["clip_embeddings"]
    assert gen_emb.shape == (20, ref_emb.shape[1])
    import torch

    theirs = calculation.mmd_efficient(ref_emb.astype(np.float64), gen_emb.astype(np.float64), precision=torch.float64)
    assert blurred["cmmd"] == np.float64(theirs) or abs(blurred["cmmd"] - theirs) < 1e-9 * max(1.0, abs(theirs))
    assert set(same["rewards"]) == {"PickScore", "HPSv2"} and same["rewards"]["HPSv2"]["ci"] is not None
    # per-prompt rows: the CLIP-Score mean and the strata are consistent with them
    per = fs.read_parquet(fs.join(score.scores_dir(str(out)), "same.rows.parquet")).to_pylist()
    assert len(per) == 20 and np.mean([r["clip_score"] for r in per]) == same["clip_score"]
    assert sum(s["n"] for s in same["strata"]) == 20
    by_key = {r["key"]: r for r in rows}
    for s in same["strata"]:
        ks = [r["key"] for r in per if (by_key[r["key"]]["bucket"], by_key[r["key"]]["length_bin"]) == (s["bucket"], s["length_bin"])]
        assert s["n"] == len(ks) and s["clip_score"] == np.mean([r["clip_score"] for r in per if r["key"] in ks])
    # a run with fewer images than prompts is scored but not comparable
    assert same["comparable"] and not partial["comparable"] and partial["n_scored"] == 19
    assert partial["missing"] == [{"key": rows[0]["key"], "reason": "missing"}]
    assert "1 of 20 prompts have no usable image" in partial["incomparable_because"]
    # the protocol: FID protocol, extractor, N, reference set
    p = same["protocol"]
    assert p["fid_protocol"] == "pytorch-fid" and p["fid_extractor"].startswith("tiny") and p["N"] == 20
    assert p["reference_set"]["n_images"] == 20 and p["reference_set"]["from_cache"] is False
    assert blurred["protocol"]["reference_set"]["from_cache"] is True  # reference features computed once
    assert p["hold_out_check"]["leaked"] == 0 and p["clip_model"] == cfg.score.clip_model
    frac = np.mean([r["clip_tokens"] > 77 for r in rows])
    assert same["prompts_truncated_frac"] == frac and 0 < frac < 1
    md = fs.read_text(report.write_report(str(out)))
    for word in ("FID", "CMMD", "half-sampling", "KID", "CLIP-Score", "PickScore", "HPSv2", "pytorch-fid", "DPM-Solver++", "20 steps", "cfg 4.5",
                 "N = 20", "tiny random-weight extractor", "Per stratum", "bootstrap", "prompts have no usable image"):
        assert word in md, word
    line = next(ln for ln in md.splitlines() if ln.startswith("| same "))
    assert "| 20/20 |" in line and "| yes |" in line
    line = next(ln for ln in md.splitlines() if ln.startswith("| partial "))
    assert "**no**" in line


def test_score_cli_scores_all_runs(tmp_path, tiny_models):
    out = tmp_path / "run"
    make_output(out)
    yaml_path = tmp_path / "p.yaml"
    doc = {"output": str(out),
           "score": {"clip_model": str(tiny_models / "clip" / "model_config.json"),
                     "clip_pretrained": str(tiny_models / "clip" / "open_clip_model.safetensors")},
           "eval": {"n": 8, "aesthetic_quantile": 0.0, "fid_extractor": "tiny", "fid_protocol": "clean-fid",
                    "bootstrap": 10, "kid_subsets": 5}}
    yaml_path.write_text(json.dumps({"pipelines": {"x": doc}}))
    bb.main(["--config", str(yaml_path), "--pipeline", "x"])
    cfg = gen_cfg(out, tiny_models, n=8, fid_protocol="clean-fid", bootstrap=10, kid_subsets=5)
    _fake_run(out, cfg, "r1", lambda im: im)
    _fake_run(out, cfg, "r2", lambda im: im.rotate(180))
    results = score.main(["--config", str(yaml_path), "--pipeline", "x"])
    assert [r["run"] for r in results] == ["r1", "r2"]
    assert results[1]["fid"] > results[0]["fid"] and results[0]["protocol"]["fid_protocol"] == "clean-fid"
    saved = json.loads((out / "eval" / "report.json").read_text())
    assert [r["run"] for r in saved["runs"]] == ["r1", "r2"]

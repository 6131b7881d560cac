"""Scoring end to end: FID ~0 for the reference images themselves, larger for distorted ones,
CLIP-Score recorded with the truncated fraction, and one markdown table comparing the runs."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageFilter

from eval import build_benchmark as bb
from eval import generate as g
from eval import report, score
from eval.reference import iter_reference_images
from evaldata import gen_cfg, make_output


def _fake_run(out, cfg, name, transform, skip=()):
    """A 'generation run' made of the benchmark's own reference images (optionally distorted)."""
    rows, info = bb.read_benchmark(out, "v1")
    d = g.run_dir(out, name)
    d.mkdir(parents=True)
    meta = {"format": g.FORMAT, "run": name, "benchmark_checksum": info["checksum"],
            "protocol": {"checkpoint": f"/ckpt/{name}", "sampler": "dpm", "steps": 20, "cfg_scale": 4.5,
                         "gen_seed": 0, "resolution": 256, "aspect": "bucket"}}
    (d / g.META).write_text(json.dumps(meta))
    for key, img, err in iter_reference_images(out, [r["key"] for r in rows]):
        if key not in skip:
            transform(img).save(d / f"{key}.png")


def test_score_runs_and_report(tmp_path, tiny_models):
    out = tmp_path / "run"
    make_output(out)
    cfg = gen_cfg(out, tiny_models, n=20)
    bb.build(cfg)
    _fake_run(out, cfg, "same", lambda im: im)
    _fake_run(out, cfg, "blurred", lambda im: im.filter(ImageFilter.GaussianBlur(3)))
    rows, _ = bb.read_benchmark(out, "v1")
    _fake_run(out, cfg, "partial", lambda im: im, skip={rows[0]["key"]})
    assert score.list_runs(out) == ["blurred", "partial", "same"]
    res = {r: score.score_run(cfg, r, progress=False) for r in ("same", "blurred", "partial")}
    assert abs(res["same"]["fid"]) < 1e-6  # PNG of the decoded reference pixels: identical features
    assert res["blurred"]["fid"] > 1e-3
    assert res["partial"]["n_scored"] == 19 and res["partial"]["missing"] == [{"key": rows[0]["key"], "reason": "missing"}]
    assert res["same"]["protocol"]["reference_from_cache"] is False
    assert res["blurred"]["protocol"]["reference_from_cache"] is True  # reference features computed once
    # the truncated fraction is that of the prompts (independent count: tokens stored per row)
    frac = np.mean([r["clip_tokens"] > 77 for r in rows])
    assert res["same"]["prompts_truncated_frac"] == frac and 0 < frac < 1
    assert res["same"]["clip_score"] is not None and -100 <= res["same"]["clip_score"] <= 100
    for k in ("torch", "torchmetrics", "open_clip"):
        assert k in res["same"]["versions"]
    md = report.write_report(out).read_text()
    assert md.count("| /ckpt/") == 0 and md.count("`/ckpt/") == 3
    for word in ("FID", "CLIP-Score", "DPM-Solver++", "20 steps", "cfg 4.5", "resize_center_crop", "64x64",
                 "torchmetrics", "N = 20", "tiny random-weight extractor"):
        assert word in md, word
    line = next(ln for ln in md.splitlines() if ln.startswith("| same "))
    assert "| 20/20 |" in line and "| yes |" in line


def test_score_cli_scores_all_runs(tmp_path, tiny_models):
    out = tmp_path / "run"
    make_output(out)
    yaml_path = tmp_path / "p.yaml"
    ev = {"n": 8, "aesthetic_quantile": 0.0, "fid_extractor": "tiny", "fid_size": 64,
          "clip_model": str(tiny_models / "clip" / "model_config.json"),
          "clip_pretrained": str(tiny_models / "clip" / "open_clip_model.safetensors")}
    yaml_path.write_text(json.dumps({"pipelines": {"x": {"output": str(out), "eval": ev}}}))
    bb.main(["--config", str(yaml_path), "--pipeline", "x"])
    cfg = gen_cfg(out, tiny_models, n=8)
    _fake_run(out, cfg, "r1", lambda im: im)
    _fake_run(out, cfg, "r2", lambda im: im.rotate(180))
    results = score.main(["--config", str(yaml_path), "--pipeline", "x"])
    assert [r["run"] for r in results] == ["r1", "r2"]
    assert results[1]["fid"] > results[0]["fid"]
    saved = json.loads((out / "eval" / "report.json").read_text())
    assert [r["run"] for r in saved["runs"]] == ["r1", "r2"]

"""Generation: one PNG per prompt at its bucket size, seeds fixed per prompt, resumable, Ray actors."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

from eval import build_benchmark as bb
from eval import generate as g
from evaldata import gen_cfg, make_output


@pytest.fixture()
def bench(tmp_path, tiny_models):
    out = tmp_path / "run"
    make_output(out, n_rows=40)
    cfg = gen_cfg(out, tiny_models)
    bb.build(cfg)
    return out, cfg, str(tiny_models / "dit")


def _pixels(d):
    from pathlib import Path

    return {p.stem: np.asarray(Image.open(p)) for p in sorted(Path(d).glob("*.png"))}


def test_plan_seeds_and_sizes():
    from eval.config import EvalConfig
    from _sigma.buckets import table

    rows = [{"key": f"00000_{i:06d}", "prompt": f"p{i}", "bucket": b} for i, b in enumerate(["1.0", "0.57", "1.0", "2.0"])]
    plan = g.plan(rows, EvalConfig(resolution=256, gen_seed=7))
    assert [r["seed"] for r in plan] == [7, 8, 9, 10]
    assert [r["key"] for r in plan] == ["00000_000001", "00000_000000", "00000_000002", "00000_000003"]
    assert all((r["height"], r["width"]) == table(256)[b] for r, b in zip(plan, ["0.57", "1.0", "1.0", "2.0"]))
    groups = g.runs([plan[0], plan[2], plan[1], plan[3]])
    assert [[r["seed"] for r in grp] for grp in groups] == [[7], [8, 9], [10]]
    square = g.plan(rows, EvalConfig(resolution=256, aspect="square"))
    assert {(r["height"], r["width"]) for r in square} == {(256, 256)}


def test_generate_resume_and_batch_independence(bench):
    out, cfg, dit = bench
    s = g.generate(cfg, dit, name="a", use_ray=False, limit=4, progress=False)
    assert s["ok"] == 4 and s["failed"] == 0 and not s["complete"]
    s = g.generate(cfg, dit, name="a", use_ray=False, progress=False)  # resume: only the rest
    assert s["existing"] == 4 and s["ok"] == 2 and s["complete"]
    d = g.run_dir(str(out), "a")
    _, rows, _ = bb.current(cfg)
    sizes = {r["key"]: (r["height"], r["width"]) for r in g.plan(rows, cfg.eval)}
    first = _pixels(d)
    assert set(first) == set(sizes)
    assert all(a.shape == (*sizes[k], 3) and a.dtype == np.uint8 for k, a in first.items())
    assert not [n for n in os.listdir(d) if ".tmp" in n]  # atomic writes leave no temp files
    s = g.generate(cfg, dit, name="a", use_ray=False, progress=False)
    assert s["ok"] == 0 and s["existing"] == 6
    # the same prompts with batch size 1: the same images (seeds are per prompt, not per batch); only
    # float rounding of batched vs single matmuls differs, so allow 1 grey level
    cfg1 = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, resources=dataclasses.replace(
        cfg.eval.resources, batch_size=1)))
    g.generate(cfg1, dit, name="b", use_ray=False, progress=False)
    second = _pixels(g.run_dir(str(out), "b"))
    assert set(first) == set(second)
    assert all(np.abs(first[k].astype(int) - second[k].astype(int)).max() <= 1 for k in first)
    # a deleted image is regenerated (the same image up to rounding)
    victim = sorted(first)[2]
    os.unlink(os.path.join(d, f"{victim}.png"))
    s = g.generate(cfg, dit, name="a", use_ray=False, progress=False)
    assert s["ok"] == 1 and np.abs(_pixels(d)[victim].astype(int) - first[victim].astype(int)).max() <= 1
    # another protocol into the same run folder is refused
    cfg_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, cfg_scale=2.0))
    with pytest.raises(RuntimeError, match="another protocol"):
        g.generate(cfg_cfg, dit, name="a", use_ray=False, progress=False)


def test_failures_are_recorded_not_fatal(bench):
    out, cfg, dit = bench
    bad = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, resolution=256, steps=2, sampler="iddpm"))
    gen = g.Generator(checkpoint=dit, t5=cfg.features.t5, vae=cfg.features.vae, out_dir=g.run_dir(str(out), "f"),
                      sampler="nope", steps=2, cfg_scale=4.5, max_length=300, scale_factor=0.13025)
    import pyarrow as pa

    _, rows, _ = bb.current(cfg)
    res = gen(pa.Table.from_pylist(g.plan(rows, bad.eval)[:2]))
    assert res.column("status").to_pylist() == ["failed", "failed"]
    assert "sampler" in res.column("error")[0].as_py()


@pytest.mark.slow
def test_ray_actor_pool_gives_the_same_images(bench, ray_local):
    out, cfg, dit = bench
    g.generate(cfg, dit, name="local", use_ray=False, progress=False)
    s = g.generate(cfg, dit, name="ray", use_ray=True, progress=False)
    assert s["ok"] == 6 and s["complete"]
    a, b = _pixels(g.run_dir(str(out), "local")), _pixels(g.run_dir(str(out), "ray"))
    assert set(a) == set(b) and all(np.abs(a[k].astype(int) - b[k].astype(int)).max() <= 1 for k in a)


def test_cli_with_a_training_stage(tmp_path, tiny_models):
    """generate --stage STAGE takes the stage's newest checkpoint and names the run after it;
    score --stage STAGE scores exactly those runs."""
    import json
    import shutil

    from eval import score

    out = tmp_path / "run"
    make_output(out, n_rows=30)
    stage_out = tmp_path / "train" / "s1"
    for step in (3, 5):
        shutil.copytree(tiny_models / "dit", stage_out / "checkpoints" / f"step-{step:08d}")
    ev = {"n": 3, "aesthetic_quantile": 0.0, "fid_extractor": "tiny", "resolution": 256, "steps": 2,
          "bootstrap": 5, "kid_subsets": 5}
    sc = {"clip_model": str(tiny_models / "clip" / "model_config.json"),
          "clip_pretrained": str(tiny_models / "clip" / "open_clip_model.safetensors")}
    doc = {"pipelines": {"x": {"output": str(out), "eval": ev, "score": sc,
                               "features": {"vae": str(tiny_models / "vae"), "t5": str(tiny_models / "t5")}}},
           "training": {"s1": {"resolution": 256, "data": {"shards": str(tmp_path / "shards")}, "steps": 5,
                               "batch_size": 1, "output": str(stage_out)}}}
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(json.dumps(doc))
    base = ["--config", str(cfg_path), "--pipeline", "x"]
    bb.main(base)
    s = g.main(base + ["--stage", "s1", "--no-ray"])
    assert s["run"] == "s1-step-00000005" and s["ok"] == 3 and s["complete"]
    meta = json.loads(open(os.path.join(g.run_dir(str(out), s["run"]), g.META)).read())
    assert meta["protocol"]["checkpoint"] == str((stage_out / "checkpoints" / "step-00000005").resolve())
    results = score.main(base + ["--stage", "s1"])
    assert [r["run"] for r in results] == ["s1-step-00000005"] and results[0]["n_scored"] == 3


@pytest.mark.slow
def test_sigkilled_generate_resumes_without_duplicates(tmp_path, tiny_models):
    """A real SIGKILL of `python -m eval.generate` right after its first batch commit (proved by
    SIGMA_KILL_MARKER); the same command again generates only the rest: every prompt exactly one
    image, the same pixels as an uninterrupted run."""
    import json
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    make_output(out, n_rows=40)
    doc = {"pipelines": {"x": {"output": str(out),
                               "eval": {"n": 6, "aesthetic_quantile": 0.0, "fid_extractor": "tiny", "resolution": 256,
                                        "steps": 2, "resources": {"batch_size": 2, "actors": 1}},
                               "features": {"vae": str(tiny_models / "vae"), "t5": str(tiny_models / "t5")}}}}
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(json.dumps(doc))
    bb.main(["--config", str(cfg_path), "--pipeline", "x"])
    cmd = [sys.executable, "-m", "eval.generate", "--config", str(cfg_path), "--pipeline", "x",
           "--checkpoint", str(tiny_models / "dit"), "--name", "k", "--no-ray"]
    repo = Path(__file__).resolve().parents[2]
    marker = tmp_path / "killed"
    env = dict(os.environ, SIGMA_KILL_AT="eval_generate:1", SIGMA_KILL_MARKER=str(marker))
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert marker.read_text().split() == ["eval_generate:1"]  # the kill happened, after the first commit
    d = g.run_dir(str(out), "k")
    assert len(g.existing_keys(d)) == 2  # one batch of 2 committed before the kill
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGMA_KILL")}
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(open(os.path.join(d, "generate_summary.json")).read())
    assert summary["existing"] == 2 and summary["ok"] == 4 and summary["complete"]
    files = sorted(os.listdir(d))
    assert files == sorted([f"{k}.png" for k in g.existing_keys(d)] + [g.META, "generate_summary.json"])
    assert len(g.existing_keys(d)) == 6
    cfg = gen_cfg(out, tiny_models, resources=dataclasses.replace(gen_cfg(out, tiny_models).eval.resources, batch_size=2))
    g.generate(cfg, str(tiny_models / "dit"), name="clean", use_ray=False, progress=False)
    a, b = _pixels(d), _pixels(g.run_dir(str(out), "clean"))
    assert set(a) == set(b) and all(np.abs(a[k].astype(int) - b[k].astype(int)).max() <= 1 for k in a)


def test_official_weights_keep_the_pe_of_their_training_size(bench, tmp_path):
    """Issue 22 item 13: an official .pth (no recorded PE) evaluated at eval.resolution 256 gets the
    PE of its training size (eval.weights_resolution + weights_pe), recorded in generation.json.
    PixArt-α 256 weights (alpha table: interpolation 1.0) give the same images as the same model
    saved with its PE recorded (convert.save_pth), and other images than the PE of the generation
    size (0.5). The
    Sigma table (interpolation = size / 512) is scale-free: base_size / interpolation is 32 at every
    size, so Σ-128 weights record another PE and give the same pixels."""
    import json

    import torch

    from _sigma.config import ConfigError
    from training.checkpoint import load_model
    from training.convert import load_official, save_pth

    out, cfg, dit = bench
    model = load_model(dit)  # the tiny DiT records base_size 16, interpolation 0.5 (trained at 256, sigma)
    g0 = torch.Generator().manual_seed(0)
    with torch.no_grad():  # its zero-initialised output layers would hide the PE: every weight random
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g0) * 0.2)
    pth = tmp_path / "official.pth"
    torch.save({"state_dict": model.state_dict()}, pth)  # the official layout: the PE is not recorded
    alpha = tmp_path / "alpha256.pth"  # the model an α-256 file is, with its PE written into the file
    save_pth(load_official(pth, image_size=256, version="alpha"), alpha)

    def gen(ckpt, name, **ev):
        c = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **ev))
        s = g.generate(c, str(ckpt), name=name, use_ray=False, limit=3, progress=False)
        assert s["ok"] == 3, s
        return json.loads(open(os.path.join(s["dir"], g.META)).read())["protocol"]["pe"], _pixels(s["dir"])

    def same(a, b):
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    assert cfg.eval.resolution == 256
    pe, official = gen(pth, "official", weights_resolution=256, weights_pe="alpha")
    assert pe == {"base_size": 16, "pe_interpolation": 1.0, "source": "trained at 256 px (alpha PE table)"}
    pe2, recorded = gen(alpha, "alpha256")
    assert (pe2["base_size"], pe2["pe_interpolation"]) == (16, 1.0) and pe2["source"].endswith("(model_config)")
    assert same(official, recorded)
    _, sigma256 = gen(pth, "sigma256", weights_resolution=256)  # what eval.resolution alone used to give
    assert not same(official, sigma256)  # the PE changes the pixels
    pe3, sigma128 = gen(pth, "sigma128", weights_resolution=128)
    assert (pe3["base_size"], pe3["pe_interpolation"]) == (8, 0.25) and same(sigma128, sigma256)
    with pytest.raises(ConfigError, match=r"eval.weights_resolution: .*official.pth: the file does not record"):
        g.generate(cfg, str(pth), name="none", use_ray=False, limit=1, progress=False)
    with pytest.raises(ConfigError, match=r"eval.weights_resolution: .*records PE base_size 16"):
        gen(dit, "contradicts", weights_resolution=256, weights_pe="alpha")

"""Real-size smoke of the `pixart-sigma` pipeline (issue 12, item 8), on CPU.

Every model at its real configuration with random weights (curation.real_size: ViT-L-14 + the 768-d
aesthetic MLP, the SDXL VAE, a T5 encoder of T5-v1.1-XXL's width and heads with 2 layers and the
tiny sentencepiece tokenizer, PixArt-XL/2 with KV compression in layers 14-27), one small batch
through each stage's real code path with the `pixart-sigma` settings: score (a photo + a broken
file), features at 256 px (T5Embedder, prepare_batch, VaeEncoder, shard + index), one training
step of training.train with CAME from those shards, one DPM-Solver++ step of training.sample from
the checkpoint it wrote, decoded by the SDXL VAE. Checked: shapes, dtypes, numbers against
independent computations (the aesthetic MLP by hand, the official one-caption T5 call, the
official parameter counts, the lr rule) and each stage's peak RSS against a bound made of the
model's own bytes. Models are built once per module, one at a time, and freed after their stage.
"""
from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from curation import real_size as rs

pytestmark = pytest.mark.slow

RES = 256
MB = 1 << 20
XL_PARAMS, KV_PARAMS = 610_856_096, 112_896  # official PixArt-XL/2 count; KV conv+norm in 14 layers


def _report(name: str, *reports: dict) -> None:
    print(f"[real-size] {name}: " + "; ".join(str(r) for r in reports))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("real_size")
    rs.lean_malloc()  # RSS peaks = memory held, not what glibc kept after frees (see curation.real_size)
    yield SimpleNamespace(dir=d, cfg=rs.pipeline_config(), tok=rs.tokenizer_dir(d))
    shutil.rmtree(d, ignore_errors=True)  # ~6 GB of weights and checkpoint


@pytest.fixture(scope="module")
def vae_dir(work):
    return rs.write_vae(work.dir / "vae")


@pytest.fixture(scope="module")
def features(work, vae_dir):
    """The features stage on 2 photos (one bucket) with 2 captions each; models freed after."""
    t5_dir = rs.write_t5(work.dir / "t5", work.tok)
    rows = rs.feature_rows([b for _, b in rs.photos()], rs.captions(2), RES)
    t5 = rs.run_t5(work.cfg, t5_dir, rows, null_file=work.dir / "null_caption.safetensors")
    vae = rs.run_vae(work.cfg, vae_dir, t5["table"])
    shards_dir, index = rs.write_shards(work.cfg, vae["table"], work.dir / "out", RES, t5_dir, vae_dir)
    _report("t5", t5["load"], t5["run"])
    _report("vae", vae["prepare"], vae["load"], vae["run"])
    return SimpleNamespace(t5=t5, vae=vae, index=index, t5_dir=t5_dir, shards=shards_dir, rows=rows,
                           null=work.dir / "null_caption.safetensors")


@pytest.fixture(scope="module")
def trained(work, features):
    cfg = rs.train_config(features.shards, work.dir / "train", str(features.null), steps=1, batch_size=2,
                          resolution=RES)
    res = rs.run_train(cfg)
    _report("train", res["run"])
    return SimpleNamespace(cfg=cfg, **res)


def test_score_vit_l14(work):
    photos = rs.photos()[:1]  # one photo + one broken file: fp16 ViT-L-14 costs ~12 CPU s per image here
    res = rs.run_score(work.cfg, rs.image_table(photos + [("broken", b"<html>not an image</html>")]),
                       rs.write_aesthetic(work.dir / "aesthetic.pth"))
    _report("score", res["load"], res["run"])
    assert (res["dtype"], res["dim"], res["device"]) == ("float16", 768, "cpu")  # pixart-sigma: fp16
    assert res["params"] == 427_616_513  # open_clip ViT-L-14 (vision + text tower)
    t = res["table"].to_pylist()
    ok, bad = t[:1], t[1]
    state = torch.load(work.dir / "aesthetic.pth", weights_only=True)
    for r in ok:
        assert (r["width"], r["height"], r["aspect_ratio"]) == (640, 427, 427 / 640) and r["score_error"] is None
        e = torch.tensor(r["embedding"], dtype=torch.float64)
        assert e.shape == (768,) and abs(float(e.norm()) - 1) < 1e-3
        h = e  # the LAION MLP by hand: five linears, no activations (dropouts off)
        for i in (0, 2, 4, 6, 7):
            h = h @ state[f"layers.{i}.weight"].double().T + state[f"layers.{i}.bias"].double()
        assert r["aesthetic"] == pytest.approx(float(h), rel=1e-4, abs=1e-5)
    assert bad["score_error"] and bad["aesthetic"] is None and bad["embedding"] is None
    # peak: open_clip builds fp32 then casts to fp16 (4 + 2 bytes per parameter) + activations
    assert res["load"]["peak_rss_mb"] - res["load"]["rss_before_mb"] < 6 * res["params"] / MB + 512
    assert res["run"]["peak_rss_mb"] - res["run"]["rss_before_mb"] < 512


def test_features_t5_vae_256(features):
    from transformers import AutoTokenizer

    t5, vae, rows = features.t5, features.vae, features.rows
    assert (t5["dtype"], t5["dim"], vae["dtype"]) == ("bfloat16", 4096, "bfloat16")  # pixart-sigma: bf16
    tok = AutoTokenizer.from_pretrained(features.t5_dir)
    out = vae["table"].to_pylist()
    for r, row in zip(out, rows):
        assert r["t5_error"] is None and r["prep_error"] is None
        for kind in ("long", "short"):
            n = len(tok(row[f"text_{kind}"], max_length=300, truncation=True).input_ids)
            assert r[f"n_{kind}"] == n
        # features at 256 px: 640x427 (h/w 0.667) -> the 0.68 bucket 208x304 -> latent (8, 26, 38)
        assert (r["bucket"], r["bucket_h"], r["bucket_w"], r["upscaled"]) == ("0.68", 208, 304, False)
    from _sigma import shards

    samples = list(shards.iter_samples(features.shards))
    assert [s["key"] for s in samples] == [r["key"] for r in out]
    for s, r in zip(samples, out):
        assert s["latent"].dtype == np.float16 and s["latent"].shape == (8, 26, 38)
        mean, std = s["latent"][:4].astype(np.float32), s["latent"][4:].astype(np.float32)
        assert np.isfinite(mean).all() and (std > 0).all()
        for kind in ("long", "short"):
            assert s[f"t5_{kind}"].dtype == np.float16 and s[f"t5_{kind}"].shape == (r[f"n_{kind}"], 4096)
            assert np.isfinite(s[f"t5_{kind}"]).all()
    # stored valid tokens == the official call (one caption padded to 300, T5 under its mask)
    ref = t5["reference"]
    n = int(ref["mask"].sum())
    assert n == out[0]["n_long"] < 300
    got, want = samples[0]["t5_long"].astype(np.float32), ref["emb"][:n].astype(np.float32)
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
    assert np.linalg.norm(got - want) <= 0.01 * np.linalg.norm(want)
    idx = features.index
    assert (idx["samples"], idx["failed"], idx["buckets"]) == (2, 0, {"0.68": 2})
    assert (idx["t5"]["dim"], idx["vae"]["scale_factor"]) == (4096, 0.13025)
    # peak over load + run: the bf16 weights (2 bytes per parameter; transformers maps the file, so
    # T5's pages arrive at the first forward and the unused embedding rows never do) + one batch's
    # activations. fp32 weights (4 bytes) would not fit under the bound.
    for m in (t5, vae):
        stage_peak = max(m["load"]["peak_rss_mb"], m["run"]["peak_rss_mb"])
        assert stage_peak - m["load"]["rss_before_mb"] < 1.25 * 2 * m["params"] / MB + 512


def test_train_step_xl_kv(features, trained):
    from safetensors import safe_open

    from training import checkpoint as ckpt
    from training.null import read_null

    cfg = trained.cfg
    assert cfg.model.preset == "PixArt-XL/2" and cfg.model.kv_compress_ratio == 2 and cfg.grad_checkpointing
    (step,) = trained.steps
    assert step["step"] == 1 and math.isfinite(step["loss"]) and math.isfinite(step["grad_norm"])
    # lr of step 1: official sqrt rule (lr x sqrt(batch / 256)) x linear warmup 1 / warmup_steps
    assert step["lr"] == pytest.approx(cfg.lr * math.sqrt(2 / 256) / cfg.warmup_steps, rel=1e-12)
    folder = ckpt.latest(cfg.output_dir)
    meta = ckpt.read_meta(folder)
    assert meta["step"] == 1 and set(meta["files"]) >= {"model.safetensors", "optimizer.pt", "rank-00000.pt"}
    n, keys = rs.state_numel(f"{folder}/model.safetensors")
    assert n == XL_PARAMS + KV_PARAMS
    kv = sorted(int(k.split(".")[1]) for k in keys if k.endswith("attn.sr.weight"))
    assert kv == list(range(14, 28)) and keys["blocks.14.attn.sr.weight"][0] == (1152, 1, 2, 2)
    assert {d for _, d in keys.values()} == {"F32"}
    null, valid = read_null(str(features.null))  # T5("") of the real-width T5, padded to 300
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("y_embedder.y_embedding"), null) and null.shape == (300, 4096)
    assert valid == 1  # T5 encodes "" as the lone </s>
    # peak = the checkpoint save: fp32 weights + CAME's first moment stay live (grads are freed by
    # then) while training.checkpoint.save holds 3 transient copies of the weights (the cloned
    # state, safetensors' per-tensor bytes, the file's bytes): 5 x 4 bytes per parameter. The
    # step itself needs 3 (weights, grads, first moment); activations (256 px, batch 2,
    # checkpointed blocks) are ~0.1 GB. Measured: 11.7 GB over the 1.2 GB before the stage.
    r = trained.run
    assert r["peak_rss_mb"] - r["rss_before_mb"] < 5 * 4 * n / MB + 1024


def test_sample_step_from_checkpoint(work, features, trained, vae_dir):
    from _sigma import shards

    s = next(shards.iter_samples(features.shards))
    y, mask = shards.repad([s["t5_long"].astype(np.float32)])
    res = rs.run_sample(str(trained.cfg.output_dir), vae_dir, torch.from_numpy(y), torch.from_numpy(mask),
                        RES, RES, steps=1, cfg_scale=4.5)
    _report("sample", res["load"], res["run"], res["decode"])
    assert res["kv_layers"] == list(range(14, 28))
    lat, img = res["latents"], res["images"]
    assert lat.dtype == torch.float32 and lat.shape == (1, 4, RES // 8, RES // 8) and torch.isfinite(lat).all()
    assert img.dtype == np.uint8 and img.shape == (1, RES, RES, 3)
    n = XL_PARAMS + KV_PARAMS
    # loading a verified checkpoint: file bytes + parsed tensors + the model (4 bytes each)
    assert res["load"]["peak_rss_mb"] - res["load"]["rss_before_mb"] < 3.5 * 4 * n / MB + 512
    assert res["run"]["peak_rss_mb"] - res["run"]["rss_before_mb"] < 1024

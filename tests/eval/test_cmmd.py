"""CMMD against the `clip-mmd` package's MMD (a torch port of google-research/cmmd's distance.py)
on the same embeddings, a closed form, and the embedder against open_clip's own preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eval import cmmd


def _clip_like(rng, n: int, d: int = 768, shift: float = 0.0) -> np.ndarray:
    """Unit vectors with a shared dominant direction (CLIP image embeddings cluster: cosines 0.4-0.9)."""
    common = np.ones(d) / np.sqrt(d)
    z = rng.normal(size=(n, d)) / np.sqrt(d) + 1.2 * common + shift * rng.normal(size=d) / np.sqrt(d)
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)


def test_cmmd_equals_the_clip_mmd_package():
    from clip_mmd import calculation  # imports torch + numpy only (its logic module needs transformers' hub)

    rng = np.random.default_rng(0)
    x, y = _clip_like(rng, 300), _clip_like(rng, 250, shift=3.0)
    ours = cmmd.mmd(x, y)
    x64, y64 = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(y.astype(np.float64))
    theirs_ref = float(calculation.mmd(x64, y64))  # the reference estimator, line by line
    theirs_eff = calculation.mmd_efficient(x, y, precision=torch.float64, low_mem=True, coeff_bs=64)
    assert ours == pytest.approx(theirs_ref, rel=1e-9) and ours == pytest.approx(theirs_eff, rel=1e-9)
    assert calculation._SIGMA == cmmd.SIGMA and calculation._SCALE == cmmd.SCALE
    same = cmmd.mmd(x[:150], x[150:])
    assert 0 <= same < ours  # V-statistic: >= 0, small for one distribution
    assert cmmd.mmd(x, x) == pytest.approx(0.0, abs=1e-9)
    assert cmmd.mmd(x[:0], y) is None


def test_cmmd_closed_form_of_two_points():
    """Two orthogonal unit vectors: ||x - y||^2 = 2, so MMD^2 = 1000 (2 - 2 exp(-2 / (2 * 10^2)))."""
    x, y = np.eye(4)[:1], np.eye(4)[1:2]
    assert cmmd.mmd(x, y) == pytest.approx(1000 * (2 - 2 * np.exp(-2 / 200)), rel=1e-12)


def test_blocks_do_not_change_the_number():
    rng = np.random.default_rng(1)
    x, y = _clip_like(rng, 70, 32), _clip_like(rng, 50, 32, shift=2.0)
    g = 1 / (2 * cmmd.SIGMA ** 2)
    assert cmmd._kernel_mean(x.astype(np.float64), y.astype(np.float64), g, block=7) == pytest.approx(
        cmmd._kernel_mean(x.astype(np.float64), y.astype(np.float64), g, block=4096), rel=1e-13)


def test_embedder_matches_open_clip_on_square_images(tiny_models):
    """For a square image the reference preprocessing (centre square + bicubic resize) equals
    open_clip's eval transform (shorter side resize + centre crop): same unit embeddings."""
    from _sigma.models import load_clip

    model, pre, _ = load_clip(str(tiny_models / "clip" / "model_config.json"),
                              str(tiny_models / "clip" / "open_clip_model.safetensors"))
    emb = cmmd.ClipEmbedder("tiny", None, loaded=(model, pre))
    rng = np.random.default_rng(2)
    imgs = [Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8)) for s in (96, 160)]
    ours = emb(imgs)
    with torch.no_grad():
        ref = model.encode_image(torch.stack([pre(im) for im in imgs])).float()
    ref = (ref / ref.norm(dim=-1, keepdim=True)).numpy()
    assert ours.shape == ref.shape and np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    assert np.abs(ours - ref).max() < 1e-5
    # non-square: the centred square is what is embedded
    wide = Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8))
    assert np.abs(emb([wide]) - emb([wide.crop((32, 0, 96, 64))])).max() < 1e-5

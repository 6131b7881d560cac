"""FID: zero against itself, monotonic in distortion, equal to an independent scipy computation."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageFilter

from eval import fid
from eval.config import EvalConfig
from evaldata import random_image

CFG = EvalConfig(fid_extractor="tiny", fid_size=64)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [random_image(rng, 80 + 8 * (i % 3), 64 + 8 * (i % 4)) for i in range(64)]


def to_batch(imgs, size=64, policy="resize_center_crop"):
    return torch.from_numpy(np.stack([fid.preprocess(im, size, policy) for im in imgs]))


def fid_of(ref, fake) -> float:
    m = fid.make_metric(CFG)
    m.update(to_batch(ref), real=True)
    m.update(to_batch(fake), real=False)
    return fid.compute_fid(m)


def noisy(imgs, sigma, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for im in imgs:
        a = np.asarray(im, dtype=np.float32) + rng.normal(0, sigma, size=np.asarray(im).shape)
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return out


def test_fid_of_a_set_against_itself_is_zero(images):
    assert abs(fid_of(images, images)) < 1e-6


def test_fid_grows_with_blur(images):
    values = [fid_of(images, [im.filter(ImageFilter.GaussianBlur(r)) for im in images]) for r in (0.5, 1, 2, 4)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] > 1e-4


def test_fid_grows_with_noise(images):
    values = [fid_of(images, noisy(images, s)) for s in (4, 12, 30, 60)]
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_fid_equals_scipy_sqrtm_on_the_same_features(images):
    fake = noisy(images[::-1], 20)
    m = fid.make_metric(CFG)
    real_b, fake_b = to_batch(images), to_batch(fake)
    m.update(real_b, real=True)
    m.update(fake_b, real=False)
    ours = fid.compute_fid(m)
    # independent: the raw features, numpy mean / covariance, scipy's matrix square root
    x = fid.TinyExtractor()(real_b).numpy()
    y = fid.TinyExtractor()(fake_b).numpy()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert ref > 1e-3


def test_cached_stats_round_trip(tmp_path, images):
    m = fid.make_metric(CFG)
    m.update(to_batch(images[:40]), real=True)
    m.update(to_batch(images[40:]), real=False)
    expected = fid.compute_fid(m)
    fid.save_stats(tmp_path / "s.npz", fid.get_stats(m, real=True), {"x": 1})
    stats, meta = fid.load_stats(tmp_path / "s.npz")
    assert meta["x"] == 1 and meta["format"] == fid.FORMAT and stats["n"] == 40
    mu, cov = fid.mean_cov(stats)
    feats = fid.TinyExtractor()(to_batch(images[:40])).numpy()
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-10)
    np.testing.assert_allclose(cov, np.cov(feats, rowvar=False), rtol=1e-6, atol=1e-12)
    m2 = fid.make_metric(CFG)
    fid.set_stats(m2, stats, real=True)
    m2.update(to_batch(images[40:]), real=False)
    assert fid.compute_fid(m2) == pytest.approx(expected, rel=1e-9)
    m2.reset()  # reference sums survive reset (reset_real_features=False)
    assert int(m2.real_features_num_samples) == 40


def test_preprocess_policies():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (50, 0, 150, 100))  # white centre square
    crop = fid.preprocess(img, 32, "resize_center_crop")
    assert crop.shape == (3, 32, 32) and crop.dtype == np.uint8
    assert crop.mean() > 250  # the crop keeps only the (white) centre
    squash = fid.preprocess(img, 32, "resize")
    assert squash.shape == (3, 32, 32) and 100 < squash.mean() < 160  # whole image, half white
    with pytest.raises(ValueError):
        fid.preprocess(img, 32, "nope")


class _Scriptable(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) in [-1, 1) -> (B, 3, 1, 1)
        return x.mean(dim=(2, 3), keepdim=True)


def test_torchscript_extractor_from_a_local_file(tmp_path, images):
    path = tmp_path / "ext.pt"
    torch.jit.script(_Scriptable()).save(str(path))
    ext = fid.TorchScriptInception(str(path))
    b = to_batch(images[:4])
    f = ext(b)
    assert f.shape == (4, 3) and f.dtype == torch.float64
    expected = (b.double() / 128.0 - 1.0).mean(dim=(2, 3))
    torch.testing.assert_close(f, expected, rtol=1e-5, atol=1e-6)
    cfg = EvalConfig(fid_extractor="torchscript", fid_weights=str(path))
    assert fid.extractor_id(cfg).startswith("torchscript-inception:ext.pt:")

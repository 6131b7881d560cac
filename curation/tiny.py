"""Tiny offline curation models: an open_clip ViT CLIP (real classes, real loader) that tells
images apart, and the LAION-layout aesthetic MLP. Built in ~2 s of CPU, byte-identical on every
rebuild, no download.

Random ViT weights map every image to nearly the same embedding (cosine > 0.99 between unrelated
photos), so near-duplicate search would mark everything. Instead the vision weights make the
unchanged open_clip forward compute a GIST-like descriptor (colour layout, colour histogram,
shift-invariant edge energies: curation/clip_tiny_modeling.py), and a closed-form fit on
generated calibration images (no training loop) centres, scales and rotates it into the 64-d
embedding. Unrelated images land far apart, re-encoded / resized / slightly cropped /
colour-jittered copies close (numbers in tests/curation/test_tiny_clip.py). The model is an
open_clip custom config + safetensors checkpoint, loaded by _sigma.models.load_clip like any
other. The text tower keeps seeded random weights (CLIP-Score plumbing only). The aesthetic MLP
is fitted to colourfulness, so that aesthetic cuts keep vivid images and drop grey ones. The NSFW
(released Keras zip layout) and watermark (timm EfficientNet + LAION head) twins are built by
curation/filters_tiny_modeling.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from curation import filters_tiny_modeling as filters_tiny
from curation.clip_tiny_modeling import (EMBED, HIST_BINS, IMAGE, M, N_OR, REGIONS, TINY_CLIP, descriptor_dims,
                                         design_vision)

__all__ = ["TINY_CLIP", "build", "calibration_images", "descriptors", "fit_projection", "aesthetic_target"]
ORI_WEIGHT = 0.7  # orientation dims count 0.7 of a unit-std dim: they vary more under crops
OFFSET = 0.8      # constant dimension, x the typical norm: images near the mean keep a stable direction


def calibration_images(seed: int = 0) -> list:
    """Deterministic calibration set (~300 small RGB images): crops of scikit-image's bundled
    photos that are NOT in the demo sample, and random shape / stripe / gradient / noise scenes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    try:
        import skimage.data as skd
    except ImportError:  # generated scenes only
        skd = None
    for name in ("brick", "grass", "gravel", "cell", "colorwheel", "logo", "microaneurysms", "moon", "page",
                 "retina", "text", "clock", "checkerboard", "shepp_logan_phantom", "stereo_motorcycle"):
        try:
            a = getattr(skd, name)()
        except Exception:  # absent, or a fetcher that needs the network
            continue
        a = a[0] if isinstance(a, tuple) else a
        img = Image.fromarray((a * 255 if a.dtype != np.uint8 else a).clip(0, 255).astype(np.uint8)).convert("RGB")
        img.thumbnail((256, 256), Image.BICUBIC)  # small: cheap to preprocess
        w, h = img.size
        for _ in range(12):
            s = rng.uniform(0.3, 1.0)
            cw, ch = int(w * s), min(h, int(h * s * rng.uniform(0.7, 1.3)))
            x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            out.append(img.crop((x0, y0, x0 + cw, y0 + ch)))
    while len(out) < 300:
        w, h = int(rng.integers(64, 192)), int(rng.integers(64, 192))
        arr = np.ones((h, w, 3)) * rng.uniform(0, 255, 3)
        if rng.random() < 0.3:  # linear gradient background
            t = np.linspace(0, 1, w if rng.random() < 0.5 else h)
            g = np.outer(np.ones(h), t) if len(t) == w else np.outer(t, np.ones(w))
            arr = arr * (1 - g[..., None]) + rng.uniform(0, 255, 3) * g[..., None]
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            col = tuple(int(c) for c in rng.integers(0, 256, 3))
            x0, y0 = rng.uniform(-0.2, 0.8) * w, rng.uniform(-0.2, 0.8) * h
            x1, y1 = x0 + rng.uniform(0.1, 0.8) * w, y0 + rng.uniform(0.1, 0.8) * h
            kind = rng.integers(0, 4)
            if kind == 0:
                d.ellipse((x0, y0, x1, y1), fill=col)
            elif kind == 1:
                d.rectangle((x0, y0, x1, y1), fill=col)
            elif kind == 2:
                period = int(rng.integers(4, 30))
                for x in range(0, w, 2 * period):
                    d.rectangle((x, 0, x + period - 1, h), fill=col)
            else:
                d.polygon([tuple(p) for p in rng.uniform(0, 1, (3, 2)) * (w, h)], fill=col)
        noise = rng.normal(0, rng.uniform(0, 20), (h, w, 3))
        out.append(Image.fromarray((np.asarray(img, np.float64) + noise).clip(0, 255).astype(np.uint8)))
    return out


@torch.no_grad()
def descriptors(model, preprocess, images, lay) -> np.ndarray:
    """(N, 50) float64: the descriptor parts of the CLS token after ln_post (before proj)."""
    visual = model.visual
    proj, visual.proj = visual.proj, None  # forward returns the pooled (N, WIDTH) vector
    try:
        x = torch.stack([preprocess(im.convert("RGB")) for im in images])
        feats = visual(x).double().numpy()
    finally:
        visual.proj = proj
    dims = descriptor_dims(lay)
    return feats[:, dims["colour"] + dims["hist"] + dims["logenergy"]]


def _split_log_energy() -> np.ndarray:
    """(50, 55) linear map: colour and histogram as they are; each region's 4 log energies ->
    their mean (edge strength) and the 4 deviations from it (orientation), so orientation gets
    its own scale in the fit instead of being drowned by edge strength."""
    n_c = 3 * len(REGIONS) + sum(len(c) for c, _ in HIST_BINS)
    T = np.zeros((n_c + N_OR * len(REGIONS), n_c + (N_OR + 1) * len(REGIONS)))
    T[:n_c, :n_c] = np.eye(n_c)
    for r in range(len(REGIONS)):
        rows = n_c + N_OR * r + np.arange(N_OR)
        T[rows, n_c + r] = 1 / N_OR
        T[np.ix_(rows, n_c + len(REGIONS) + N_OR * r + np.arange(N_OR))] = np.eye(N_OR) - 1 / N_OR
    return T


def fit_projection(D: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed form on calibration descriptors D (N, 50): emb = (d - mu) @ A + c (c: constant).
    Centre, map to the split basis, scale every dimension to unit calibration std (orientation
    dims by ORI_WEIGHT), add a constant dimension of OFFSET x the typical norm (so that images
    near the mean still have a stable direction), and rotate randomly into EMBED dims (cosines
    unchanged; the embedding just looks dense)."""
    mu = D.mean(0)
    T = _split_log_energy()
    Z = (D - mu) @ T
    n_plain = 3 * len(REGIONS) + sum(len(c) for c, _ in HIST_BINS) + len(REGIONS)
    w = np.ones(Z.shape[1])
    w[n_plain:] = ORI_WEIGHT
    S = T * (w / (Z.std(0) + 1e-3))
    off = OFFSET * np.sqrt((((D - mu) @ S) ** 2).sum(1).mean())
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((EMBED, EMBED)))
    Q = q[: S.shape[1] + 1]  # orthonormal rows
    return mu, S @ Q[:-1], off * Q[-1]


def colourfulness(img) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of the 64x64 view (0 for grey, ~100 for vivid)."""
    a = np.asarray(img.convert("RGB").resize((IMAGE, IMAGE)), np.float64)
    rg, yb = a[..., 0] - a[..., 1], (a[..., 0] + a[..., 1]) / 2 - a[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def aesthetic_target(img) -> float:
    """What the tiny aesthetic model is fitted to: 1 (grey) .. 9 (vivid), by colourfulness."""
    return 1 + 8 * (1 - math.exp(-colourfulness(img) / 50))


def _aesthetic_mlp(emb: np.ndarray, target: np.ndarray):
    """LAION-layout MLP computing the ridge fit target ~ emb @ w + b (the layout is linear)."""
    from curation.score import AestheticMLP

    X = np.c_[emb, np.ones(len(emb))]
    coef = np.linalg.solve(X.T @ X + 1e-2 * np.diag(np.r_[np.ones(emb.shape[1]), 0]), X.T @ target)
    mlp = AestheticMLP(emb.shape[1])
    with torch.no_grad():
        for p in mlp.parameters():
            p.zero_()
        mlp.layers[0].weight[0] = torch.as_tensor(coef[:-1], dtype=torch.float32)
        for i in (2, 4, 6, 7):
            mlp.layers[i].weight[0, 0] = 1.0
        mlp.layers[7].bias[0] = float(coef[-1])
    return mlp


def build(out_dir: Path) -> dict:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)  # the text tower keeps open_clip's seeded random init
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same reduction order on every machine: same bytes
    try:
        clip_dir = Path(out_dir) / "clip"
        clip_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = clip_dir / "model_config.json"
        cfg_path.write_text(json.dumps(TINY_CLIP, indent=2))
        open_clip.add_model_config(cfg_path)
        model, _, preprocess = open_clip.create_model_and_transforms("model_config", pretrained=None)
        pp = open_clip.get_model_preprocess_cfg(model)
        lay = design_vision(model.visual, pp["mean"], pp["std"])
        cal = calibration_images()
        D = descriptors(model, preprocess, cal, lay)
        mu, A, const = fit_projection(D)
        dims = sum(descriptor_dims(lay).values(), [])
        with torch.no_grad():
            model.visual.ln_post.bias[dims] = torch.as_tensor(-mu, dtype=torch.float32)  # centring
            model.visual.proj.zero_()
            model.visual.proj[dims] = torch.as_tensor(A, dtype=torch.float32)
            model.visual.proj[lay.dim("cls", 0)] = torch.as_tensor(const / M, dtype=torch.float32)
        emb = (D - mu) @ A + const  # what encode_image now returns (ln_post ~ identity), unnormalised
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        weights = clip_dir / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        mlp = _aesthetic_mlp(emb, np.array([aesthetic_target(im) for im in cal]))
        aes = Path(out_dir) / "aesthetic.pth"
        torch.save(mlp.state_dict(), aes)
        # The score stage's filter twins (curation/filters_tiny_modeling.py): the NSFW head is
        # calibrated on what the saved CLIP really returns for the calibration images.
        with torch.no_grad():
            e = model.encode_image(torch.stack([preprocess(im.convert("RGB")) for im in cal])).double().numpy()
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        nsfw = filters_tiny.build_nsfw(out_dir, e, cal)
        watermark = filters_tiny.build_watermark(out_dir, cal)
    finally:
        torch.set_num_threads(threads)
    return {"clip_config": cfg_path, "clip_weights": weights, "aesthetic": aes, "nsfw": nsfw, "watermark": watermark}

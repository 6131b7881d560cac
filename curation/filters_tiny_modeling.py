"""Tiny twins of the score stage's filter models (built by curation/tiny.py, `make models`):

- `nsfw.zip`: the LAION CLIP-based NSFW detector's released layout -- a zipped Keras SavedModel
  with the same layer chain and names (input_1, multi_category_encoding with two categorical
  columns and their lookup tables in saved_model.pb, normalization, dense 64 / re_lu / dense_1 512
  / re_lu_1 / dense_2 256 / re_lu_2 / dense_3 1 / classification_head_1 sigmoid), on the tiny
  CLIP's 64-d embeddings, written by curation/keras_weights.py and read by the same loader as the
  released zip. Weights: seeded Glorot-uniform, normalization adapted on calibration embeddings
  as Keras' adapt does, and the last Dense fitted (ridge, closed form) so that the logit follows
  the share of skin-tone pixels (a stand-in target: there is no NSFW data here). Demo images
  dominated by skin tones score high, others low.
- `watermark.pt`: LAION's watermark classifier layout (timm EfficientNet + Linear 625 / ReLU /
  Dropout / Linear 256 / ReLU / Linear 2 head, state keys as in watermark_model_v1.pt) on timm's
  `test_efficientnet` backbone, seeded random weights; the last Linear is rescaled so that the
  watermark logit margin has mean 0 and std 2 over the calibration images (random but spread
  scores, so thresholds cut somewhere). It detects nothing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

NSFW_CATEGORICAL = (5, 41)  # columns typed "int" in the twin (the released model has 5 of 768)
HIDDEN = (("dense", 64), ("dense_1", 512), ("dense_2", 256), ("dense_3", 1))
WATERMARK_ARCH = "test_efficientnet"


def skin_share(img) -> float:
    """Share of pixels in the classic YCbCr skin box (Cb 77..127, Cr 133..173), on a 64x64 view."""
    a = np.asarray(img.convert("YCbCr").resize((64, 64)), np.float64)
    cb, cr = a[..., 1], a[..., 2]
    return float(((cb >= 77) & (cb <= 127) & (cr >= 133) & (cr <= 173)).mean())


def _keras_config(dim: int, cats: tuple[int, ...] = NSFW_CATEGORICAL) -> dict:
    def layer(cls, name, inbound, **cfg):
        return {"class_name": cls, "config": {"name": name, **cfg}, "name": name,
                "inbound_nodes": [[[inbound, 0, 0, {}]]] if inbound else []}
    enc = ["int" if j in cats else "none" for j in range(dim)]
    layers = [layer("InputLayer", "input_1", None, batch_input_shape={"class_name": "__tuple__", "items": [None, dim]},
                    dtype="float64"),
              layer("Custom>MultiCategoryEncoding", "multi_category_encoding", "input_1", encoding=enc),
              layer("Normalization", "normalization", "multi_category_encoding",
                    axis={"class_name": "__tuple__", "items": [-1]}, mean=None, variance=None)]
    prev = "normalization"
    for k, (name, units) in enumerate(HIDDEN):
        layers.append(layer("Dense", name, prev, units=units, activation="linear", use_bias=True))
        prev = name
        if k < len(HIDDEN) - 1:
            act = "re_lu" + (f"_{k}" if k else "")
            layers.append(layer("ReLU", act, prev, max_value=None, negative_slope=0.0, threshold=0.0))
            prev = act
    layers.append(layer("Activation", "classification_head_1", prev, activation="sigmoid"))
    return {"class_name": "Functional", "config": {"name": "model", "layers": layers}, "keras_version": "2.8.0"}


def build_nsfw(out_dir: Path, emb: np.ndarray, images: list) -> Path:
    """emb: (N, dim) L2-normalised calibration embeddings of `images`."""
    from curation.keras_weights import write_model

    rng = np.random.default_rng(24)
    dim = emb.shape[1]
    # The twin's vocabularies, as AutoKeras builds them: "%f" strings of the (fp16-rounded)
    # training values, indexed 1..N by descending count (ties: larger string first); OOV -> 0.
    x16 = emb.astype(np.float16).astype(np.float64)
    tables, feats = [], x16.copy()
    for col in NSFW_CATEGORICAL:
        toks = [f"{v:f}" for v in x16[:, col]]
        uniq, counts = np.unique(np.array(toks), return_counts=True)
        order = np.lexsort((uniq, counts))[::-1]
        vocab = {uniq[o]: i + 1 for i, o in enumerate(order)}
        tables.append((np.array([u.encode() for u in uniq[order]], dtype=object), np.arange(1, len(order) + 1)))
        feats[:, col] = [vocab[t] for t in toks]
    mean, var = feats.mean(0), feats.var(0)
    tensors = {"layer_with_weights-1/count/.ATTRIBUTES/VARIABLE_VALUE": np.int64(len(feats)),
               "layer_with_weights-1/mean/.ATTRIBUTES/VARIABLE_VALUE": mean.astype(np.float32),
               "layer_with_weights-1/variance/.ATTRIBUTES/VARIABLE_VALUE": var.astype(np.float32)}
    for col in NSFW_CATEGORICAL:  # the released file stores these adapt-time tables empty, too
        pre = f"layer_with_weights-0/encoding_layers/{col}/token_counts/.ATTRIBUTES/table"
        tensors[pre + "-keys"] = np.array([], dtype=object)
        tensors[pre + "-values"] = np.zeros(0, np.int64)
    h = (feats - mean) / np.maximum(np.sqrt(var), 1e-7)  # (N, dim)
    width = dim
    for k, (_, units) in enumerate(HIDDEN[:-1]):
        lim = np.sqrt(6 / (width + units))  # Glorot uniform, as Keras initialises Dense
        kern, bias = rng.uniform(-lim, lim, (width, units)), np.zeros(units)
        tensors[f"layer_with_weights-{k + 2}/kernel/.ATTRIBUTES/VARIABLE_VALUE"] = kern.astype(np.float32)
        tensors[f"layer_with_weights-{k + 2}/bias/.ATTRIBUTES/VARIABLE_VALUE"] = bias.astype(np.float32)
        h = np.maximum(h @ kern.astype(np.float32) + bias, 0)
        width = units
    # Last Dense: ridge fit of logit(target) on the 256 hidden features, target = skin share
    # squashed into 0.02..0.98.
    p = 0.02 + 0.96 * np.clip(np.array([skin_share(im) for im in images]) * 2.0, 0, 1)
    y = np.log(p / (1 - p))
    X = np.c_[h, np.ones(len(h))]
    coef = np.linalg.solve(X.T @ X + 1.0 * np.diag(np.r_[np.ones(width), 0]), X.T @ y)
    tensors["layer_with_weights-5/kernel/.ATTRIBUTES/VARIABLE_VALUE"] = coef[:-1, None].astype(np.float32)
    tensors["layer_with_weights-5/bias/.ATTRIBUTES/VARIABLE_VALUE"] = np.array([coef[-1]], np.float32)
    return write_model(Path(out_dir) / "nsfw.zip", _keras_config(dim), tensors, tables)


@torch.no_grad()
def build_watermark(out_dir: Path, images: list) -> Path:
    from curation import watermark as wm

    torch.manual_seed(24)
    model = wm.build(WATERMARK_ARCH).eval()
    x = torch.from_numpy(np.stack([wm.preprocess(im) for im in images[:96]]))  # (96, 3, 256, 256)
    logits = torch.cat([model(x[i:i + 32]) for i in range(0, len(x), 32)])
    margin = logits[:, 0] - logits[:, 1]  # watermark logit minus clear logit
    last = model.classifier[5]
    scale = 2.0 / margin.std().clamp_min(1e-6)
    shift = margin.mean() * scale
    last.weight.mul_(scale)
    last.bias.mul_(scale)
    last.bias[0] -= shift / 2
    last.bias[1] += shift / 2
    path = Path(out_dir) / "watermark.pt"
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path

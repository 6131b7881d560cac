"""The LAION CLIP-based NSFW detector (github:LAION-AI/CLIP-based-NSFW-Detector) restated in torch,
loaded from its released weight file: `clip_autokeras_binary_nsfw.zip` (an AutoKeras / Keras 2.8
SavedModel; read by curation/keras_weights.py, no TensorFlow).

The published model (its keras_metadata.pb, checked against NeMo Curator's restatement):
  input (B, 768) L2-normalised OpenAI CLIP ViT-L/14 image embeddings, float64 in Keras
  -> MultiCategoryEncoding: 763 columns pass through (NaN -> 0); 5 columns (180, 316, 413, 440,
     644) were typed categorical by AutoKeras: the value is printed with "%f" (6 decimals, TF's
     as_string) and looked up in a vocabulary of the training set's strings -> its index (1..N),
     unknown strings -> 0 (the OOV index). The vocabularies live in saved_model.pb's graph.
  -> Normalization: (x - mean) / max(sqrt(variance), 1e-7)       (adapted mean / variance)
  -> Dense 64, ReLU -> Dense 512, ReLU -> Dense 256, ReLU -> Dense 1 -> sigmoid: P(NSFW), 0..1.
NeMo Curator's torch version feeds the 5 categorical columns' raw values to the normalisation
(their vocabulary index is what the Keras model normalises); here the lookup is kept, so the output
is the released model's. With fp32 embeddings the 5 lookups mostly miss (the vocabularies hold the
fp16-rounded training values), exactly as in Keras fed the same fp32 embeddings.
The layer list is read from the file and must be this chain; anything else is refused.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from curation.keras_weights import KerasWeightsError, read_model

EPS = 1e-7  # keras.backend.epsilon(): the Normalization layer's floor on sqrt(variance)
ACTS = {"linear": None, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class NSFWDetector(nn.Module):
    """Restated Keras model. Buffers: categorical columns + their vocabularies (python dicts),
    norm mean / variance (D,); Linear layers named after the Keras Dense layers (dense, dense_1, ...)."""

    def __init__(self, dim: int, dense: list[tuple[str, int, str]], cat_columns: tuple[int, ...] = ()):
        super().__init__()
        self.dim = dim
        self.cat_columns = tuple(cat_columns)
        self.vocab: list[dict[str, float]] = [{} for _ in self.cat_columns]
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("variance", torch.ones(dim))
        self.dense = nn.ModuleDict()
        self.acts: list[str] = []
        width = dim
        for name, units, act in dense:
            self.dense[name] = nn.Linear(width, units)
            self.acts.append(act)
            width = units
        if width != 1 or self.acts[-1] != "sigmoid":
            raise KerasWeightsError(f"NSFW model must end in one sigmoid unit, got {width} units, {self.acts[-1]}")

    def encode(self, emb: torch.Tensor) -> torch.Tensor:
        """MultiCategoryEncoding: (B, D) embeddings -> (B, D) float32 features."""
        x = torch.nan_to_num(emb.float(), nan=0.0)
        if self.cat_columns:
            vals = emb[:, list(self.cat_columns)].double().cpu().numpy()  # (B, 5): "%f" of the float64
            idx = np.array([[voc.get(f"{v:f}", 0.0) for v, voc in zip(row, self.vocab)] for row in vals], np.float32)
            x[:, list(self.cat_columns)] = torch.as_tensor(idx, device=x.device)
        return x

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised image embeddings -> (B,) P(NSFW)."""
        x = (self.encode(emb) - self.mean) / self.variance.sqrt().clamp_min(EPS)
        for layer, act in zip(self.dense.values(), self.acts):
            x = layer(x)
            if act == "relu":
                x = torch.relu(x)
            elif act == "sigmoid":
                x = torch.sigmoid(x)
        return x.squeeze(-1)


def _chain(config: dict) -> tuple[int, tuple[int, ...], list[tuple[str, int, str]]]:
    """(input dim, categorical columns, [(dense name, units, activation after it)]) of the Keras
    functional config; refuses any layer outside Input -> [MultiCategoryEncoding] -> Normalization
    -> (Dense -> activation)* chain."""
    layers = config.get("config", {}).get("layers") or []
    dim, cats, dense = None, (), []
    for i, layer in enumerate(layers):
        cls, c = layer.get("class_name"), layer.get("config", {})
        prev = [n[0] for node in layer.get("inbound_nodes", []) for n in node]
        if i and prev != [layers[i - 1].get("name")]:
            raise KerasWeightsError(f"layer {layer.get('name')!r}: not a chain (inputs {prev})")
        if cls == "InputLayer":
            dim = int(c["batch_input_shape"]["items"][-1] if isinstance(c["batch_input_shape"], dict)
                      else c["batch_input_shape"][-1])
        elif cls == "Custom>MultiCategoryEncoding":
            enc = c.get("encoding", [])
            if len(enc) != dim or any(e not in ("none", "int") for e in enc):
                raise KerasWeightsError("MultiCategoryEncoding: expected one 'none'/'int' encoding per column")
            cats = tuple(j for j, e in enumerate(enc) if e == "int")
        elif cls == "Normalization":
            if tuple(c.get("axis", {}).get("items", [-1])) != (-1,):
                raise KerasWeightsError("Normalization: only axis -1 is supported")
        elif cls == "Dense":
            act = c.get("activation", "linear")
            if act not in ACTS:
                raise KerasWeightsError(f"{c.get('name')}: activation {act!r} not supported")
            dense.append((c["name"], int(c["units"]), act))
        elif cls in ("ReLU", "Activation"):
            act = "relu" if cls == "ReLU" else c.get("activation")
            if cls == "ReLU" and (c.get("max_value") is not None or c.get("negative_slope", 0) or c.get("threshold", 0)):
                raise KerasWeightsError(f"{c.get('name')}: only a plain ReLU is supported")
            if not dense or dense[-1][2] != "linear" or act not in ("relu", "sigmoid"):
                raise KerasWeightsError(f"{c.get('name')}: activation {act!r} not after a linear Dense")
            dense[-1] = (*dense[-1][:2], act)
        elif cls != "Dropout":  # Dropout is the identity at inference
            raise KerasWeightsError(f"layer {layer.get('name')!r} ({cls}) is not part of the NSFW MLP")
    if dim is None or not dense:
        raise KerasWeightsError("no InputLayer / Dense layers in the model config")
    return dim, cats, dense


def load_nsfw(path: str) -> NSFWDetector:
    """The released zip (or its extracted SavedModel folder) -> NSFWDetector in eval mode."""
    config, tensors, tables = read_model(path)
    dim, cats, dense = _chain(config)
    model = NSFWDetector(dim, dense, cats)

    def take(prefix: str, leaf: str) -> np.ndarray:
        name = f"{prefix}/{leaf}/.ATTRIBUTES/VARIABLE_VALUE"
        if name not in tensors:
            raise KerasWeightsError(f"{path}: missing variable {name}")
        return tensors[name]

    # Checkpoint names are layer_with_weights-K in layer order: sort them and match by content.
    groups = sorted({k.split("/")[0] for k in tensors if k.startswith("layer_with_weights-")},
                    key=lambda g: int(g.split("-")[1]))
    norm = [g for g in groups if f"{g}/mean/.ATTRIBUTES/VARIABLE_VALUE" in tensors]
    kern = [g for g in groups if f"{g}/kernel/.ATTRIBUTES/VARIABLE_VALUE" in tensors]
    if len(norm) != 1 or len(kern) != len(dense):
        raise KerasWeightsError(f"{path}: expected 1 Normalization and {len(dense)} Dense weight groups, "
                                f"found {len(norm)} and {len(kern)}")
    with torch.no_grad():
        mean, var = take(norm[0], "mean").reshape(-1), take(norm[0], "variance").reshape(-1)
        if mean.shape != (dim,) or var.shape != (dim,):
            raise KerasWeightsError(f"{path}: normalization of shape {mean.shape}, expected ({dim},)")
        model.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        model.variance.copy_(torch.from_numpy(var.astype(np.float32)))
        for g, layer in zip(kern, model.dense.values()):
            k, b = take(g, "kernel"), take(g, "bias")  # Keras kernel (in, out) = torch weight.T
            if k.shape != (layer.in_features, layer.out_features) or b.shape != (layer.out_features,):
                raise KerasWeightsError(f"{path}: {g} kernel {k.shape}, expected {(layer.in_features, layer.out_features)}")
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(k.T)))
            layer.bias.copy_(torch.from_numpy(b))
    if len(tables) != len(cats):
        raise KerasWeightsError(f"{path}: {len(cats)} categorical columns but {len(tables)} lookup tables in "
                                "saved_model.pb")
    for j, (keys, idx) in enumerate(tables):  # tables are created in column order
        model.vocab[j] = {k.decode(): float(v) for k, v in zip(keys, idx)}
    return model.eval()

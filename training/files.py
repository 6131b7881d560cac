"""Reading weight files without trusting them: safetensors, or torch.load(weights_only=True).

Every `.pth` / `.pt` that training reads (an official checkpoint in `init_from`, `convert`,
`sample`, our optimizer / rank-state files, an official null-caption file) goes through
`torch_load`: a file whose unpickling needs anything beyond tensors and plain containers (a class,
a function call: what a crafted pickle uses to run code) is REFUSED with a message naming it,
unless the caller passes trust_pickle=True (the `--trust-pickle` flags, `trust_pickle: true` in a
training stage). Files are local paths or URIs (_sigma.fs).
"""
from __future__ import annotations

import io
import pickle

import torch

from _sigma import fs


class PickleRefused(ValueError):
    """A weight file that can only be read by running its pickle (arbitrary code)."""


def torch_load(uri: str, trust_pickle: bool = False, map_location="cpu"):
    """torch.load(weights_only=True) of a local path or URI; see the module docstring."""
    src = fs.local_path(uri) or io.BytesIO(fs.read_bytes(uri))
    try:
        return torch.load(src, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            why = str(e).strip().splitlines()
            detail = next((ln for ln in why if "GLOBAL" in ln or "Unsupported" in ln), why[0] if why else "")
            raise PickleRefused(
                f"{uri}: refused: reading it needs a full pickle load, which can run arbitrary code "
                f"({detail.strip()[:200]}). Re-save it as safetensors, or pass --trust-pickle "
                "(training stage: trust_pickle: true) if you trust the file.") from None
    if not isinstance(src, str):
        src.seek(0)
    return torch.load(src, map_location=map_location, weights_only=False)


def load_safetensors(uri: str) -> dict[str, torch.Tensor]:
    """A .safetensors file (local or URI) -> {name: tensor} on CPU."""
    from safetensors.torch import load, load_file

    local = fs.local_path(uri)
    return load_file(local) if local else load(fs.read_bytes(uri))


def is_weight_file(uri: str) -> bool:
    return str(uri).lower().endswith((".safetensors", ".pth", ".pt", ".bin", ".ckpt"))

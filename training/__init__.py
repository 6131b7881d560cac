"""PixArt-Σ DiT training (model, diffusion, data, checkpoints, sampling).

Public API for the other packages (eval generates images with a trained model). Other packages
import only these top-level names, never training's submodules (tests/test_imports.py enforces
it). Resolved lazily (PEP 562) so that `import training.x` does not load torch models it does not use.
"""
from __future__ import annotations

import importlib

# name -> (module, attribute)
_API = {
    "load_stage": ("training.config", "load_stage"),  # a training stage of pipelines.yaml
    "latest_checkpoint": ("training.checkpoint", "resolve"),  # stage output / checkpoint -> checkpoint folder
    "encode_null": ("training.null", "encode_null"),  # T5("") of a T5: the unconditional caption
    "load_dit": ("training.sample", "load_dit"),  # a verified checkpoint, diffusers folder or .pth -> DiT
    "dit_pe": ("training.sample", "dit_pe"),  # the PE load_dit gives a checkpoint (read without loading it)
    "encode_prompts": ("training.sample", "encode_prompts"),
    "sample_latents": ("training.sample", "sample_latents"),
    "decode_latents": ("training.sample", "decode_latents"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)

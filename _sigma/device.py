"""The one device and precision picker of the pipeline's model-backed stages.

A stage asks for `num_gpus` (its Ray resources) and a precision name; it runs on CUDA only when it
was given a GPU and one is visible, else on the CPU. `auto` means the stage's GPU precision on CUDA
(bf16 for T5-XXL and the SDXL VAE: fp16 overflows there; fp16 for CLIP) and fp32 on the CPU.
"""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(num_gpus: float = 1.0) -> str:
    """"cuda" when the caller holds a GPU (num_gpus > 0) and CUDA is visible, else "cpu"."""
    return "cuda" if num_gpus and num_gpus > 0 and torch.cuda.is_available() else "cpu"


def resolve_precision(precision: str, device: str, auto_gpu: str = "fp16") -> str:
    """The precision name on `device` ("cuda", "cuda:1", "cpu"): `auto` -> `auto_gpu` on CUDA, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return auto_gpu if str(device).startswith("cuda") else "fp32"


def pick_device_precision(precision: str, num_gpus: float, auto_gpu: str = "fp16") -> tuple[str, str]:
    """(device, precision name); `auto` -> `auto_gpu` on CUDA, fp32 on the CPU."""
    device = pick_device(num_gpus)
    return device, resolve_precision(precision, device, auto_gpu)


def pick_device_dtype(precision: str, num_gpus: float, auto_gpu: str = "bf16") -> tuple[str, torch.dtype]:
    """(device, torch dtype); `auto` -> `auto_gpu` (default bf16) on CUDA, fp32 on the CPU."""
    device, name = pick_device_precision(precision, num_gpus, auto_gpu)
    return device, DTYPES[name]

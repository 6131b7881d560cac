"""Config of the features stage (light module: no torch import)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from _sigma.config import ConfigError, Precision, Resources

SUPPORTED_RESOLUTIONS = (256, 512, 1024, 2048, 2880)  # the bucket tables of _sigma/buckets.py


@dataclass(frozen=True)
class FeaturesConfig:
    resolutions: tuple[int, ...] = (256,)
    # diffusers AutoencoderKL: hub name or local folder (SDXL VAE as in PixArt-Sigma).
    vae: str = field(default="stabilityai/sdxl-vae", metadata={"path": True})
    # transformers T5EncoderModel + tokenizer: hub name or local folder (T5-v1.1-XXL, d_model 4096).
    t5: str = field(default="DeepFloyd/t5-v1_1-xxl", metadata={"path": True})
    t5_max_length: int = 300  # PixArt-Sigma raised 120 -> 300 tokens
    scale_factor: float = 0.13025  # SDXL VAE; recorded in index.json, applied by the training loop
    shard_max_samples: int = 1000  # a shard closes at this many samples ...
    shard_max_bytes: int = 1_000_000_000  # ... or at this (estimated) size; 0 = no byte limit
    # Keys never put in a shard: text file (one key a line) or parquet with `key`, local path or URI.
    # The output's own eval hold-out (_sigma.holdout: every benchmark version) is always excluded too.
    exclude_keys: str | None = None
    # Stored T5 tokens: fp16 (lossless w.r.t. the official fp16 files) or fp8 (e4m3 + per-token
    # scale: half the text bytes, ~2-3 % RMS relative error; see benchmarks/RESULTS.md).
    text_dtype: Literal["fp16", "fp8"] = "fp16"  # _sigma.shards.TEXT_DTYPES
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU (fp16 T5/SDXL-VAE overflow; bf16 does not)
    # T5: rows per Ray batch; captions (2 per row) are length-sorted and run in chunks of batch_size.
    t5_resources: Resources = Resources(batch_size=32)
    # ... and, when > 0, chunks of at most this many padded tokens (captions x longest in the chunk):
    # small on CPU (compute-bound: padding is wasted work), 0 or large on GPU (fill the batch).
    t5_batch_tokens: int = 0
    # VAE: images per Ray batch (one batch may hold several buckets: each bucket is one forward).
    vae_resources: Resources = Resources(batch_size=8)
    # How a rerun checks a finished shard before reusing it: sha256 (reads every reused shard once,
    # on the workers) or size (a HEAD per shard: catches truncation, not same-size corruption).
    verify_shards: Literal["sha256", "size"] = "sha256"

    def __post_init__(self):
        if not self.resolutions:
            raise ConfigError("resolutions: at least one resolution is required")
        bad = [r for r in self.resolutions if r not in SUPPORTED_RESOLUTIONS]
        if bad:
            raise ConfigError(f"resolutions: got {bad[0]}, allowed: {', '.join(map(str, SUPPORTED_RESOLUTIONS))}")
        if len(set(self.resolutions)) != len(self.resolutions):
            raise ConfigError("resolutions: duplicate resolution")
        if self.t5_batch_tokens < 0:
            raise ConfigError(f"t5_batch_tokens: got {self.t5_batch_tokens}, allowed: >= 0 (0 = no token budget)")
        if not 1 <= self.t5_max_length <= 4096:
            raise ConfigError(f"t5_max_length: got {self.t5_max_length}, allowed: 1..4096")
        if self.scale_factor <= 0:
            raise ConfigError(f"scale_factor: got {self.scale_factor}, allowed: > 0")
        if self.shard_max_samples < 1 or self.shard_max_bytes < 0:
            raise ConfigError("shard_max_samples must be >= 1 and shard_max_bytes >= 0 (0 = no byte limit)")


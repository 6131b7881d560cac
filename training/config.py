"""Config of one training stage (`training.<stage>` in pipelines.yaml). Light module: no torch.

A stage is one step of the weak-to-strong schedule (paper Table 4): a resolution, the shards it
reads, the model preset (+ KV compression), what it starts from, and the optimiser settings.
`load_stage()` resolves everything that depends on other parts of the file (the data folder of a
pipeline, the output folder of the stage named in `init_from`, the T5 of the null caption) into
absolute paths or URIs, so the resolved config that is saved beside the outputs and sent to every
worker is self-contained. It also refuses a stage whose shards no pipeline writes (the pipeline's
features.resolutions must hold the stage resolution), naming both.
`data.shards`, `output` and `init_from` are local paths or URIs (s3://, gs://; _sigma.fs).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from _sigma import fs
from _sigma.config import ConfigError, Precision, apply_overrides, load_yaml, parse


@dataclass(frozen=True)
class DataSpec:
    # Exactly one of: `shards` (a folder or URI holding index.json + shard-*.tar) or `pipeline` (a
    # name in `pipelines:`; the folder is then <pipeline output>/shards/<stage resolution>).
    shards: str | None = None
    pipeline: str | None = None
    # Pad T5 tokens to the longest caption of the batch ("batch") or always to max_length ("max").
    pad_tokens: Literal["batch", "max"] = "batch"
    max_length: int = 300
    prefetch: int = 2  # batches loaded ahead in a background thread (0 = none)

    def __post_init__(self):
        if (self.shards is None) == (self.pipeline is None):
            raise ConfigError("data: give exactly one of 'shards' (a folder) or 'pipeline' (a name)")
        if self.max_length < 1:
            raise ConfigError(f"data.max_length: got {self.max_length}, allowed: >= 1")


@dataclass(frozen=True)
class ModelSpec:
    preset: str = "PixArt-XL/2"
    # KV token compression (paper 2.3): R x R windows of keys/values merged by a depthwise conv;
    # layers [] = the deep half (14..27 for 28 blocks, the paper's choice).
    kv_compress_ratio: int = 1
    kv_compress_layers: tuple[int, ...] = ()
    # Position-embedding settings; null = derived from the stage resolution (see TrainStageConfig).
    base_size: int | None = None
    pe_interpolation: float | None = None
    # Null caption in caption dropout (and later CFG): "own" = T5("") under its own mask (ours and
    # diffusers' pipeline), "condition" = under the dropped caption's mask (the official trainer).
    null_policy: Literal["own", "condition"] = "own"
    # Any other keyword of training.model.build_model (e.g. depth for experiments).
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kv_compress_ratio < 1:
            raise ConfigError(f"model.kv_compress_ratio: got {self.kv_compress_ratio}, allowed: >= 1")
        if self.kv_compress_layers and self.kv_compress_ratio == 1:
            raise ConfigError("model.kv_compress_layers: set kv_compress_ratio > 1 to compress layers")


@dataclass(frozen=True)
class TrainStageConfig:
    resolution: int
    data: DataSpec
    steps: int
    batch_size: int  # per worker
    name: str = ""  # filled from the mapping key by load_stage
    model: ModelSpec = ModelSpec()
    # Previous stage name | path to an official PixArt-alpha/Sigma .pth | a checkpoint folder | null.
    init_from: str | None = None
    # Read .pth files (init_from) that need a full pickle load (they can run code): only if trusted.
    trust_pickle: bool = False
    # The null caption T5("") padded to max_length (training.null): a T5 folder, a diffusers pipeline
    # folder or a null file; null = the T5 that wrote the shards (the pipeline's features.t5, else
    # index.json's t5.name); "keep" = keep what the initial weights carry (no T5 needed).
    null_caption: str | None = None
    lr: float = 2e-5
    warmup_steps: int = 0
    grad_clip: float = 0.01  # the official value; maintainers say 0.1-1 also works
    weight_decay: float = 0.0
    # Effective lr = lr x rule(global batch / lr_base_batch): the official base config's
    # auto_lr = dict(rule='sqrt') with base_batch_size 256 (the paper's Table 4 lists lr before it).
    lr_scaling: Literal["none", "sqrt", "linear"] = "sqrt"
    lr_base_batch: int = 256
    # Probability of the LONG caption (the official `real_prompt_ratio` is the short one).
    long_ratio: float = 0.6
    caption_dropout: float = 0.1
    precision: Precision = "auto"
    ema: float | None = None  # EMA decay, null = no EMA (Sigma trains without one)
    seed: int = 0
    num_workers: int = 1  # Ray Train workers (processes); torchrun decides its own world size
    use_gpu: bool = False
    grad_checkpointing: bool = False
    checkpoint_every: int = 1000
    keep_last: int = 2
    log_every: int = 10
    output: str | None = None  # default runs/train/<name>

    def __post_init__(self):
        if self.resolution % 64:
            raise ConfigError(f"resolution: got {self.resolution}, allowed: a multiple of 64")
        for k in ("steps", "batch_size", "num_workers", "checkpoint_every", "keep_last", "log_every", "lr_base_batch"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}: got {getattr(self, k)}, allowed: >= 1")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: got {self.warmup_steps}, allowed: >= 0")
        for k in ("long_ratio", "caption_dropout"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ConfigError(f"{k}: got {getattr(self, k)}, allowed: 0..1")
        if self.lr <= 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise ConfigError("lr and grad_clip must be > 0, weight_decay >= 0")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"ema: got {self.ema}, allowed: null or a decay in (0, 1)")

    # --- derived values -------------------------------------------------------------------
    @property
    def base_size(self) -> int:
        """Tokens per side of the 1:1 grid at this resolution: latent side / patch (2)."""
        return self.model.base_size or self.resolution // 8 // 2

    @property
    def pe_interpolation(self) -> float:
        return self.model.pe_interpolation or self.resolution / 512

    def model_kwargs(self) -> dict:
        """Keyword arguments of training.model.build_model(preset, **kwargs)."""
        kw = dict(self.model.overrides)
        kw.update(base_size=self.base_size, pe_interpolation=self.pe_interpolation)
        if self.model.null_policy != "own":
            kw["null_policy"] = self.model.null_policy
        if self.model.kv_compress_ratio > 1:
            kw["kv_compress_ratio"] = self.model.kv_compress_ratio
            if self.model.kv_compress_layers:  # empty = the model's default (the deep half)
                kw["kv_compress_layers"] = list(self.model.kv_compress_layers)
        return kw

    def scaled_lr(self, world_size: int) -> float:
        """The official `auto_scale_lr(train_batch_size * world_size, rule, base_batch_size)`."""
        ratio = self.batch_size * world_size / self.lr_base_batch
        if self.lr_scaling == "sqrt":
            return self.lr * math.sqrt(ratio)
        if self.lr_scaling == "linear":
            return self.lr * ratio
        return self.lr

    @property
    def output_dir(self) -> str:
        return fs.normalize(self.output or f"runs/train/{self.name}")

    @property
    def shards_dir(self) -> str:
        assert self.data.shards is not None, "call load_stage() to resolve data.pipeline"
        return fs.normalize(self.data.shards)


def _abs(p: str | os.PathLike) -> str:
    return fs.normalize(p)


def _model_path(p: str) -> str:
    """A model path as workers must see it: absolute when it exists locally (Ray Train workers run
    in another directory), else unchanged (a hub name or a URI)."""
    return fs.normalize(p) if os.path.exists(os.path.expanduser(str(p))) else str(p)


def _pipeline_features(doc: dict, pipeline: str) -> tuple[tuple[int, ...], str]:
    """(features.resolutions, features.t5) of a pipeline of the file, defaults filled in."""
    from features.config import FeaturesConfig

    raw = ((doc.get("pipelines") or {}).get(pipeline) or {}).get("features") or {}
    fc = parse(FeaturesConfig, raw, f"pipelines.{pipeline}.features")
    return tuple(fc.resolutions), fc.t5


def stage_from_dict(data: dict, name: str = "") -> TrainStageConfig:
    """Parse an already-resolved stage dict (e.g. the one sent to a Ray worker)."""
    return parse(TrainStageConfig, data, f"training.{name}" if name else "training")


def load_stage(config_path: str | os.PathLike, name: str, overrides=()) -> TrainStageConfig:
    """Read `training.<name>` of pipelines.yaml, apply `k=v` overrides (keys relative to the stage,
    a leading `training.<name>.` is accepted too) and resolve paths to absolute ones."""
    doc = load_yaml(config_path)
    stages = doc.get("training") or {}
    if name not in stages:
        raise ConfigError(f"training.{name}: no such stage; stages: {', '.join(stages) or 'none'}")
    prefix = f"training.{name}."
    rel = [o[len(prefix):] if o.startswith(prefix) else o for o in overrides or ()]
    raw = apply_overrides(dict(stages[name] or {}), rel, where=prefix)
    raw["name"] = name
    cfg = stage_from_dict(raw, name)

    # data: a pipeline name resolves to <its output>/shards/<resolution>, which that pipeline must write
    data, null = cfg.data, cfg.null_caption
    if data.pipeline is not None:
        pipes = doc.get("pipelines") or {}
        p = data.pipeline
        if p not in pipes:
            raise ConfigError(f"training.{name}.data.pipeline: no pipeline {p!r}")
        stages_run = (pipes[p] or {}).get("stages")
        if stages_run is not None and "features" not in stages_run:
            raise ConfigError(f"training.{name} reads the shards of pipeline {p!r}, whose stages {list(stages_run)} "
                              "do not include features (nothing writes them)")
        resolutions, t5 = _pipeline_features(doc, p)
        if cfg.resolution not in resolutions:
            raise ConfigError(f"training.{name} (resolution {cfg.resolution}) reads shards/{cfg.resolution} of pipeline "
                              f"{p!r}, but pipelines.{p}.features.resolutions is {list(resolutions)}: add "
                              f"{cfg.resolution} there or change the stage resolution")
        out = (pipes[p] or {}).get("output") or f"runs/{p}"
        data = dataclasses.replace(data, shards=fs.join(fs.normalize(out), "shards", str(cfg.resolution)), pipeline=None)
        null = null if null is not None else t5  # the T5 that encoded these captions
    else:
        data = dataclasses.replace(data, shards=fs.normalize(data.shards))
    if null is not None and null != "keep":
        null = _model_path(null)

    # init_from: a stage name resolves to that stage's output folder (its latest checkpoint)
    init = cfg.init_from
    if init is not None:
        if init == name:
            raise ConfigError(f"training.{name}.init_from: a stage cannot start from itself")
        if init in stages:
            prev = load_stage(config_path, init)
            init = str(prev.output_dir)
        else:
            init = _abs(init)
    return dataclasses.replace(cfg, data=data, init_from=init, null_caption=null, output=cfg.output_dir)

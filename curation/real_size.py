"""The `pixart-sigma` pipeline's models at their REAL size with random weights, and its stages run
on them through the stages' own code (tests/test_real_size.py, benchmarks/real_size.py).

No model hub here, so every model is built from a config kept in the repo and saved where the
stage code loads it from; the stage's own class then loads it exactly as on a cluster:

  score     curation.score.Scorer              open_clip ViT-L-14 (open_clip's own config,
                                               pretrained=None) + LAION aesthetic MLP (768-d)
  features  features.t5.T5Embedder             T5 encoder with T5-v1.1-XXL's width and heads,
                                               configs/real_size/t5-v1_1-xxl-2layers.json (2 of 24
                                               layers; `layers=` for more) + the TINY sentencepiece
                                               tokenizer of models/tiny/t5 (real token ids < 572)
            features.vae.prepare_batch,        SDXL VAE, configs/real_size/sdxl-vae.json
            VaeEncoder
            features.stage.commit_shard +      the shard commit task and index of the features stage
            _sigma.shards
  train     training.train.train               PixArt-XL/2, KV compression R=2 in layers 14-27: the
                                               `sigma-1024-kv` stage of pipelines.yaml, resolution
                                               and step count overridden
  sample    training.sample                    load_dit (verified checkpoint) + sample_latents
                                               (DPM-Solver++, CFG) + decode_latents (SDXL VAE)

Precisions and batch settings come from the `pixart-sigma` pipeline config (score fp16, features
bf16; training `auto` = bf16 autocast on GPU, fp32 on CPU), so on a CPU the stages run in the
dtype their code picks there. Each runner returns plain data (arrays, paths, seconds, peak RSS)
and drops its models before returning: one big model in memory at a time.
"""
from __future__ import annotations

import gc
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines.yaml"
CONFIGS = REPO / "configs" / "real_size"
VAE_CONFIG = CONFIGS / "sdxl-vae.json"
T5_CONFIG = CONFIGS / "t5-v1_1-xxl-2layers.json"
PIPELINE = "pixart-sigma"
DIT_STAGE = "sigma-1024-kv"  # PixArt-XL/2 + KV compression ratio 2 in layers 14..27 (official 1024-KV)
MB = 1 << 20


# --- memory and time ----------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Meter:
    """Wall seconds, CPU seconds (all threads) and peak RSS (MiB) of the process over a block.
    The peak is the kernel's high-water mark, reset on entry; where that is not allowed it is the
    peak since the process started (`peak_since_start`). Meters must not be nested."""

    def __enter__(self) -> "Meter":
        free()
        self.peak_since_start = not _reset_peak()
        self.rss_before = _status_kb("VmRSS") / 1024
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0
        self.peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if self.peak_since_start
                        else _status_kb("VmHWM") / 1024)

    def report(self) -> dict:
        return {"seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
                "rss_before_mb": round(self.rss_before), "peak_rss_mb": round(self.peak_mb)}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def lean_malloc(threshold: int = 1 << 20) -> bool:
    """Serve every allocation >= `threshold` bytes by its own mmap (glibc M_MMAP_THRESHOLD), so a
    freed tensor goes back to the OS at once. glibc's default raises that threshold to 32 MiB after
    the first big free, after which freed weights (XL blocks are 5-21 MiB) stay in the heap: the
    process kept ~4.7 GB after the training step. With it, RSS peaks are the memory the code holds."""
    lib = _libc()
    return bool(lib and hasattr(lib, "mallopt") and lib.mallopt(-3, int(threshold)))  # -3 = M_MMAP_THRESHOLD


def free() -> None:
    gc.collect()
    lib = _libc()
    if lib is not None and hasattr(lib, "malloc_trim"):
        lib.malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- configs and models -------------------------------------------------------------------------
def pipeline_config(overrides=()):
    """The `pixart-sigma` PipelineConfig of pipelines.yaml (model paths not checked: the real-size
    runners pass their own random-weight folders)."""
    from curation.config import load_pipeline

    return load_pipeline(str(PIPELINES), PIPELINE, overrides, check=False)


def write_aesthetic(path: Path, dim: int = 768, seed: int = 0) -> Path:
    """Random LAION aesthetic MLP state dict (the published key layout) for a `dim`-d CLIP."""
    from curation.score import AestheticMLP

    torch.manual_seed(seed)
    torch.save(AestheticMLP(dim).state_dict(), path)
    return Path(path)


def write_vae(out: Path, seed: int = 0) -> Path:
    """Random-weight SDXL VAE (configs/real_size/sdxl-vae.json) saved as a diffusers folder (fp32)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(VAE_CONFIG)))
    vae.save_pretrained(out)
    return Path(out)


def write_t5(out: Path, tokenizer_dir: Path, layers: int | None = None, dtype: torch.dtype = torch.bfloat16,
             seed: int = 0, device: str = "cpu") -> Path:
    """Random-weight T5 encoder of configs/real_size/t5-v1_1-xxl-2layers.json (`layers` overrides
    its depth; 24 = the full XXL encoder) + the tokenizer of `tokenizer_dir`, saved in `dtype`."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    cfg = T5Config.from_json_file(str(T5_CONFIG))
    if layers:
        cfg.num_layers = int(layers)
    torch.manual_seed(seed)
    with torch.device(device):  # the 24-layer encoder (4.7B) initialises on the GPU when there is one
        model = T5EncoderModel(cfg)
    model.to(dtype).save_pretrained(out)
    del model
    free()
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)
    return Path(out)


def tokenizer_dir(tmp: Path) -> Path:
    """The tiny sentencepiece T5 tokenizer: models/tiny/t5 when it is there (read only: the shared
    tiny models are never rebuilt from here), else built into `tmp` by features.tiny."""
    shared = REPO / "models" / "tiny" / "t5"
    if (shared / "tokenizer_config.json").exists():
        return shared
    from features import tiny

    return Path(tiny.build_t5(Path(tmp) / "tiny-t5"))


# --- inputs ---------------------------------------------------------------------------------------
def photos() -> list[tuple[str, bytes]]:
    """Original JPEG bytes of the two photos scikit-learn ships (640x427 each: one bucket)."""
    import sklearn.datasets

    return [(Path(f).stem, Path(f).read_bytes()) for f in sklearn.datasets.load_sample_images().filenames]


def captions(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(long, short) caption pairs of realistic lengths (long: 3-9 sentences, short: alt-text-like)."""
    import random

    from features import tiny

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        short = f"{rng.choice(tiny._SUBJECTS)} {rng.choice(tiny._PLACES)} " + " ".join(rng.sample(tiny._WORDS, 4))
        long_ = " ".join(f"{rng.choice(tiny._SUBJECTS).capitalize()} {rng.choice(tiny._ACTIONS)} "
                         f"{rng.choice(tiny._PLACES)} with {' and '.join(rng.sample(tiny._WORDS, 3))}. "
                         f"{rng.choice(tiny._DETAILS)}" for _ in range(rng.randint(3, 9)))
        out.append((long_, short))
    return out


def image_table(items: list[tuple[str, bytes | None]], part: int = 0):
    """The score stage's input batch: _part, key, image (bytes or null)."""
    import pyarrow as pa

    return pa.table({"_part": pa.array([part] * len(items), pa.int64()),
                     "key": pa.array([f"{part:05d}_{i:06d}" for i in range(len(items))]),
                     "image": pa.array([b for _, b in items], pa.binary())})


def feature_rows(images: list[bytes], texts: list[tuple[str, str]], resolution: int) -> list[dict]:
    """Rows as the features stage feeds T5Embedder (selected_rows + targets): one shard (id 0)."""
    import io

    from PIL import Image

    rows = []
    for i, (data, (long_, short)) in enumerate(zip(images, texts)):
        w, h = Image.open(io.BytesIO(data)).size
        rows.append({"key": f"00000_{i:06d}", "url": f"https://example.com/{i}.jpg", "text_long": long_,
                     "text_short": short, "aesthetic": 6.0, "orig_width": w, "orig_height": h, "image": data,
                     "targets": json.dumps([[resolution, 0]])})
    return rows


# --- stages ---------------------------------------------------------------------------------------
def run_score(cfg, table, aesthetic: Path, seed: int = 0, warmup: bool = False) -> dict:
    """curation.score.Scorer with the pipeline's score settings on one batch (`warmup`: one image
    first, so that timing excludes first-call kernel selection)."""
    from curation.score import Scorer

    s = cfg.score
    torch.manual_seed(seed)  # open_clip's random init
    with Meter() as load:
        scorer = Scorer(clip_model=s.clip_model, clip_pretrained=None, aesthetic_weights=str(aesthetic),
                        max_pixels=s.max_pixels, precision=s.precision, num_gpus=s.resources.num_gpus)
    info = {"device": scorer.device, "dtype": str(scorer.dtype).replace("torch.", ""),
            "params": sum(p.numel() for p in scorer.model.parameters()),
            "dim": int(scorer.model.visual.output_dim)}
    if warmup:
        scorer(table.slice(0, 1))
        sync(scorer.device)
    with Meter() as run:
        out = scorer(table)
        sync(scorer.device)
    del scorer
    free()
    ok = sum(v is not None for v in out.column("aesthetic").to_pylist())
    return {"table": out, **info, "load": load.report(), "run": run.report(),
            "images_per_s": ok / run.seconds}


def run_t5(cfg, t5_dir: Path, rows: list[dict], reference: int | None = 0, null_file: Path | None = None) -> dict:
    """features.t5.T5Embedder with the pipeline's features settings; with `reference`, also that
    caption the OFFICIAL way (tools/extract_features.py: one caption, padded to max_length, T5
    forward, fp16) as an independent reference of the stored valid tokens; with `null_file`, also
    the null caption T5("") padded to max_length (training.null) written there, as a training
    stage caches it (saves the stage a second T5 load)."""
    import pyarrow as pa

    from features.t5 import T5Embedder

    fc = cfg.features
    with Meter() as load:
        emb = T5Embedder(t5=str(t5_dir), max_length=fc.t5_max_length, precision=fc.precision,
                         num_gpus=fc.t5_resources.num_gpus, chunk=fc.t5_resources.batch_size,
                         text_dtype=fc.text_dtype, batch_tokens=fc.t5_batch_tokens)
    info = {"device": emb.device, "dtype": str(emb.dtype).replace("torch.", ""), "dim": emb.dim,
            "params": sum(p.numel() for p in emb.model.parameters())}
    table = pa.Table.from_pylist(rows)
    with Meter() as run:
        out = emb(table)
        sync(emb.device)
    ref = None
    if reference is not None:
        with torch.inference_mode():
            tok = emb.tok([rows[reference]["text_long"]], max_length=fc.t5_max_length, padding="max_length",
                          truncation=True, return_tensors="pt")
            hid = emb.model(tok.input_ids.to(emb.device), attention_mask=tok.attention_mask.to(emb.device))[0]
            ref = {"emb": hid.to(torch.float16).cpu().numpy()[0], "mask": tok.attention_mask.numpy()[0]}
    if null_file is not None:
        from training.null import encode_null, write_null

        write_null(str(null_file), encode_null(emb.tok, emb.model, fc.t5_max_length))
    del emb
    free()
    return {"table": out, **info, "reference": ref, "load": load.report(), "run": run.report(),
            "captions_per_s": 2 * table.num_rows / run.seconds}


def run_vae(cfg, vae_dir: Path, table) -> dict:
    """features.vae.prepare_batch + VaeEncoder with the pipeline's features settings."""
    from features.vae import VaeEncoder, prepare_batch

    fc = cfg.features
    with Meter() as prep:
        prepared = prepare_batch(table)
    with Meter() as load:
        enc = VaeEncoder(vae=str(vae_dir), precision=fc.precision, num_gpus=fc.vae_resources.num_gpus)
    info = {"device": enc.device, "dtype": str(enc.dtype).replace("torch.", ""),
            "params": sum(p.numel() for p in enc.vae.parameters())}
    with Meter() as run:
        out = enc(prepared)
        sync(enc.device)
    del enc
    free()
    return {"table": out, **info, "prepare": prep.report(), "load": load.report(), "run": run.report(),
            "images_per_s": table.num_rows / run.seconds}


def write_shards(cfg, table, out: Path, resolution: int, t5_dir: Path, vae_dir: Path) -> tuple[str, dict]:
    """The features stage's commit task of one shard (features.stage.commit_shard: tar + sidecar)
    and the index its driver builds from the commit summary (shards.build_index -> write_index),
    under `<out>/shards/<resolution>/`. Returns (that folder, the index)."""
    from _sigma import shards
    from features.stage import commit_shard

    fc = cfg.features
    keys = table.column("key").to_pylist()
    meta = {0: {"res": resolution, "part": 0, "idx": 0, "name": shards.shard_name(0, 0), "planned": len(keys),
                "hash": shards.keys_hash(keys), "fp": "real-size-smoke"}}
    summary = commit_shard(0, table, str(out), meta)
    dim = int(json.loads((Path(t5_dir) / "config.json").read_text())["d_model"])
    index = shards.build_index(resolution, [summary],
                               vae={"name": str(vae_dir), "scale_factor": fc.scale_factor, "latent_channels": 4},
                               t5={"name": str(t5_dir), "max_length": fc.t5_max_length, "dim": dim,
                                   "dtype": fc.text_dtype})
    d = shards.shards_dir(str(out), resolution)
    shards.write_index(d, index)
    return d, index


def train_config(shards_dir: Path, output: Path, null_caption: str, steps: int = 1, batch_size: int = 2,
                 resolution: int = 256, stage: str = DIT_STAGE, overrides=()):
    """The `stage` of pipelines.yaml (model, optimiser, grad checkpointing, warmup as configured) on
    these shards at `resolution` (PE settings derived from it), from scratch, one worker."""
    from training.config import load_stage

    sets = [f"resolution={resolution}", f"data={{shards: '{shards_dir}'}}", "init_from=null",
            f"null_caption='{null_caption}'", f"steps={steps}", f"batch_size={batch_size}", "num_workers=1",
            f"output='{output}'", "log_every=1", f"checkpoint_every={steps}", *overrides]
    return load_stage(PIPELINES, stage, sets)


def run_train(cfg) -> dict:
    """training.train.train (the loop: data, dropout, IDDPM loss, backward, clip, CAME, checkpoint)."""
    from training.train import train

    with Meter() as m:
        summary = train(cfg, 0, 1)
    free()
    log = Path(cfg.output_dir) / "logs" / "rank-00000.jsonl"
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "step"]
    return {"summary": summary, "steps": steps, "run": m.report()}


def run_sample(checkpoint: str, vae_dir: Path, y: torch.Tensor, mask: torch.Tensor, height: int, width: int,
               steps: int = 1, cfg_scale: float = 4.5, seed: int = 0, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> dict:
    """training.sample: load_dit (newest verified checkpoint) -> sample_latents -> decode_latents."""
    from diffusers import AutoencoderKL

    from training.sample import decode_latents, load_dit, sample_latents

    with Meter() as load:
        model = load_dit(checkpoint, device=device).to(dtype)
    with Meter() as run:
        lat = sample_latents(model, y, mask, None, height, width, steps, cfg_scale, "dpm", seed)
        sync(device)
    kv = [i for i, b in enumerate(model.blocks) if hasattr(b.attn, "sr")]
    del model
    free()
    with Meter() as dec:
        vae = AutoencoderKL.from_pretrained(str(vae_dir)).to(device).eval()  # as training.sample.main
        img = decode_latents(vae, lat, vae.config.scaling_factor)
    del vae
    free()
    return {"latents": lat.cpu(), "images": img, "kv_layers": kv, "load": load.report(), "run": run.report(),
            "decode": dec.report()}


def state_numel(path: Path, skip=("y_embedder.y_embedding",)) -> tuple[int, dict]:
    """(parameters in a safetensors file without the buffers in `skip`, {key: (shape, dtype)})."""
    from safetensors import safe_open

    n, keys = 0, {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            shape = tuple(sl.get_shape())
            keys[k] = (shape, sl.get_dtype())
            if k not in skip:
                n += int(np.prod(shape))
    return n, keys

"""Small synthetic pipeline outputs for the eval tests (written with the real manifest module): a
manifest in two parts, CLIP embeddings, img2dataset-style download tars (image + json carrying `sigma_key`) with random JPEGs."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from _sigma import manifest

WORDS = ("red blue green small large old new wooden glass metal cat dog tree house river mountain "
         "city street car boat sky cloud light shadow window door table chair flower garden bird "
         "portrait landscape painting photo bright dark soft sharp detailed quiet busy").split()
SIZES = [(96, 96), (128, 72), (72, 128), (160, 96), (96, 160), (120, 90)]


def random_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth random colour field plus mild noise (has structure at several scales)."""
    low = rng.uniform(0, 255, size=(6, 6, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 12, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def make_output(out: Path, n_rows: int = 80, parts: int = 2, dim: int = 16, seed: int = 0) -> dict:
    """Write manifest/, embeddings/ and download/ for a fake pipeline run; returns facts for asserts."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    per = (n_rows + parts - 1) // parts
    emb_all = rng.normal(size=(n_rows, dim)).astype(np.float32)
    # rows 11 and 21 are near duplicates of rows 10 and 20; rows 31 and 41 repeat prompts of 30 and 40
    emb_all[11] = emb_all[10] + 0.01 * rng.normal(size=dim)
    emb_all[21] = emb_all[20] + 0.01 * rng.normal(size=dim)
    emb_all /= np.linalg.norm(emb_all, axis=1, keepdims=True)
    facts = {"keys": [], "bad": set(), "near_dup_pairs": [("00000_000010", "00000_000011")], "images": {}}
    row = 0
    for p in range(parts):
        rows = []
        (out / "download").mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / "download" / f"{p:05d}.tar", "w") as tf:
            for r in range(per):
                if row >= n_rows:
                    break
                key = f"{p:05d}_{r:06d}"
                w, h = SIZES[row % len(SIZES)]
                n_long = int(rng.integers(10, 110))
                long = " ".join(rng.choice(WORDS, n_long))
                short = " ".join(rng.choice(WORDS, int(rng.integers(3, 9))))
                status, selected = "ok", True
                if row % 17 == 5:
                    status, selected = "failed_download", False
                if row % 19 == 7:
                    selected = False
                if row % 23 == 3:
                    long = None  # caption stage failed for this row
                img = random_image(rng, w, h)
                data = jpeg_bytes(img) if status == "ok" else b""
                if status == "ok":
                    iid = f"{p:05d}{r:04d}"
                    _add(tf, f"{iid}.jpg", data)
                    _add(tf, f"{iid}.json", json.dumps({"sigma_key": key, "url": f"http://x/{key}"}).encode())
                    facts["images"][key] = img
                if status != "ok" or not selected or long is None:
                    facts["bad"].add(key)
                rows.append({"key": key, "url": f"http://x/{key}", "caption": short, "status": status,
                             "error": None, "sha256": hashlib.sha256(data).hexdigest() if data else None,
                             "width": w, "height": h, "aspect_ratio": h / w,
                             "aesthetic": float(rng.uniform(3, 8)), "duplicate_of": None,
                             "selected": selected, "reject_reason": None if selected else "x",
                             "caption_long": long, "caption_short": short})
                facts["keys"].append(key)
                row += 1
        # prompt duplicates inside the part
        by_key = {x["key"]: x for x in rows}
        for a, b in ((f"{p:05d}_000030", f"{p:05d}_000031"), (f"{p:05d}_000012", f"{p:05d}_000013")):
            if a in by_key and b in by_key and by_key[a]["caption_long"]:
                by_key[b]["caption_long"] = by_key[a]["caption_long"].upper() + "  "
        manifest.write_part(out, p, pa.Table.from_pylist(rows), "test", "fp")
        ok = [i for i, x in enumerate(rows) if x["status"] == "ok"]
        manifest.write_embeddings(out, p, [rows[i]["key"] for i in ok], emb_all[[p * per + i for i in ok]])
    return facts


def write_shard(out: Path, keys: list[str], resolution: int = 256) -> Path:
    """A training shard written by the real _sigma.shards writer (tiny dummy arrays)."""
    from _sigma.shards import npy_bytes, shard_name, shards_dir
    from _sigma.shards import write_shard as real_write

    path = Path(shards_dir(out, resolution)) / shard_name(0)
    lat = npy_bytes(np.zeros((8, 2, 2), np.float16))
    t5 = npy_bytes(np.zeros((3, 4), np.float16))
    samples = [{"key": k, "meta": {"key": k, "bucket": "1.0"}, "latent": lat, "t5_long": t5, "t5_short": t5}
               for k in keys]
    real_write(path, samples, {})
    return path


def pipeline_cfg(out, **eval_kw):
    from curation.config import PipelineConfig
    from eval.config import EvalConfig

    kw = dict(n=24, fid_extractor="tiny", leak_threshold=0.9, bootstrap=20, kid_subsets=10)
    kw.update(eval_kw)
    return PipelineConfig(name="t", output=str(out), eval=EvalConfig(**kw))


def gen_cfg(out, tiny: Path, **eval_kw):
    """Pipeline config for generation / scoring with the tiny T5, VAE and CLIP (the DiT comes from the
    CLI argument)."""
    from _sigma.config import Resources
    from curation.config import PipelineConfig, ScoreConfig
    from eval.config import EvalConfig
    from features.config import FeaturesConfig

    kw = dict(n=6, fid_extractor="tiny", resolution=256, steps=2, aesthetic_quantile=0.0, bootstrap=20, kid_subsets=10,
              resources=Resources(batch_size=3, actors=1))
    kw.update(eval_kw)
    return PipelineConfig(name="t", output=str(out), eval=EvalConfig(**kw),
                          score=ScoreConfig(clip_model=str(tiny / "clip" / "model_config.json"),
                                            clip_pretrained=str(tiny / "clip" / "open_clip_model.safetensors")),
                          features=FeaturesConfig(vae=str(tiny / "vae"), t5=str(tiny / "t5")))

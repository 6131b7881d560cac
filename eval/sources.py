"""Published prompt sets with their reference images, read from a local folder or URI (_sigma.fs).

MJHQ-30K (playgroundai/MJHQ-30K, the set of Sana's and Playground v2.5's tables), as unpacked:
  <path>/meta_data.json                       {"<id>": {"category": "animals", "prompt": "..."}, ...}
  <path>/mjhq30k_imgs/<category>/<id>.jpg     (or <path>/<category>/<id>.jpg)
  Keys `mjhq-<id>`; 10 categories x 3000; FID is also reported per category. With n below the set
  size, categories keep their share (largest remainder) and ids are drawn in sha256(seed:id) order.
COCO-30K (the usual text-to-image protocol: 30K images of COCO 2014 val, one caption each):
  <path>/annotations/captions_val2014.json    (or <path>/captions_val2014.json), COCO format
  <path>/val2014/<file_name>
  Keys `coco-<image_id>`; images drawn in sha256(seed:image_id) order; each image's caption is the
  one with the smallest sha256(seed:annotation id) (a seeded, order-independent choice).
Rows carry `image` = the reference image's path relative to <path>, its sha256 (for the hold-out
list: a byte copy in our own data is a leak too), width/height, category and the aspect bucket.

Near copies: the hold-out search (eval.leaks) compares the manifest's CLIP image embeddings (the
score stage's, `score.clip_model`) with the reference images' embeddings under the same model and
preprocessing (open_clip's eval transform of the decoded image), computed once per benchmark
version by `reference_clip_embeddings` on this process's device and cached beside the list
(`<version>/reference_clip.npz`, keyed by the model), so a resized / re-encoded / lightly edited
copy of an MJHQ or COCO image in our data is held out like one of our own benchmark's.
"""
from __future__ import annotations

import hashlib
import io

from _sigma import fs
from eval.stratify import nearest_bucket, quotas, rank



def _image_info(uri: str) -> dict:
    """sha256 and size of a reference image (reads the file once; Pillow reads the header only)."""
    from PIL import Image

    data = fs.read_bytes(uri)
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    return {"sha256": hashlib.sha256(data).hexdigest(), "width": w, "height": h}


def _row(key: str, prompt: str, image: str, info: dict, **extra) -> dict:
    return {"key": key, "prompt": prompt, "prompt_long": prompt, "prompt_short": prompt, "image": image,
            "sha256": info["sha256"], "aesthetic": None, "width": info["width"], "height": info["height"],
            "bucket": nearest_bucket(info["height"] / info["width"]), **extra}


def load_mjhq(path: str, n: int, seed: int) -> list[dict]:
    base = fs.normalize(path)
    meta_uri = fs.join(base, "meta_data.json")
    if not fs.isfile(meta_uri):
        raise FileNotFoundError(f"{meta_uri}: not found (MJHQ-30K layout: meta_data.json + mjhq30k_imgs/<category>/<id>.jpg)")
    meta = fs.read_json(meta_uri)
    if not isinstance(meta, dict) or not all(isinstance(v, dict) and "prompt" in v and "category" in v
                                             for v in meta.values()):
        raise ValueError(f"{meta_uri}: expected {{id: {{category, prompt}}}}")
    by_cat: dict[str, list[str]] = {}
    for i, v in meta.items():
        by_cat.setdefault(str(v["category"]), []).append(str(i))
    q = quotas({c: len(v) for c, v in by_cat.items()}, n)
    sub = "mjhq30k_imgs" if fs.isdir(fs.join(base, "mjhq30k_imgs")) else ""
    rows = []
    for cat in sorted(by_cat):
        ids = sorted(by_cat[cat], key=lambda i: (rank(seed, i), i))[:q[cat]]
        for i in ids:
            rel = "/".join(x for x in (sub, cat, f"{i}.jpg") if x)
            rows.append(_row(f"mjhq-{i}", str(meta[i]["prompt"]).strip(), rel, _image_info(fs.join(base, rel)),
                             category=cat))
    return sorted(rows, key=lambda r: r["key"])


def load_coco(path: str, n: int, seed: int) -> list[dict]:
    base = fs.normalize(path)
    ann_uri = next((u for u in (fs.join(base, "annotations", "captions_val2014.json"),
                                fs.join(base, "captions_val2014.json")) if fs.isfile(u)), None)
    if ann_uri is None:
        raise FileNotFoundError(f"{base}: no annotations/captions_val2014.json (COCO-30K layout: "
                                "annotations/captions_val2014.json + val2014/<file_name>)")
    doc = fs.read_json(ann_uri)
    images = {int(im["id"]): im for im in doc.get("images", [])}
    caps: dict[int, list[dict]] = {}
    for a in doc.get("annotations", []):
        if isinstance(a.get("caption"), str) and a["caption"].strip() and int(a["image_id"]) in images:
            caps.setdefault(int(a["image_id"]), []).append(a)
    ids = sorted(caps, key=lambda i: (rank(seed, str(i)), i))[:n]
    rows = []
    for i in ids:
        a = min(caps[i], key=lambda a: (rank(seed, str(a["id"])), a["id"]))
        rel = f"val2014/{images[i]['file_name']}"
        rows.append(_row(f"coco-{i}", " ".join(a["caption"].split()), rel, _image_info(fs.join(base, rel)),
                         category=None))
    return sorted(rows, key=lambda r: r["key"])


def load_source(ecfg) -> list[dict]:
    if ecfg.benchmark == "mjhq-30k":
        return load_mjhq(ecfg.benchmark_path, ecfg.n, ecfg.seed)
    if ecfg.benchmark == "coco-30k":
        return load_coco(ecfg.benchmark_path, ecfg.n, ecfg.seed)
    raise ValueError(f"not a published prompt set: {ecfg.benchmark!r}")


CLIP_CACHE = "reference_clip.npz"


def reference_clip_embeddings(cfg, version: str, rows: list[dict], progress: bool = False) -> dict:
    """{key: (D,) float32 unit embedding} of a published set's reference images under the pipeline's
    CLIP (score.clip_model); unreadable images are skipped (they cannot be copied either). Cached."""
    import json

    import numpy as np

    from _sigma import holdout
    from _sigma.device import pick_device
    from eval.clipscore import ClipScorer
    from eval.reference import iter_reference_images

    model = f"{cfg.score.clip_model}|{cfg.score.clip_pretrained}"
    uri = fs.join(holdout.version_dir(cfg.out, version), CLIP_CACHE)
    if fs.isfile(uri):
        with np.load(io.BytesIO(fs.read_bytes(uri)), allow_pickle=False) as z:
            if str(z["model"]) == model and len(z["keys"]) > 0:
                return dict(zip(z["keys"].tolist(), z["emb"]))
    scorer = ClipScorer(cfg.score.clip_model, cfg.score.clip_pretrained, pick_device())
    keys, chunks, buf = [], [], []

    def flush():
        if buf:
            chunks.append(scorer.embed_images([im for _, im in buf]).cpu().numpy().astype(np.float32))
            keys.extend(k for k, _ in buf)
            buf.clear()

    for key, img, _err in iter_reference_images(cfg.out, rows, cfg.eval.benchmark_path):
        if img is not None:
            buf.append((key, img))
            if len(buf) == cfg.eval.batch_size:
                flush()
    flush()
    emb = np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32)
    b = io.BytesIO()
    np.savez(b, keys=np.asarray(keys, dtype=str), emb=emb, model=np.array(model),
             meta=np.array(json.dumps({"n": len(keys), "of": len(rows)})))
    fs.write_bytes(uri, b.getvalue())
    return dict(zip(keys, emb))

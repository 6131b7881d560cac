"""Published prompt sets from local folders in their own layouts: MJHQ-30K (meta_data.json, per
category) and COCO-30K (captions_val2014.json + val2014/), through build, reference and score."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest

from _sigma import holdout, manifest
from eval import build_benchmark as bb
from eval import generate as g
from eval import reference, score
from evaldata import gen_cfg, make_output, random_image

CATS = ("animals", "food", "people")


def mjhq(root, per_cat=4):
    rng = np.random.default_rng(0)
    meta = {}
    for c in CATS:
        (root / "mjhq30k_imgs" / c).mkdir(parents=True)
        for j in range(per_cat):
            i = hashlib.sha1(f"{c}{j}".encode()).hexdigest()[:12]
            meta[i] = {"category": c, "prompt": f"a {c} picture number {j} with some detail"}
            random_image(rng, 64, 64).save(root / "mjhq30k_imgs" / c / f"{i}.jpg")
    (root / "meta_data.json").write_text(json.dumps(meta))
    return meta


def coco(root, n_images=7):
    rng = np.random.default_rng(1)
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    images, anns = [], []
    for i in range(n_images):
        iid = 1000 + 7 * i
        name = f"COCO_val2014_{iid:012d}.jpg"
        random_image(rng, 80 + 8 * i, 60).save(root / "val2014" / name)
        images.append({"id": iid, "file_name": name, "width": 80 + 8 * i, "height": 60})
        for j in range(5):
            anns.append({"id": 50 * i + j, "image_id": iid, "caption": f"  caption {j} of   image {iid} "})
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return images


def test_mjhq_layout_categories_and_quotas(tmp_path):
    from eval.sources import load_mjhq

    meta = mjhq(tmp_path / "mjhq")
    rows = load_mjhq(str(tmp_path / "mjhq"), 12, seed=0)
    assert len(rows) == 12 and {r["key"] for r in rows} == {f"mjhq-{i}" for i in meta}
    r = rows[0]
    i = r["key"][5:]
    assert r["prompt"] == meta[i]["prompt"] and r["category"] == meta[i]["category"]
    assert r["image"] == f"mjhq30k_imgs/{r['category']}/{i}.jpg" and r["bucket"] == "1.0"
    assert r["sha256"] == hashlib.sha256((tmp_path / "mjhq" / r["image"]).read_bytes()).hexdigest()
    six = load_mjhq(str(tmp_path / "mjhq"), 6, seed=0)  # categories keep their share
    assert sorted(r["category"] for r in six) == sorted(CATS * 2)
    assert [r["key"] for r in load_mjhq(str(tmp_path / "mjhq"), 6, seed=1)] != [r["key"] for r in six]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta_data.json").write_text(json.dumps({"x": {"prompt": "p"}}))
    with pytest.raises(ValueError, match="category, prompt"):
        load_mjhq(str(tmp_path / "bad"), 5, 0)


def test_coco_layout_one_seeded_caption_per_image(tmp_path):
    from eval.sources import load_coco

    images = coco(tmp_path / "coco")
    rows = load_coco(str(tmp_path / "coco"), 5, seed=0)
    assert len(rows) == 5 and len({r["key"] for r in rows}) == 5
    for r in rows:
        iid = int(r["key"][5:])
        assert r["prompt"].startswith("caption ") and r["prompt"].endswith(f"of image {iid}")  # whitespace collapsed
        assert r["image"] == f"val2014/COCO_val2014_{iid:012d}.jpg"
        im = next(i for i in images if i["id"] == iid)
        assert (r["width"], r["height"]) == (im["width"], im["height"])
    assert load_coco(str(tmp_path / "coco"), 5, seed=0) == rows  # deterministic
    with pytest.raises(FileNotFoundError, match="captions_val2014.json"):
        load_coco(str(tmp_path), 5, 0)


def _clip_embeddings_with_a_near_copy(out, root, cfg, facts) -> dict:
    """Give part 0 the embeddings the score stage would compute with the pipeline's (tiny) CLIP, one
    row's image being a half-size JPEG copy of an MJHQ reference image; the keys an independent
    numpy search of those embeddings against the reference images finds at the threshold."""
    import io

    from PIL import Image

    from eval.clipscore import ClipScorer

    clip = ClipScorer(cfg.score.clip_model, cfg.score.clip_pretrained)
    keys, _ = manifest.read_part_embeddings(str(out), 0)
    keys = [str(k) for k in keys]
    ref_paths = sorted(root.glob("mjhq30k_imgs/*/*.jpg"))
    of = ref_paths[5]
    orig = Image.open(of).convert("RGB")
    b = io.BytesIO()
    orig.resize((32, 32), Image.BILINEAR).save(b, "JPEG", quality=80)
    imgs = {k: facts["images"][k] for k in keys}
    imgs[keys[4]] = Image.open(io.BytesIO(b.getvalue())).convert("RGB")
    emb = clip.embed_images([imgs[k] for k in keys]).numpy()
    manifest.write_embeddings(str(out), 0, keys, emb)
    ref = clip.embed_images([Image.open(p).convert("RGB") for p in ref_paths]).numpy().astype(np.float64)
    e16 = emb.astype(np.float16).astype(np.float64)  # as stored
    e16 /= np.linalg.norm(e16, axis=1, keepdims=True)
    sims = e16 @ ref.T
    return {"expected": {k for k, s in zip(keys, sims.max(1)) if s >= cfg.eval.leak_threshold - 1e-4},
            "copy_key": keys[4], "of": f"mjhq-{of.stem}"}


def test_mjhq_benchmark_end_to_end_with_per_category_fid(tmp_path, tiny_models):
    """build (+ hold-out of a training row with the same prompt), reference from the folder,
    score a run made of the reference images: FID 0 overall and per category."""
    from PIL import Image

    out = tmp_path / "run"
    facts = make_output(out, n_rows=24, parts=1)
    meta = mjhq(tmp_path / "mjhq")
    t = manifest.read_part(str(out), 0)  # a training row whose caption is an MJHQ prompt
    caps = t.column("caption_short").to_pylist()
    caps[3] = next(iter(meta.values()))["prompt"].upper()
    manifest.write_part(str(out), 0, t.set_column(t.schema.get_field_index("caption_short"), "caption_short",
                                                   pa.array(caps)), "test", "fp")
    cfg = gen_cfg(out, tiny_models, benchmark="mjhq-30k", benchmark_path=str(tmp_path / "mjhq"), n=12,
                  leak_threshold=0.93)
    near = _clip_embeddings_with_a_near_copy(out, tmp_path / "mjhq", cfg, facts)
    info = bb.build(cfg)
    assert info["source"] == "mjhq-30k" and info["n"] == 12 and info["selection"]["categories"] == {c: 4 for c in CATS}
    held = holdout.version_keys(str(out), info["version"])
    assert held == {f"mjhq-{i}" for i in meta} | {"00000_000003"} | near["expected"]
    assert near["copy_key"] in near["expected"]  # the resized JPEG copy of an MJHQ image
    table = {r["key"]: r for r in holdout.fs.read_parquet(holdout.exclude_uri(str(out), info["version"])).to_pylist()}
    assert "near_duplicate" in table[near["copy_key"]]["reason"] and table[near["copy_key"]]["benchmark_key"] == near["of"]
    assert info["hold_out"]["benchmark_embeddings"] == 12
    _, rows, info = bb.current(cfg)
    ref, rmeta, _ = reference.reference_features(cfg, rows, info, progress=False)
    assert len(ref) == 12 and rmeta["failed"] == []
    d = g.run_dir(str(out), "copy")
    for r in rows:  # a "generation run" of the reference images themselves
        Image.open(tmp_path / "mjhq" / r["image"]).convert("RGB").save(tmp_path / "x.png")
        g.fs.write_bytes(g.image_path(d, r["key"]), (tmp_path / "x.png").read_bytes())
    g.fs.write_json(g.fs.join(d, g.META), {"benchmark_checksum": info["checksum"], "protocol": {}})
    res = score.score_run(cfg, "copy", progress=False)
    assert res["comparable"] and res["n_scored"] == 12
    assert abs(res["fid"]) < 1e-3  # JPEG decoded -> PNG: identical pixels, identical features
    assert [c["category"] for c in res["categories"]] == list(CATS) and all(c["n"] == 4 for c in res["categories"])
    assert all(abs(c["fid"]) < 1e-3 for c in res["categories"])
    assert res["protocol"]["reference_set"]["source"] == "mjhq-30k"

"""The tiny CLIP tells images apart (curation/tiny.py, curation/clip_tiny_modeling.py), measured
with the real Scorer on the built tiny models: unrelated demo images stay well below the demo's
dedup threshold, copies a person would call duplicates stay above it, the demo's planted near
duplicates are exactly the pairs above it, the ViT weights compute the documented descriptor
(against numpy), the aesthetic model follows colourfulness, and a rebuild gives the same bytes.

Measured at the demo threshold 0.92 on the 36 demo rows select can keep (random weights before:
every pair > 0.9, mean 0.9): unrelated pairs max 0.890 (green circle on yellow vs green square
on orange), p99 0.81, mean 0.35; the 4 planted copies >= 0.996; 648 transformed copies min
0.954 (stripes cropped 10 % on the left), colour jitter >= 0.961, resized 0.5x-2x and re-encoded
JPEG >= 0.999.
"""
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageEnhance

from _sigma.images import decode_image
from curation import clip_tiny_modeling as ctm
from curation import demo_data as dd
from curation import tiny
from curation.config import load_pipeline
from _sigma.models import load_clip
from curation.score import Scorer

REPO = Path(__file__).resolve().parents[2]


def _threshold(cfg) -> float:
    """The demo's near-duplicate threshold (select.dedup_threshold once dedup keeps candidates)."""
    return getattr(cfg.select, "dedup_threshold", None) or cfg.dedup.threshold


def _jpeg(img: Image.Image, q: int = 90) -> bytes:
    b = io.BytesIO()
    img.convert("RGB").save(b, "JPEG", quality=q)
    return b.getvalue()


def copies(img: Image.Image) -> dict[str, bytes]:
    """What a person still calls the same picture: re-encoded, resized 0.5x-2x, cropped by at
    most 10 % of the area, slightly colour-jittered. img: RGB as decoded for scoring."""
    w, h = img.size
    out = {f"jpeg{q}": _jpeg(img, q) for q in (40, 75, 95)}
    for s in (0.5, 0.75, 1.5, 2.0):
        out[f"resize{s}"] = _jpeg(img.resize((max(1, int(w * s)), max(1, int(h * s))), Image.BILINEAR), 85)
    for name, (l, t, r, b) in {"crop_left10": (.1, 0, 0, 0), "crop_top10": (0, .1, 0, 0), "crop_right10": (0, 0, .1, 0),
                               "crop_bottom10": (0, 0, 0, .1), "crop_corner5": (0, 0, .05, .05),
                               "crop_around2.5": (.025, .025, .025, .025)}.items():
        out[name] = _jpeg(img.crop((int(w * l), int(h * t), w - int(w * r), h - int(h * b))))
    for name, op, f in (("brighter8", ImageEnhance.Brightness, 1.08), ("darker8", ImageEnhance.Brightness, 0.92),
                        ("contrast10", ImageEnhance.Contrast, 1.1), ("desaturate10", ImageEnhance.Color, 0.9)):
        out[name] = _jpeg(op(img).enhance(f))
    hsv = np.array(img.convert("HSV")).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + 5) % 256  # hue +7 degrees
    out["hue7"] = _jpeg(Image.fromarray(hsv.astype(np.uint8), "HSV"))
    return out


def _embed(scorer, blobs: dict) -> tuple[dict, dict]:
    """name -> (64,) embedding and name -> (width, height), through Scorer.__call__."""
    emb, size = {}, {}
    names = list(blobs)
    for s in range(0, len(names), 64):
        k = names[s:s + 64]
        r = scorer(pa.table({"_part": [0] * len(k), "key": k, "image": [blobs[n] for n in k]}))
        for n, e, w, h in zip(k, r.column("embedding").to_pylist(), r.column("width").to_pylist(),
                              r.column("height").to_pylist()):
            emb[n], size[n] = np.asarray(e, np.float64), (w, h)
    return emb, size


@pytest.fixture(scope="module")
def scorer(tiny_models):
    t = tiny_models
    return Scorer(str(t / "clip/model_config.json"), str(t / "clip/open_clip_model.safetensors"),
                  str(t / "aesthetic.pth"), max_pixels=10 ** 8, precision="fp32")


@pytest.fixture(scope="module")
def demo(scorer):
    """The demo's rows that select can keep (status ok, short side >= min_side, aspect ok)."""
    cfg = load_pipeline(str(REPO / "pipelines.yaml"), "demo", check=False)
    items = [it for it in dd.demo_items() + dd.bad_items() if it.expect == "ok"]
    emb, size = _embed(scorer, {it.name: it.body for it in items})
    s = cfg.select

    def keepable(n):
        w, h = size[n]
        return min(w, h) >= s.min_side and s.min_aspect_ratio <= h / w <= s.max_aspect_ratio

    items = [it for it in items if keepable(it.name)]
    assert len(items) >= 30 and {it.name for it in items if it.near_dup_of}  # photos, shapes, planted copies
    return cfg, items, emb


def test_unrelated_demo_images_are_far_below_the_threshold(demo):
    cfg, items, emb = demo
    names = [it.name for it in items if not it.near_dup_of]
    E = np.stack([emb[n] for n in names])
    sims = (E @ E.T)[np.triu_indices(len(names), 1)]
    assert np.allclose(np.linalg.norm(E, axis=1), 1, atol=1e-5)
    assert sims.max() <= _threshold(cfg) - 0.02, sims.max()  # measured 0.890 at 0.92
    assert sims.mean() < 0.5  # random weights: 0.9


def test_planted_near_duplicates_are_exactly_the_pairs_above_the_threshold(demo):
    cfg, items, emb = demo
    names = [it.name for it in items]
    planted = {frozenset((it.name, it.near_dup_of)) for it in items if it.near_dup_of}
    assert len(planted) == 4
    above = {frozenset((a, b)) for i, a in enumerate(names) for b in names[i + 1:]
             if emb[a] @ emb[b] >= _threshold(cfg)}
    assert above == planted
    assert min(emb[a] @ emb[b] for a, b in map(tuple, planted)) > 0.99


def test_copies_a_person_calls_duplicates_stay_above_the_threshold(scorer, demo):
    cfg, items, emb = demo
    blobs = {}
    for it in items:
        if not it.near_dup_of:
            for t, b in copies(decode_image(it.body, 10 ** 8)[0]).items():  # as displayed and scored
                blobs[(it.name, t)] = b
    cemb, _ = _embed(scorer, blobs)
    sims = {k: float(v @ emb[k[0]]) for k, v in cemb.items()}
    worst = min(sims, key=sims.get)
    assert sims[worst] >= _threshold(cfg) + 0.02, (worst, sims[worst])  # measured 0.954 at 0.92
    # and a copy is always closer to its original than any other demo image is
    others = {it.name: max(emb[it.name] @ emb[o.name] for o in items if o.name != it.name and not o.near_dup_of)
              for it in items if not it.near_dup_of}
    assert all(s > others[k[0]] for k, s in sims.items())


def _reference_descriptor(x: np.ndarray, mean, std) -> np.ndarray:
    """numpy: what the module docstring says the ViT computes, from the (3, 64, 64) input."""
    p = x * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]  # pixels 0..1
    opp = np.stack([p.mean(0), p[0] - p[1], (p[0] + p[1]) / 2 - p[2]])  # L, R-G, B-Y
    pm = opp.reshape(3, 8, 8, 8, 8).mean((2, 4))  # (3, 8, 8) patch means
    c = np.arange(8) - 3.5
    v, u = np.meshgrid(c, c, indexing="ij")
    win = np.lib.stride_tricks.sliding_window_view(opp[0], (8, 8))[::4, ::4]  # (15, 15, 8, 8), stride 4
    energy = np.zeros((4, 8, 8))
    for o, th in enumerate(np.pi * np.arange(4) / 4):
        t = u * np.cos(th) + v * np.sin(th)
        e = 0
        for k in (np.sin(np.pi * t / 4), np.cos(np.pi * t / 4)):
            k = k - k.mean()
            e = e + np.einsum("ijhw,hw->ij", win, k * 2 / np.abs(k).sum()) ** 2
        for a in range(8):  # token (a, b) owns windows (2a + dy, 2b + dx) inside the image
            for b in range(8):
                energy[o, a, b] = sum(e[2 * a + dy, 2 * b + dx] for dy in (0, 1) for dx in (0, 1)
                                      if 2 * a + dy < 15 and 2 * b + dx < 15) / 4
    hist = []
    for ch, (centres, width) in enumerate(ctm.HIST_BINS):
        hist += [np.clip(1 - np.abs(pm[ch] - cb) / width, 0, None).mean() for cb in centres]
    col, loge = [], []
    for rows, cols in ctm.REGIONS:
        wgt = np.outer(rows, cols)
        col += list((pm * wgt).sum((1, 2)) / wgt.sum())
        loge += list(np.log((energy * wgt).sum((1, 2)) / wgt.sum() + ctm.LOG_FLOOR) + ctm.LOG_SHIFT)
    return np.array(col + hist + loge)


def test_vit_weights_compute_the_documented_descriptor(tiny_models):
    model, preprocess, _ = load_clip(str(tiny_models / "clip/model_config.json"),
                                     str(tiny_models / "clip/open_clip_model.safetensors"))
    pp = preprocess.transforms[-1]  # Normalize(mean, std)
    lay = ctm.layout()[0]
    dims = sum(ctm.descriptor_dims(lay).values(), [])
    imgs = [Image.open(io.BytesIO(it.body)) for it in dd.demo_items(n_synthetic=3, near_duplicates=False)[::2]]
    got = tiny.descriptors(model, preprocess, imgs, lay) - model.visual.ln_post.bias[dims].detach().double().numpy()
    ref = np.stack([_reference_descriptor(preprocess(im.convert("RGB")).numpy().astype(np.float64), pp.mean, pp.std)
                    for im in imgs])
    offset = np.array([c @ np.asarray(pp.mean) for c in ctm.OPP] * len(ctm.REGIONS))  # the conv has no bias
    n_col, n_hist = 3 * len(ctm.REGIONS), len(lay.hist)
    np.testing.assert_allclose(got[:, :n_col] + offset, ref[:, :n_col], atol=2e-3)
    np.testing.assert_allclose(got[:, n_col:n_col + n_hist], ref[:, n_col:n_col + n_hist], atol=5e-3)
    # log energies: piecewise-linear log (knots sqrt(2) apart) and GELU-made squares: ~0.05
    np.testing.assert_allclose(got[:, n_col + n_hist:], ref[:, n_col + n_hist:], atol=0.08)


def test_aesthetic_scores_follow_colourfulness(scorer, demo):
    _, items, _ = demo
    r = scorer(pa.table({"_part": [0] * len(items), "key": [it.name for it in items],
                         "image": [it.body for it in items]}))
    got = np.array(r.column("aesthetic").to_pylist())
    want = np.array([tiny.aesthetic_target(Image.open(io.BytesIO(it.body))) for it in items])
    assert np.corrcoef(got, want)[0, 1] > 0.6
    grey = [i for i, it in enumerate(items) if it.name in ("photo_camera.jpg", "photo_coins.jpg", "gray16.png")]
    assert got[grey].max() < np.median(got)


def test_build_is_deterministic(tmp_path, tiny_models):
    paths = tiny.build(tmp_path / "a")
    for key, rel in (("clip_config", "clip/model_config.json"), ("clip_weights", "clip/open_clip_model.safetensors"),
                     ("aesthetic", "aesthetic.pth")):
        assert Path(paths[key]).read_bytes() == (tiny_models / rel).read_bytes(), key

"""The score stage's filters (nsfw, watermark, clip_similarity) against references outside our code,
select's rules for them, and the Keras weight reader on hostile files.

References: the NSFW MLP re-stated here in numpy from the published Keras layer semantics (on
weights generated here, written in the released layout); timm's EfficientNet built by name with
LAION's head and torchvision's transform; open_clip's encode_image / encode_text cosine and its
tokenizer's own token count.
"""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pyarrow as pa
import pytest
import torch

from _sigma.config import ConfigError, fingerprint, parse
from curation.config import PipelineConfig, SelectConfig
from curation.keras_weights import KerasWeightsError, write_model
from curation.nsfw import load_nsfw
from curation.select import reject_reasons

REAL_CATEGORICAL = (180, 316, 413, 440, 644)  # the released model's "int" columns (its keras_metadata.pb)
REAL_CHAIN = ["input_1", "multi_category_encoding", "normalization", "dense", "re_lu", "dense_1", "re_lu_1",
              "dense_2", "re_lu_2", "dense_3", "classification_head_1"]
LONG = " ".join(f"word{i}" for i in range(120))  # far over 77 CLIP tokens


# --- NSFW -----------------------------------------------------------------------------------------

def _keras_nsfw(dim: int, cats, rng):
    """A model config + weights + lookup tables in the released layout (layers named as released)."""
    from curation.filters_tiny_modeling import _keras_config

    config = _keras_config(dim, tuple(cats))
    w = {"mean": rng.normal(0, 0.03, dim), "variance": rng.uniform(1e-4, 1e-3, dim)}
    tables, vocabs = [], []
    for j, c in enumerate(cats):
        toks = sorted({f"{v:f}" for v in rng.normal(0, 0.04, 300).astype(np.float16).astype(np.float64)})
        vocabs.append({t: i + 1 for i, t in enumerate(toks)})
        tables.append((np.array([t.encode() for t in toks], dtype=object), np.arange(1, len(toks) + 1)))
        w["mean"][c], w["variance"][c] = len(toks) / 2, (len(toks) / 3) ** 2
    w["variance"][7] = 0.0  # a constant column: Keras floors sqrt(variance) at 1e-7
    tensors = {"layer_with_weights-1/mean/.ATTRIBUTES/VARIABLE_VALUE": w["mean"].astype(np.float32),
               "layer_with_weights-1/variance/.ATTRIBUTES/VARIABLE_VALUE": w["variance"].astype(np.float32),
               "layer_with_weights-1/count/.ATTRIBUTES/VARIABLE_VALUE": np.int64(1000)}
    dense, width = [], dim
    for k, units in enumerate((64, 512, 256, 1)):
        kern, bias = rng.normal(0, 1 / np.sqrt(width), (width, units)), rng.normal(0, 0.1, units)
        if k == 0:
            kern[7] = 0.0  # the floored column's huge value must not saturate everything
        tensors[f"layer_with_weights-{k + 2}/kernel/.ATTRIBUTES/VARIABLE_VALUE"] = kern.astype(np.float32)
        tensors[f"layer_with_weights-{k + 2}/bias/.ATTRIBUTES/VARIABLE_VALUE"] = bias.astype(np.float32)
        dense.append((kern.astype(np.float32).astype(np.float64), bias.astype(np.float32).astype(np.float64)))
        width = units
    return config, tensors, tables, w, vocabs, dense


def _reference_nsfw(emb: np.ndarray, cats, w, vocabs, dense) -> np.ndarray:
    """The published model, layer by layer (Keras semantics), in float64 numpy."""
    x = np.nan_to_num(emb.astype(np.float64))
    for j, c in enumerate(cats):  # StringLookup of as_string(value) ("%f"); unknown -> OOV index 0
        x[:, c] = [vocabs[j].get("%f" % v, 0) for v in emb[:, c].astype(np.float64)]
    mean, var = w["mean"].astype(np.float32), w["variance"].astype(np.float32)
    x = (x - mean) / np.maximum(np.sqrt(var.astype(np.float64)), 1e-7)
    for k, (kern, bias) in enumerate(dense):
        x = x @ kern + bias
        x = np.maximum(x, 0) if k < len(dense) - 1 else 1 / (1 + np.exp(-x))
    return x[:, 0]


def test_nsfw_head_equals_the_published_mlp_restated(tmp_path):
    rng = np.random.default_rng(0)
    config, tensors, tables, w, vocabs, dense = _keras_nsfw(768, REAL_CATEGORICAL, rng)
    path = write_model(tmp_path / "clip_autokeras_binary_nsfw.zip", config, tensors, tables)
    emb = rng.normal(0, 1, (40, 768))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    # half of the rows carry values the vocabularies know (fp16-rounded, like LAION's embeddings)
    emb[:20] = emb[:20].astype(np.float16).astype(np.float64)
    hit = [list(v)[i] for i, v in enumerate(vocabs)]
    emb[0, list(REAL_CATEGORICAL)] = [float(h) for h in hit]
    model = load_nsfw(str(path))
    assert model.cat_columns == REAL_CATEGORICAL and list(model.dense) == ["dense", "dense_1", "dense_2", "dense_3"]
    got = model(torch.tensor(emb, dtype=torch.float32)).detach().numpy()
    ref = _reference_nsfw(emb.astype(np.float32), REAL_CATEGORICAL, w, vocabs, dense)
    assert np.abs(got - ref).max() < 2e-5
    assert ref.std() > 0.05  # the check is not on a saturated output
    assert model.encode(torch.tensor(emb[:1], dtype=torch.float32))[0, REAL_CATEGORICAL[0]] == 1.0  # a vocab hit
    # the unzipped SavedModel folder loads the same
    with zipfile.ZipFile(path) as z:
        z.extractall(tmp_path / "x")
    again = load_nsfw(str(tmp_path / "x" / "clip_autokeras_binary_nsfw"))(torch.tensor(emb, dtype=torch.float32))
    assert torch.equal(again, torch.tensor(got))


def test_tiny_nsfw_twin_has_the_released_layer_chain(tiny_models):
    from curation.keras_weights import read_model

    config, tensors, tables = read_model(tiny_models / "nsfw.zip")
    layers = config["config"]["layers"]
    assert [x["name"] for x in layers] == REAL_CHAIN
    assert [x["config"]["units"] for x in layers if x["class_name"] == "Dense"] == [64, 512, 256, 1]
    assert layers[-1]["config"]["activation"] == "sigmoid" and len(tables) == 2
    assert tensors["layer_with_weights-2/kernel/.ATTRIBUTES/VARIABLE_VALUE"].shape == (64, 64)  # tiny CLIP dim 64


def _small_model(tmp_path, name="m.zip"):
    rng = np.random.default_rng(1)
    config, tensors, tables, *_ = _keras_nsfw(16, (3,), rng)
    return write_model(tmp_path / name, config, tensors, tables), config, tensors, tables


def test_keras_reader_refuses_corrupt_and_foreign_files(tmp_path):
    path, config, tensors, tables = _small_model(tmp_path)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}

    def rezip(name, change):
        out = tmp_path / name
        with zipfile.ZipFile(out, "w") as z:
            for m, data in members.items():
                data = change(m, data)
                if data is not None:
                    z.writestr(m, data)
        return str(out)

    flip = lambda m, d: (d[:40] + bytes([d[40] ^ 1]) + d[41:]) if m.endswith("data-00000-of-00001") else d  # noqa: E731
    with pytest.raises(KerasWeightsError, match="checksum"):
        load_nsfw(rezip("flip.zip", flip))
    cut = lambda m, d: d[:-30] if m.endswith("variables.index") else d  # noqa: E731
    with pytest.raises(KerasWeightsError, match="variables.index"):
        load_nsfw(rezip("cut.zip", cut))
    with pytest.raises(KerasWeightsError, match="keras_metadata.pb"):
        load_nsfw(rezip("nometa.zip", lambda m, d: None if m.endswith("keras_metadata.pb") else d))
    with pytest.raises(KerasWeightsError, match="lookup tables"):
        load_nsfw(rezip("nograph.zip", lambda m, d: None if m.endswith("saved_model.pb") else d))
    (tmp_path / "junk.zip").write_bytes(raw[:100])
    with pytest.raises(KerasWeightsError):
        load_nsfw(str(tmp_path / "junk.zip"))
    bad = dict(config, config={"layers": config["config"]["layers"][:3] + [
        {"class_name": "BatchNormalization", "name": "bn", "config": {"name": "bn"},
         "inbound_nodes": [[["normalization", 0, 0, {}]]]}] + config["config"]["layers"][3:]})
    with pytest.raises(KerasWeightsError, match="not part of the NSFW MLP"):
        load_nsfw(str(write_model(tmp_path / "bn.zip", bad, tensors, tables)))
    with pytest.raises(FileNotFoundError):
        load_nsfw(str(tmp_path / "absent.zip"))


# --- the Scorer against timm / open_clip ----------------------------------------------------------

@pytest.fixture(scope="module")
def photos():
    from curation.demo_data import photos as demo_photos

    return [img.convert("RGB") for _, img in demo_photos()][:8]  # scikit-image / scikit-learn photos


@pytest.fixture(scope="module")
def scored(tiny_models, photos):
    from curation.score import Scorer

    def png(im):
        b = io.BytesIO()
        im.save(b, "PNG")  # lossless, no JPEG draft: the decoded image is the PIL image itself
        return b.getvalue()

    caps = ["a photo", LONG, "", None] + ["an image of things"] * (len(photos) - 4)
    table = pa.table({"_part": [0] * len(photos), "key": [f"k{i}" for i in range(len(photos))],
                      "image": [png(im) for im in photos], "caption": caps})
    scorer = Scorer(clip_model=str(tiny_models / "clip" / "model_config.json"),
                    clip_pretrained=str(tiny_models / "clip" / "open_clip_model.safetensors"),
                    aesthetic_weights=str(tiny_models / "aesthetic.pth"), max_pixels=10**9, precision="fp32",
                    nsfw_weights=str(tiny_models / "nsfw.zip"), watermark_weights=str(tiny_models / "watermark.pt"),
                    watermark_arch="test_efficientnet", clip_similarity=True)
    return scorer(table).to_pydict(), caps


def test_watermark_equals_timm_model_built_by_name(tiny_models, photos, scored):
    import timm
    import torchvision.transforms as T
    from torch import nn

    out, _ = scored
    ref = timm.create_model("test_efficientnet", pretrained=False, num_classes=2)
    ref.classifier = nn.Sequential(nn.Linear(ref.num_features, 625), nn.ReLU(), nn.Dropout(p=0.3),
                                   nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2))  # LAION's head
    ref.load_state_dict(torch.load(tiny_models / "watermark.pt", weights_only=True))
    tf = T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    with torch.no_grad():
        p = torch.softmax(ref.eval()(torch.stack([tf(im) for im in photos])), dim=1)[:, 0].numpy()
    assert np.abs(np.array(out["watermark"]) - p).max() < 1e-4
    assert p.max() - p.min() > 0.05  # spread: the comparison is not on a constant


def test_clip_similarity_equals_open_clip_cosine(tiny_models, photos, scored):
    import open_clip

    out, caps = scored
    open_clip.add_model_config(tiny_models / "clip" / "model_config.json")
    model, _, pre = open_clip.create_model_and_transforms(
        "model_config", pretrained=str(tiny_models / "clip" / "open_clip_model.safetensors"))
    tok = open_clip.get_tokenizer("model_config")
    rows = [i for i, c in enumerate(caps) if c is not None]
    with torch.no_grad():
        img = model.eval().encode_image(torch.stack([pre(photos[i]) for i in rows]))
        txt = model.encode_text(tok([caps[i] for i in rows]))
    cos = torch.nn.functional.cosine_similarity(img, txt).numpy()
    got = np.array([out["clip_similarity"][i] for i in rows])
    assert np.abs(got - cos).max() < 1e-5
    assert out["clip_similarity"][3] is None and out["text_truncated"][3] is None  # no alt text
    # truncated <=> start + the caption's BPE tokens + end exceed the 77-token context
    assert [out["text_truncated"][i] for i in rows] == [len(tok.encode(caps[i])) + 2 > 77 for i in rows]
    assert out["text_truncated"][1] is True and out["text_truncated"][0] is False


def test_clip_similarity_truncation_boundary(tiny_models):
    """75 BPE tokens + start + end fill the context exactly (not truncated); 76 do not fit."""
    import open_clip

    from curation.score import Scorer

    tok = open_clip.get_tokenizer("ViT-L-14")
    assert len(tok.encode("cat " * 75)) == 75
    sc = Scorer.__new__(Scorer)  # only the text path: the tiny CLIP + its tokenizer
    from _sigma.models import load_clip

    sc.model, sc.preprocess, sc.tokenizer = load_clip(str(tiny_models / "clip" / "model_config.json"),
                                                      str(tiny_models / "clip" / "open_clip_model.safetensors"))
    sc.device, sc.nsfw, sc.watermark, sc.similarity = "cpu", None, None, True
    emb = torch.nn.functional.normalize(torch.randn(2, 64), dim=-1)
    batch = pa.table({"caption": ["cat " * 75, "cat " * 76]})
    with torch.inference_mode():
        f = sc._filters(emb, [0, 1], batch, 2, [])
    assert f["text_truncated"] == [False, True]
    from curation.score import clip_tokens

    texts = ["cat " * 75, "cat " * 76, LONG, "", "a photo", "ünïcödé &amp; <b>html</b>"]
    tokens, cut = clip_tokens(tok, texts)  # one tokenisation, cut open_clip's way
    assert torch.equal(tokens, tok(texts)) and cut == [False, True, True, False, False, False]


def test_nsfw_column_is_the_head_on_the_stored_embedding(tiny_models, scored):
    out, _ = scored
    head = load_nsfw(str(tiny_models / "nsfw.zip"))
    with torch.no_grad():
        ref = head(torch.tensor(np.array(out["embedding"]), dtype=torch.float32)).numpy()
    assert np.abs(np.array(out["nsfw"]) - ref).max() < 1e-6


# --- select and config ----------------------------------------------------------------------------

def test_select_rejects_on_the_filters_with_reasons():
    rng = np.random.default_rng(3)
    n = 60
    nsfw, wm, sim = rng.uniform(0, 1, n), rng.uniform(0, 1, n), rng.uniform(-0.3, 0.6, n)
    nsfw[5], wm[6], sim[7] = np.nan, np.nan, np.nan  # not scored by that filter
    status = ["ok"] * n
    status[9] = "failed_download"
    t = pa.table({"key": [f"{i:05d}" for i in range(n)], "status": status,
                  "width": pa.array([None if s != "ok" else 2000 for s in status], pa.int64()),
                  "height": pa.array([None if s != "ok" else 1500 for s in status], pa.int64()),
                  "aesthetic": [6.0] * n, "nsfw": nsfw, "watermark": wm, "clip_similarity": sim})
    cfg = SelectConfig(nsfw_max=0.5, watermark_max=0.8, clip_similarity_min=0.28)
    got = reject_reasons(t, cfg)
    for i in range(n):  # plain recount of the documented rules
        if status[i] != "ok":
            assert got[i] == status[i]
            continue
        want = [r for r, bad in (("nsfw", not nsfw[i] <= 0.5), ("watermark", not wm[i] <= 0.8),
                                 ("low_clip_similarity", not sim[i] >= 0.28)) if bad]
        assert got[i] == (";".join(want) or None), i
    assert reject_reasons(t, SelectConfig()) == [None if s == "ok" else s for s in status]  # filters off


def test_filter_rules_need_their_score_column_and_valid_values():
    base = {"name": "x", "output": "/tmp/x"}
    with pytest.raises(ConfigError, match="score.nsfw_weights"):
        parse(PipelineConfig, {**base, "select": {"nsfw_max": 0.5}})
    with pytest.raises(ConfigError, match="score.clip_similarity"):
        parse(PipelineConfig, {**base, "select": {"clip_similarity_min": 0.28}})
    with pytest.raises(ConfigError, match="watermark_max"):
        parse(PipelineConfig, {**base, "select": {"watermark_max": 1.5}})
    cfg = parse(PipelineConfig, {**base, "score": {"clip_similarity": True, "watermark_weights": "w.pt"},
                                 "select": {"clip_similarity_min": 0.28, "watermark_max": 0.5}})
    assert cfg.select.clip_similarity_min == 0.28


def test_score_fingerprint_unchanged_while_the_filters_are_off():
    """Outputs scored before the filters existed stay done (no rescoring after an upgrade)."""
    from curation.score import score_fingerprint

    cfg = parse(PipelineConfig, {"name": "x", "output": "/tmp/x"})
    s = cfg.score
    old = fingerprint({"clip": s.clip_model, "pretrained": s.clip_pretrained, "aes": s.aesthetic_weights,
                       "max_pixels": s.max_pixels, "precision": s.precision})
    assert score_fingerprint(cfg) == old
    on = parse(PipelineConfig, {"name": "x", "output": "/tmp/x", "score": {"clip_similarity": True}})
    assert score_fingerprint(on) != old


def test_nsfw_head_for_another_clip_is_refused_at_load(tiny_models, tmp_path):
    from curation.score import Scorer

    path, *_ = _small_model(tmp_path)  # a 16-d head; the tiny CLIP gives 64-d embeddings
    with pytest.raises(ValueError, match="16-d embeddings.*64-d"):
        Scorer(clip_model=str(tiny_models / "clip" / "model_config.json"),
               clip_pretrained=str(tiny_models / "clip" / "open_clip_model.safetensors"),
               aesthetic_weights=str(tiny_models / "aesthetic.pth"), max_pixels=10**8, nsfw_weights=str(path))

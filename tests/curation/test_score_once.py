"""Score each distinct sha256 once (issue 22 item 10): byte-identical images get bit-identical
values, whatever batch or part their copies land in, and dedup_keep: best then keeps the lowest key.

Byte copies of a few images are spread over three parts and over batches of different sizes
(batch_size 3 on parts of 5 rows: the float sums of a CLIP forward depend on the batch, so the
same image scored in a batch of 3 and in one of 2 differs in the last bits). The reference values
come from the Scorer run on each distinct image alone; the distinct count from a recount of the
manifest's sha256 column.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest

from _sigma import manifest
from _sigma.config import parse
from curation import demo_data as dd
from curation.config import PipelineConfig
from curation.dedup import run_dedup
from curation.download import run_download
from curation.inputs import prepare_inputs
from curation.score import Scorer, run_score
from curation.select import run_select

# Row order of the URL list (parts of 5): A x4, B x3, C x2 in different parts and batch slots.
ORDER = ["A", "d1", "B", "d2", "A",
         "C", "B", "A", "d3", "C",
         "d4", "A", "B", "d5", "d6"]


def _image(i: int) -> bytes:
    c = list(dd.COLOURS)
    return dd._jpeg(dd.synthetic(c[i % len(c)], c[(i + 3) % len(c)], dd.SHAPES[i % 3], (1100, 1040), i))


def _cfg(out, urls, tiny):
    return parse(PipelineConfig, {
        "name": "once", "output": str(out), "input": {"path": str(urls), "part_size": 5},
        "download": {"processes": 1, "threads": 4, "allow_private_addresses": True},
        "score": {"clip_model": f"{tiny}/clip/model_config.json",
                  "clip_pretrained": f"{tiny}/clip/open_clip_model.safetensors",
                  "aesthetic_weights": f"{tiny}/aesthetic.pth", "precision": "fp32",
                  "resources": {"batch_size": 3}},
        "dedup": {"near": False},  # exact copies only: which copy is kept is then the question
        "select": {"min_side": 1, "dedup_keep": "best", "aesthetic_min": None}})


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_models, ray_local):
    d = tmp_path_factory.mktemp("once")
    bodies = {name: _image(i) for i, name in enumerate(sorted(set(ORDER)))}
    items = [dd.Item(f"{n}_{i}.jpg", bodies[n], f"copy {i} of {n}") for i, n in enumerate(ORDER)]
    with pytest.MonkeyPatch.context() as mp, dd.DemoServer(items) as srv:
        mp.setenv("SIGMA_QUIET", "1")
        dd.write_url_list(srv, items, d / "urls.parquet", with_edge_rows=False)
        cfg = _cfg(d / "out", d / "urls.parquet", tiny_models)
        prepare_inputs(cfg.input, cfg.out)
        run_download(cfg, cfg.out, progress=False)
    summary = run_score(cfg, cfg.out, progress=False)
    return {"cfg": cfg, "out": cfg.out, "bodies": bodies, "summary": summary, "tiny": tiny_models}


def _groups(rows):
    by_sha = defaultdict(list)
    for r in rows:
        by_sha[r["sha256"]].append(r)
    return by_sha


@pytest.mark.slow
def test_byte_copies_get_bit_identical_values(scored):
    rows = manifest.read_manifest(scored["out"]).to_pylist()
    assert len(rows) == len(ORDER) and all(r["status"] == "ok" for r in rows)
    keys, emb = manifest.read_embeddings(scored["out"])
    emb_of = dict(zip(keys.tolist(), emb))
    sha_of = {n: hashlib.sha256(b).hexdigest() for n, b in scored["bodies"].items()}
    assert {r["sha256"] for r in rows} == set(sha_of.values())  # recorded hashes = the served bytes
    for sha, copies in _groups(rows).items():
        first = copies[0]
        for r in copies[1:]:
            for col in ("aesthetic", "width", "height", "aspect_ratio", "mode_in"):
                assert r[col] == first[col], (col, r["key"], first["key"])
            assert emb_of[r["key"]].tobytes() == emb_of[first["key"]].tobytes()


@pytest.mark.slow
def test_values_are_those_of_the_image_scored_alone(scored):
    """Each copy carries its own image's values (not another image's): the Scorer on each distinct
    image alone, independently of the stage's batching, agrees to float rounding."""
    t = scored["tiny"]
    scorer = Scorer(clip_model=f"{t}/clip/model_config.json", clip_pretrained=f"{t}/clip/open_clip_model.safetensors",
                    aesthetic_weights=f"{t}/aesthetic.pth", max_pixels=10**8, precision="fp32")
    ref = {}
    for name, body in scored["bodies"].items():
        one = scorer(pa.table({"_part": [0], "key": [name], "image": [body]})).to_pylist()[0]
        ref[hashlib.sha256(body).hexdigest()] = one
    for r in manifest.read_manifest(scored["out"]).to_pylist():
        assert r["aesthetic"] == pytest.approx(ref[r["sha256"]]["aesthetic"], abs=1e-4)
        assert (r["width"], r["height"]) == (ref[r["sha256"]]["width"], ref[r["sha256"]]["height"])


@pytest.mark.slow
def test_each_distinct_image_is_scored_once(scored):
    rows = manifest.read_manifest(scored["out"]).to_pylist()
    distinct = len({r["sha256"] for r in rows if r["download_status"] == "success"})  # a plain recount
    assert scored["summary"]["images_scored"] == len(ORDER)
    assert scored["summary"]["distinct_images_scored"] == distinct == len(set(ORDER))


@pytest.mark.slow
def test_dedup_keep_best_keeps_the_lowest_key_of_byte_copies(scored):
    cfg, out = scored["cfg"], scored["out"]
    run_dedup(cfg, out, progress=False)
    run_select(cfg, out, progress=False)
    rows = manifest.read_manifest(out).to_pylist()
    for sha, copies in _groups(rows).items():
        if len(copies) < 2:
            continue
        kept = [r["key"] for r in copies if not r["duplicate_of"]]
        assert kept == [min(r["key"] for r in copies)], (sha, [(r["key"], r["aesthetic"]) for r in copies])


def test_copies_with_their_own_alt_text_get_their_own_clip_similarity(tiny_models):
    """ScoreOnce alone (no Ray): image columns are the owner's, bit for bit; clip_similarity /
    text_truncated follow each copy's own alt text, as the Scorer gives them for that row alone.
    An owner whose bytes are missing names itself in its copies' reason."""
    from curation.score import MISSING
    from curation.score_once import ScoreOnce

    t = tiny_models
    kw = dict(clip_model=f"{t}/clip/model_config.json", clip_pretrained=f"{t}/clip/open_clip_model.safetensors",
              aesthetic_weights=f"{t}/aesthetic.pth", max_pixels=10**8, precision="fp32", clip_similarity=True)
    img = _image(0)
    long_text = "a very long alt text " * 40  # over CLIP's 77 tokens: truncated
    copies = [[{"_part": 0, "key": "00000_000001", "caption": "a red circle"},
               {"_part": 0, "key": "00000_000004", "caption": "a red circle"},
               {"_part": 2, "key": "00002_000000", "caption": long_text},
               {"_part": 1, "key": "00001_000003", "caption": None}],
              [{"_part": 1, "key": "00001_000000", "caption": "x"},
               {"_part": 2, "key": "00002_000001", "caption": "y"}]]
    batch = pa.table({"_part": [0, 1], "key": ["00000_000001", "00001_000000"], "caption": ["a red circle", "x"],
                      "image": [img, None], "copies": copies})
    out = {r["key"]: r for r in ScoreOnce(**kw)(batch).to_pylist()}
    assert sorted(out) == sorted(c["key"] for cs in copies for c in cs)
    assert {out[c["key"]]["_part"] for c in copies[0]} == {0, 2, 1}
    owner = out["00000_000001"]
    for k in ("00000_000004", "00002_000000", "00001_000003"):
        assert out[k]["aesthetic"] == owner["aesthetic"] and out[k]["embedding"] == owner["embedding"]
    assert out["00000_000004"]["clip_similarity"] == owner["clip_similarity"]  # same alt text: same value
    scorer = Scorer(**kw)
    for key, cap in (("00000_000001", "a red circle"), ("00002_000000", long_text)):
        alone = scorer(pa.table({"_part": [0], "key": [key], "caption": [cap], "image": [img]})).to_pylist()[0]
        assert out[key]["clip_similarity"] == pytest.approx(alone["clip_similarity"], abs=1e-5)
        assert out[key]["text_truncated"] == alone["text_truncated"]
    assert out["00002_000000"]["text_truncated"] is True and out["00000_000001"]["text_truncated"] is False
    assert out["00001_000003"]["clip_similarity"] is None  # no alt text, nothing to compare
    assert out["00001_000000"]["score_error"] == MISSING
    why = out["00002_000001"]["score_error"]
    assert why.startswith(MISSING) and "00001_000000" in why

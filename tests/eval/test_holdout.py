"""Leak-free by construction: exact copies, near copies in another k-means cluster and shared prompts
of benchmark rows are held out, also when they arrive after the benchmark was built; features
leaves them out; eval.score refuses shards that hold one."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from _sigma import holdout, manifest
from eval import build_benchmark as bb
from eval import score
from evaldata import make_output, pipeline_cfg, write_shard

THRESHOLD = 0.9


def _unit(v):
    return v / np.linalg.norm(v)


def _near_copy_in_another_cluster(emb: np.ndarray, b: int, km) -> np.ndarray:
    """A vector with cosine in [0.9, 0.95] to row b that k-means assigns to another cluster than
    b: walk from b towards other rows until the assigned cluster changes."""
    cb = km.labels_[b]
    for o in np.argsort(emb @ emb[b])[::-1][1:]:
        for t in np.linspace(0.05, 1.0, 40):
            v = _unit(emb[b] + t * (emb[o] - emb[b])).astype(emb.dtype)
            if THRESHOLD <= v @ emb[b] <= 0.95 and km.predict(v[None])[0] != cb:
                return v
    raise AssertionError("no cross-cluster near copy found")


@pytest.fixture()
def built(tmp_path):
    out = tmp_path / "run"
    make_output(out, n_rows=80, parts=2, dim=16)
    cfg = pipeline_cfg(out, n=10, aesthetic_quantile=0.0, leak_threshold=THRESHOLD)
    info = bb.build(cfg)
    rows, _ = bb.read_benchmark(str(out), info["version"])
    return out, cfg, info, rows


def _inject(out, rows) -> dict:
    """Part 2, written AFTER the benchmark: copies of benchmark rows under new keys + a control."""
    from sklearn.cluster import KMeans

    keys, emb = manifest.read_embeddings(str(out))
    emb = emb.astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    idx = {k: i for i, k in enumerate(keys.tolist())}
    b0, b1, b2 = (rows[i] for i in range(3))
    km = KMeans(n_clusters=8, n_init=4, random_state=0).fit(emb)  # SemDeDup-style partition
    near = _near_copy_in_another_cluster(emb, idx[b1["key"]], km)
    rng = np.random.default_rng(7)
    plan = {
        "00002_000000": ("same_sha256", b0["sha256"], emb[idx[b0["key"]]], "a different caption entirely", True),
        "00002_000001": ("near_duplicate", "f" * 64, near, "another unrelated caption here", True),
        "00002_000002": ("same_prompt", "e" * 64, _unit(rng.normal(size=16)), "  " + b2["prompt"].upper() + " ", True),
        "00002_000003": ("near_duplicate", "d" * 64, emb[idx[b1["key"]]], "unselected copy", False),
        "00002_000004": (None, "c" * 64, _unit(rng.normal(size=16)), "nothing to do with the benchmark", True),
    }
    table = pa.Table.from_pylist([
        {"key": k, "url": f"http://x/{k}", "caption": "x", "status": "ok", "error": None, "sha256": sha,
         "width": 96, "height": 96, "aspect_ratio": 1.0, "aesthetic": 5.0, "duplicate_of": None, "selected": sel,
         "reject_reason": None, "caption_long": "long " + cap, "caption_short": cap}
        for k, (_, sha, _, cap, sel) in plan.items()])
    manifest.write_part(str(out), 2, table, "test", "fp")
    manifest.write_embeddings(str(out), 2, list(plan), np.stack([v for _, _, v, _, _ in plan.values()]))
    return {"plan": plan, "clusters": (km.predict(near[None])[0], km.labels_[idx[b1["key"]]])}


def test_copies_added_after_the_build_are_held_out(built):
    out, cfg, info, rows = built
    got = _inject(out, rows)
    assert got["clusters"][0] != got["clusters"][1]  # the near copy sits in another k-means cluster
    before = holdout.version_keys(str(out), info["version"])
    assert not set(got["plan"]) & before
    again = bb.build(cfg)  # the same version: rows unchanged, the new part searched
    assert again["unchanged"] and again["checksum"] == info["checksum"]
    assert again["hold_out"]["parts_searched"] == 1 and again["hold_out"]["parts"] == 3
    table = {r["key"]: r for r in manifest.fs.read_parquet(holdout.exclude_uri(str(out), info["version"])).to_pylist()}
    for key, (reason, *_rest) in got["plan"].items():
        if reason is None:
            assert key not in table
        else:
            assert reason in table[key]["reason"].split(";"), (key, table[key])
    assert table["00002_000001"]["benchmark_key"] == rows[1]["key"] and table["00002_000001"]["similarity"] >= THRESHOLD
    assert set(before) <= set(table)  # the list only grows
    # nothing new: nothing searched
    assert bb.build(cfg)["hold_out"]["parts_searched"] == 0


def test_a_fresh_search_finds_every_planted_copy_and_only_those(built):
    out, cfg, info, rows = built
    got = _inject(out, rows)
    info2 = bb.build(pipeline_cfg(out, n=10, aesthetic_quantile=0.0, leak_threshold=THRESHOLD, seed=5))
    rows2, _ = bb.read_benchmark(str(out), info2["version"])
    # independent check: exhaustive numpy search of every row against the new benchmark
    keys, emb = manifest.read_embeddings(str(out))
    emb = emb.astype(np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    idx = {k: i for i, k in enumerate(keys.tolist())}
    bkeys = [r["key"] for r in rows2]
    sims = emb @ emb[[idx[k] for k in bkeys]].T
    expect_near = {k for k, i in idx.items() if sims[i].max() >= THRESHOLD and k not in bkeys}
    t = manifest.read_manifest(str(out)).to_pylist()
    bsha = {r["sha256"] for r in rows2}
    bprompts = {" ".join(p.lower().split()) for r in rows2 for p in (r["prompt_long"], r["prompt_short"])}
    expect_sha = {r["key"] for r in t if r["sha256"] in bsha and r["key"] not in bkeys}
    expect_prompt = {r["key"] for r in t if r["key"] not in bkeys and any(
        isinstance(r.get(c), str) and " ".join(r[c].lower().split()) in bprompts
        for c in ("caption", "caption_short", "caption_long"))}
    table = {r["key"]: r["reason"].split(";")
             for r in manifest.fs.read_parquet(holdout.exclude_uri(str(out), info2["version"])).to_pylist()}
    assert {k for k, r in table.items() if "near_duplicate" in r} == expect_near
    assert {k for k, r in table.items() if "same_sha256" in r} == expect_sha
    assert {k for k, r in table.items() if "same_prompt" in r} == expect_prompt
    assert set(table) == set(bkeys) | expect_near | expect_sha | expect_prompt


def test_features_leaves_out_every_held_out_key(built):
    from features.plan import part_rows

    out, cfg, info, rows = built
    _inject(out, rows)
    bb.build(cfg)
    held = holdout.excluded_keys(str(out))
    kept, excluded = [], 0
    for p in manifest.list_parts(str(out)):  # the features stage's own row selection, part by part
        part_kept, stats = part_rows(str(out), p, held)
        kept, excluded = kept + part_kept, excluded + stats["excluded"]
    selected = {r["key"] for r in manifest.read_manifest(str(out)).to_pylist() if r["selected"]}
    assert kept and not {r["key"] for r in kept} & held
    assert excluded == len(selected & held) > 10


def test_score_refuses_shards_holding_a_held_out_key(built):
    out, cfg, info, rows = built
    got = _inject(out, rows)
    bb.build(cfg)
    assert score.verify_hold_out(str(out), info["version"])["leaked"] == 0  # no shards yet
    write_shard(out, ["00002_000004"])  # the unrelated control row: fine
    assert score.verify_hold_out(str(out), info["version"])["training_shard_keys"] == 1
    write_shard(out, ["00002_000004", "00002_000001"], resolution=512)  # the near copy: a leak
    with pytest.raises(score.LeakError, match="1 held-out keys are in the training shards"):
        score.verify_hold_out(str(out), info["version"])
    assert got


def test_sha256_of_the_fixture_is_the_image_bytes(built):
    """The exact-copy rule compares the manifest's sha256, which the download stage computes over
    the original bytes: check the fixture keeps that contract."""
    from _sigma.images import iter_download_images

    out, _, _, rows = built
    r = rows[0]
    data = dict(iter_download_images(str(out), int(r["key"][:5]), {r["key"]}))[r["key"]]
    assert hashlib.sha256(data).hexdigest() == r["sha256"]


def test_the_list_records_what_it_covers_and_a_grown_manifest_is_stale(built):
    """The footer maps each searched part to its sha256 (the manifest's integrity record); a part
    added, or rewritten (rows appended), after the search makes the list stale."""
    out, cfg, info, rows = built
    v = info["version"]
    states = holdout.recorded_states(str(out), v)
    for p in (0, 1):
        rec = manifest.fs.read_json(manifest.sums_uri(str(out), p))
        data = (out / "manifest" / f"part-{p:05d}.parquet").read_bytes()
        assert states[p]["sha256"] == rec["sha256"] == hashlib.sha256(data).hexdigest()
    assert holdout.check_current(str(out)) == {v: 2}
    _inject(out, rows)  # part 2 appears
    t = manifest.read_part(str(out), 0)
    bkey = next(r["key"] for r in rows if r["key"].startswith("00000_"))
    i = t.column("key").to_pylist().index(bkey)
    twin = t.slice(i, 1).set_column(0, "key", pa.array(["00000_000999"]))  # a byte copy of a benchmark row
    manifest.write_part(str(out), 0, pa.concat_tables([t, twin]), "test", "fp")  # part 0 grows by one row
    assert holdout.stale_parts(str(out), v) == [0, 2]
    with pytest.raises(holdout.StaleHoldoutError, match=r"parts \[0, 2\]"):
        holdout.check_current(str(out))
    bb.build(cfg)  # eval_split again: searches exactly those two parts
    assert holdout.check_current(str(out)) == {v: 3}
    table = {r["key"]: r for r in manifest.fs.read_parquet(holdout.exclude_uri(str(out), v)).to_pylist()}
    assert "same_sha256" in table["00000_000999"]["reason"] and table["00000_000999"]["benchmark_key"] == bkey


def test_score_extends_a_stale_list_before_checking_the_shards(built):
    out, cfg, info, rows = built
    v = info["version"]
    got = _inject(out, rows)  # after the benchmark: copies in a new part
    write_shard(out, ["00002_000004", "00002_000001"])  # features ran on the grown manifest WITHOUT a search
    assert not {"00002_000001"} & holdout.version_keys(str(out), v)
    with pytest.raises(holdout.StaleHoldoutError, match="does not cover manifest parts"):
        score.verify_hold_out(str(out), v)  # no config: cannot extend, refuses
    with pytest.raises(score.LeakError, match="1 held-out keys are in the training shards"):
        score.verify_hold_out(str(out), v, cfg)  # extends (searches part 2), then finds the near copy
    assert holdout.stale_parts(str(out), v) == [] and set(got["plan"]) - {"00002_000004"} <= \
        holdout.version_keys(str(out), v)
    write_shard(out, ["00002_000004"])  # only the unrelated row
    ok = score.verify_hold_out(str(out), v, cfg)
    assert ok["leaked"] == 0 and ok["extended_over"] is None


def test_demo_leak_threshold_sits_below_the_tiny_clip_copy_floor(tiny_models):
    """The demo's eval.leak_threshold against the score stage's own embeddings (curation.score.Scorer,
    tiny CLIP) of edited copies of the demo images: every copy is at or above it (so it would be held
    out), every pair of unrelated demo images below it (the old 0.995 missed most copies)."""
    import io
    from pathlib import Path

    from PIL import Image, ImageEnhance

    from curation import demo_data as dd
    from curation.config import load_pipeline
    from curation.score import Scorer

    cfg = load_pipeline(str(Path(__file__).resolve().parents[2] / "pipelines.yaml"), "demo", check=False)
    t = cfg.eval.leak_threshold
    scorer = Scorer(str(tiny_models / "clip/model_config.json"), str(tiny_models / "clip/open_clip_model.safetensors"),
                    str(tiny_models / "aesthetic.pth"), max_pixels=10 ** 8, precision="fp32")

    def jpeg(im, q=85):
        b = io.BytesIO()
        im.convert("RGB").save(b, "JPEG", quality=q)
        return b.getvalue()

    items = [it for it in dd.demo_items() if it.expect == "ok" and not it.near_dup_of][:12]
    blobs = {}
    for it in items:
        im = Image.open(io.BytesIO(it.body)).convert("RGB")
        w, h = im.size
        blobs[(it.name, "orig")] = it.body
        blobs[(it.name, "jpeg40")] = jpeg(im, 40)
        blobs[(it.name, "half")] = jpeg(im.resize((w // 2, h // 2), Image.BILINEAR))
        blobs[(it.name, "crop10")] = jpeg(im.crop((int(0.1 * w), 0, w, h)))
        blobs[(it.name, "bright8")] = jpeg(ImageEnhance.Brightness(im).enhance(1.08))
    names = list(blobs)
    r = scorer(pa.table({"_part": [0] * len(names), "key": [f"{a}|{b}" for a, b in names],
                         "image": [blobs[n] for n in names]}))
    emb = {n: np.asarray(e, np.float64) for n, e in zip(names, r.column("embedding").to_pylist()) if e is not None}
    copies = [float(emb[n] @ emb[(n[0], "orig")]) for n in names if n[1] != "orig" and n in emb]
    origs = np.stack([emb[(it.name, "orig")] for it in items])
    unrelated = (origs @ origs.T)[np.triu_indices(len(items), 1)]
    assert len(copies) == 4 * len(items) >= 40
    assert min(copies) >= t > unrelated.max(), (min(copies), t, unrelated.max())
    assert min(copies) < 0.995  # the demo's old threshold let such copies into training

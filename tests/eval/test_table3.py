"""Table 3 in one command: two checkpoints (no KV compression / KV compression of the deep layers),
FID + CMMD + CLIP-Score on the same prompts and interleaved latencies, written as markdown + CSV."""
from __future__ import annotations

import csv
import io

import pytest

from _sigma import fs
from eval import build_benchmark as bb
from eval import table3
from evaldata import gen_cfg, make_output


@pytest.fixture()
def two_checkpoints(tmp_path, tiny_models):
    import torch

    from training.checkpoint import write_model_only
    from training.model import build_model
    from training.tiny import PRESET, RESOLUTION

    torch.manual_seed(1)
    kw = {"base_size": RESOLUTION // 16, "pe_interpolation": RESOLUTION / 512, "kv_compress_ratio": 2,
          "kv_compress_mode": "avgpool", "kv_compress_layers": [1, 2]}
    kv = write_model_only(tmp_path / "kv", build_model(PRESET, **kw),
                          {"preset": PRESET, "model_kwargs": kw, "resolution": RESOLUTION})
    return str(tiny_models / "dit"), str(kv)


@pytest.mark.slow  # ~4 min on 2 loaded cores (Ray generation of 2 x 4 images, 3 latency rounds)
def test_table3_end_to_end(tmp_path, tiny_models, two_checkpoints, ray_local):
    out = tmp_path / "run"
    make_output(out, n_rows=30)
    cfg = gen_cfg(out, tiny_models, n=4, steps=2, bootstrap=10)
    bb.build(cfg)
    base, kv = two_checkpoints
    doc = table3.build_table(cfg, [("base", base, "base"), ("kv-deep", kv, "kv-deep")], device="cpu",
                             train_batch=2, train_res=256, test_res=256, test_steps=2, repeats=2, warmup=1,
                             progress=False)
    rows = {r["label"]: r for r in doc["rows"]}
    assert rows["base"]["kv_layers"] == "none" and rows["base"]["kv_ratio"] == 1
    assert rows["kv-deep"]["kv_layers"].startswith("1-2 of ") and rows["kv-deep"]["kv_operator"] == "avgpool"
    for r in rows.values():
        s = r["score"]
        assert s["n_scored"] == 4 and s["comparable"]  # every prompt of the same benchmark
        assert s["fid"] is not None and s["cmmd"] is not None and s["clip_score"] is not None
        assert s["cmmd_ci"][0] <= s["cmmd"] <= s["cmmd_ci"][1]
        assert len(r["train_times"]) == len(r["test_times"]) == 2 and min(r["train_times"] + r["test_times"]) > 0
        assert r["train"]["median"] == sorted(r["train_times"])[0] + (sorted(r["train_times"])[1] - sorted(r["train_times"])[0]) / 2
    # the same prompts on both rows: the score files name the same benchmark checksum
    assert len({r["score"]["protocol"]["benchmark_checksum"] for r in rows.values()}) == 1
    d = table3.table_dir(str(out))
    md = fs.read_text(fs.join(d, "table3.md"))
    for word in ("FID", "CMMD", "CLIP-Score", "s/iter, batch 2 @ 256 px", "s/img @ 256 px, 2 steps", "interleaved",
                 doc["device"], "| kv-deep |", "avgpool"):
        assert word in md, word
    table = list(csv.DictReader(io.StringIO(fs.read_text(fs.join(d, "table3.csv")))))
    assert [t["label"] for t in table] == ["base", "kv-deep"]
    assert float(table[1]["cmmd"]) == pytest.approx(rows["kv-deep"]["score"]["cmmd"])
    assert float(table[0]["test_s_per_image"]) == pytest.approx(rows["base"]["test"]["median"])
    # a second call reuses the images and the current scores (nothing generated or scored again)
    again = table3.build_table(cfg, [("base", base, "base")], name="again", device="cpu", train_batch=1,
                               repeats=1, warmup=0, latency=False, progress=False)
    assert again["rows"][0]["generated_now"] == 0 and again["rows"][0]["reused_score"]
    assert again["rows"][0]["score"]["cmmd"] == rows["base"]["score"]["cmmd"]

"""training.config + training.train: stage parsing/resolution, lr rules, the loop's logs, EMA,
stage chaining (PE interpolation, KV compression avg init) and official .pth init."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from common.config import ConfigError
from test_checkpoint import tiny_stage
from test_data import write_synthetic_shards
from training import checkpoint as ckpt
from training.config import load_stage

REPO = Path(__file__).resolve().parents[2]


def _yaml(tmp_path, training: dict) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"pipelines": {"mini": {"output": str(tmp_path / "run")}}, "training": training}))
    return p


def test_load_stage_resolves_pipeline_init_and_overrides(tmp_path):
    cfg_file = _yaml(tmp_path, {
        "a": {"resolution": 256, "data": {"pipeline": "mini"}, "steps": 5, "batch_size": 2,
              "model": {"preset": "PixArt-tiny"}, "output": str(tmp_path / "out-a")},
        "b": {"resolution": 512, "data": {"pipeline": "mini"}, "steps": 5, "batch_size": 2, "init_from": "a",
              "model": {"preset": "PixArt-tiny", "kv_compress_ratio": 2}},
    })
    b = load_stage(cfg_file, "b", ["steps=7", "training.b.model.kv_compress_layers=[1, 2]", "lr_scaling=sqrt"])
    assert b.name == "b" and b.steps == 7
    assert Path(b.data.shards) == tmp_path / "run" / "shards" / "512"
    assert Path(b.init_from) == tmp_path / "out-a"  # the previous stage's output folder
    assert Path(b.output) == Path("runs/train/b").absolute()
    assert b.base_size == 32 and b.pe_interpolation == 1.0  # 512 / 8 / 2, 512 / 512
    assert b.model_kwargs() == {"base_size": 32, "pe_interpolation": 1.0, "kv_compress_ratio": 2,
                                "kv_compress_layers": [1, 2]}
    assert b.long_ratio == 0.6 and b.caption_dropout == 0.1 and b.weight_decay == 0.0
    assert math.isclose(b.scaled_lr(4), b.lr * math.sqrt(8 / 256))
    a = load_stage(cfg_file, "a")
    assert a.scaled_lr(64) == a.lr and a.base_size == 16 and a.pe_interpolation == 0.5
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        load_stage(cfg_file, "a", ["stepz=3"])
    with pytest.raises(ConfigError, match="no such stage"):
        load_stage(cfg_file, "zzz")
    with pytest.raises(ConfigError, match="long_ratio"):
        load_stage(cfg_file, "a", ["long_ratio=1.5"])


def test_repo_pipelines_yaml_has_the_table4_stages():
    names = list(yaml.safe_load((REPO / "pipelines.yaml").read_text())["training"])
    stages = {n: load_stage(REPO / "pipelines.yaml", n) for n in names}
    paper = [s for n, s in stages.items() if n.startswith("sigma-")]
    assert [(s.resolution, s.steps, s.batch_size, s.num_workers, s.lr) for s in paper] == [
        (256, 8000, 64, 16, 2e-5), (256, 80000, 64, 16, 2e-5), (512, 10000, 32, 32, 2e-5),
        (1024, 5000, 12, 32, 1e-5), (1024, 5000, 12, 16, 1e-5), (2048, 2000, 4, 8, 2e-5),
        (2048, 2000, 4, 8, 2e-5), (4096, 1000, 4, 8, 2e-5), (4096, 1000, 4, 8, 2e-5)]
    assert [s.name for s in paper if s.model.kv_compress_ratio > 1] == ["sigma-1024-kv", "sigma-2k-kv", "sigma-4k-kv"]
    assert stages["demo-512"].init_from == stages["demo-256"].output
    assert stages["demo-512"].pe_interpolation == 1.0 and stages["demo-256"].pe_interpolation == 0.5


def test_lr_schedule_and_came_settings(tmp_path):
    from training.train import lr_at, make_optimizer, rank_seed

    assert [lr_at(s, 1.0, 4) for s in (1, 2, 4, 5, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_at(1, 3.0, 0) == 3.0
    assert len({rank_seed(0, r) for r in range(8)}) == 8
    cfg = tiny_stage(tmp_path, tmp_path / "o", lr_scaling="linear", lr=1e-4, batch_size=64)
    opt = make_optimizer(torch.nn.Linear(3, 3), cfg, world_size=8)
    g = opt.param_groups[0]
    assert type(opt).__name__ == "CAME" and g["eps"] == (1e-30, 1e-16) and g["betas"] == (0.9, 0.999, 0.9999)
    assert g["weight_decay"] == 0.0 and math.isclose(g["lr"], 1e-4 * 64 * 8 / 256)


def test_train_logs_ema_and_resume_is_a_noop_when_done(tmp_path):
    from training.train import train

    shards = write_synthetic_shards(tmp_path / "shards", n=12, n_shards=2)
    cfg = tiny_stage(shards, tmp_path / "out", steps=4, warmup_steps=4, lr=1e-3, ema=0.5, checkpoint_every=2,
                     keep_last=1)
    res = train(cfg, 0, 1)
    assert res["start"] == 0
    recs = [json.loads(x) for x in (tmp_path / "out/logs/rank-00000.jsonl").read_text().splitlines()]
    start = recs[0]
    assert start["event"] == "start" and start["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    steps = [r for r in recs if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["lr"] for r in steps] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    for r in steps:
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["samples_per_s"] > 0
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "out")] == ["step-00000004"]  # keep_last 1
    c = ckpt.latest(tmp_path / "out")
    w, e = ckpt.load_weights(c), ckpt.load_weights(c, ema=True)
    assert w.keys() == e.keys() and any(not torch.equal(w[k], e[k]) for k in w)
    meta = ckpt.read_meta(c)
    assert meta["preset"] == "PixArt-tiny" and meta["config"]["steps"] == 4
    assert train(cfg, 0, 1)["start"] == 4  # already done: resumes at the end, trains nothing


def test_stage_chain_pe_interpolation_and_kv_avg_init(tmp_path):
    from training.model import build_model
    from training.train import init_from, train

    s64 = write_synthetic_shards(tmp_path / "s64", n=8, n_shards=1)
    a = tiny_stage(s64, tmp_path / "a", steps=2)
    train(a, 0, 1)
    s128 = write_synthetic_shards(tmp_path / "s128", n=8, n_shards=1, resolution=128,
                                  buckets=(("1.0", (128, 128)), ("2.0", (128, 64))))
    b = tiny_stage(s128, tmp_path / "b", resolution=128, steps=2, init_from=str(tmp_path / "a"),
                   model={"preset": "PixArt-tiny", "kv_compress_ratio": 2, "kv_compress_layers": [2, 3]})
    assert b.model_kwargs()["base_size"] == 8 and b.model_kwargs()["pe_interpolation"] == 0.25
    model = build_model("PixArt-tiny", **b.model_kwargs())
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.123)  # so the test sees what init_from overwrote
    rep = init_from(model, b.init_from)
    assert rep["kv_avg_init"] == ["blocks.2", "blocks.3"]
    src = ckpt.load_weights(ckpt.latest(tmp_path / "a"))
    own = model.state_dict()
    for k, v in src.items():
        assert torch.equal(own[k], v), k
    for i in (2, 3):
        assert torch.all(own[f"blocks.{i}.attn.sr.weight"] == 0.25) and torch.all(own[f"blocks.{i}.attn.sr.bias"] == 0)
    res = train(b, 0, 1)  # the 128px stage trains from stage a (PE recomputed for the new grid)
    assert res["start"] == 0
    start = json.loads((tmp_path / "b/logs/rank-00000.jsonl").read_text().splitlines()[0])
    assert start["init"]["kv_avg_init"] == ["blocks.2", "blocks.3"]


def test_init_from_official_pth(tmp_path):
    from training.convert import save_pth
    from training.model import build_model
    from training.train import init_from

    torch.manual_seed(3)
    src = build_model("PixArt-tiny")
    save_pth(src, tmp_path / "official.pth")
    dst = build_model("PixArt-tiny", base_size=16, pe_interpolation=0.5)
    init_from(dst, str(tmp_path / "official.pth"))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k

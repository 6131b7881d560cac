"""training.config + training.train: stage parsing/resolution, lr rules, the loop's logs, EMA,
stage chaining (PE interpolation, KV compression avg init) and official .pth init."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from _sigma.config import ConfigError
from test_checkpoint import tiny_stage
from test_data import write_synthetic_shards
from training import checkpoint as ckpt
from training.config import load_stage

REPO = Path(__file__).resolve().parents[2]


def _yaml(tmp_path, training: dict, features=None) -> Path:
    p = tmp_path / "p.yaml"
    mini = {"output": str(tmp_path / "run"), "features": features or {"resolutions": [256, 512]}}
    p.write_text(yaml.safe_dump({"pipelines": {"mini": mini}, "training": training}))
    return p


def test_load_stage_resolves_pipeline_init_and_overrides(tmp_path):
    cfg_file = _yaml(tmp_path, {
        "a": {"resolution": 256, "data": {"pipeline": "mini"}, "steps": 5, "batch_size": 2,
              "model": {"preset": "PixArt-tiny"}, "output": str(tmp_path / "out-a")},
        "b": {"resolution": 512, "data": {"pipeline": "mini"}, "steps": 5, "batch_size": 2, "init_from": "a",
              "model": {"preset": "PixArt-tiny", "kv_compress_ratio": 2}},
    })
    b = load_stage(cfg_file, "b", ["steps=7", "training.b.model.kv_compress_layers=[1, 2]"])
    assert b.name == "b" and b.steps == 7
    assert Path(b.data.shards) == tmp_path / "run" / "shards" / "512"
    assert Path(b.init_from) == tmp_path / "out-a"  # the previous stage's output folder
    assert Path(b.output) == Path("runs/train/b").absolute()
    assert b.base_size == 32 and b.pe_interpolation == 1.0  # 512 / 8 / 2, 512 / 512
    assert b.model_kwargs() == {"base_size": 32, "pe_interpolation": 1.0, "kv_compress_ratio": 2,
                                "kv_compress_layers": [1, 2]}
    assert b.long_ratio == 0.6 and b.caption_dropout == 0.1 and b.weight_decay == 0.0
    # default lr rule = the official auto_lr sqrt: lr * sqrt(batch * world / 256)
    assert b.lr_scaling == "sqrt" and math.isclose(b.scaled_lr(4), b.lr * math.sqrt(8 / 256))
    assert b.null_caption == "DeepFloyd/t5-v1_1-xxl"  # the pipeline's features.t5 (its default here)
    a = load_stage(cfg_file, "a", ["lr_scaling=none"])
    assert a.scaled_lr(64) == a.lr and a.base_size == 16 and a.pe_interpolation == 0.5
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        load_stage(cfg_file, "a", ["stepz=3"])
    with pytest.raises(ConfigError, match="no such stage"):
        load_stage(cfg_file, "zzz")
    with pytest.raises(ConfigError, match="long_ratio"):
        load_stage(cfg_file, "a", ["long_ratio=1.5"])


def test_repo_pipelines_yaml_has_the_table4_stages():
    names = list(yaml.safe_load((REPO / "pipelines.yaml").read_text())["training"])
    stages = {n: load_stage(REPO / "pipelines.yaml", n) for n in names}  # every stage's shards are written
    paper = [s for n, s in stages.items() if n.startswith("sigma-")]
    assert [(s.resolution, s.steps, s.batch_size, s.num_workers, s.lr) for s in paper] == [
        (256, 8000, 64, 16, 2e-5), (256, 80000, 64, 16, 2e-5), (512, 10000, 32, 32, 2e-5),
        (1024, 5000, 12, 32, 1e-5), (1024, 5000, 12, 16, 1e-5), (2048, 2000, 4, 8, 2e-5),
        (2048, 2000, 4, 8, 2e-5), (2880, 1000, 4, 8, 2e-5), (2880, 1000, 4, 8, 2e-5)]
    assert [s.name for s in paper if s.model.kv_compress_ratio > 1] == ["sigma-1024-kv", "sigma-2k-kv", "sigma-4k-kv"]
    assert stages["demo-512"].init_from == stages["demo-256"].output
    assert stages["demo-512"].pe_interpolation == 1.0 and stages["demo-256"].pe_interpolation == 0.5


# The official PixArt-Sigma settings, restated from its configs (configs/PixArt_xl2_internal.py:
# auto_lr = dict(rule='sqrt'), auto_scale_lr base_batch_size 256; configs/pixart_sigma_config/*:
# warmup 1000 at 256 / 512 / 1024, 500 at 1024-KV, 100 at 2K; KV scale_factor 2 in the 1024-KV and
# 2K configs; tools/convert_pixart_to_diffusers.py: interpolation_scale_alpha = {256: 1, 512: 1,
# 1024: 2} for the PixArt-alpha 256 weights the first stage starts from).
OFFICIAL = {"sigma-256-vae": (1000, 1, 1.0), "sigma-256-align": (1000, 1, 0.5), "sigma-512": (1000, 1, 1.0),
            "sigma-1024": (1000, 1, 2.0), "sigma-1024-kv": (500, 2, 2.0), "sigma-2k": (100, 1, 4.0),
            "sigma-2k-kv": (100, 2, 4.0), "sigma-4k": (100, 1, 5.625), "sigma-4k-kv": (100, 2, 5.625)}


def test_paper_stages_use_the_official_settings():
    for name, (warmup, kv, pe) in OFFICIAL.items():
        s = load_stage(REPO / "pipelines.yaml", name)
        assert (s.warmup_steps, s.model.kv_compress_ratio, s.pe_interpolation) == (warmup, kv, pe), name
        g = s.batch_size * s.num_workers
        assert s.scaled_lr(s.num_workers) == pytest.approx(s.lr * math.sqrt(g / 256)), name  # official auto_lr
    assert load_stage(REPO / "pipelines.yaml", "sigma-256-vae").scaled_lr(16) == pytest.approx(4e-5)
    assert load_stage(REPO / "pipelines.yaml", "sigma-2k").scaled_lr(8) == pytest.approx(7.07e-6, rel=1e-3)


def test_stage_reading_shards_no_pipeline_writes_fails_naming_both(tmp_path):
    stage = {"resolution": 1024, "data": {"pipeline": "mini"}, "steps": 1, "batch_size": 1}
    cfg_file = _yaml(tmp_path, {"big": stage}, features={"resolutions": [256, 512]})
    with pytest.raises(ConfigError, match=r"training.big .*shards/1024 of pipeline 'mini'.*"
                                          r"pipelines.mini.features.resolutions is \[256, 512\]"):
        load_stage(cfg_file, "big")
    p = tmp_path / "q.yaml"
    p.write_text(yaml.safe_dump({"pipelines": {"mini": {"stages": ["download", "score"]}}, "training": {"big": stage}}))
    with pytest.raises(ConfigError, match="'mini', whose stages .* do not include features"):
        load_stage(p, "big")


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
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(tmp_path / "out")] == ["step-00000004"]  # keep_last 1
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


def test_stage_sets_null_caption_to_t5_of_empty_string(tmp_path, tiny_models):
    """The official trainer: tokenizer("", padding="max_length", max_length=300) -> T5 encoder under
    that mask -> [0], copied into y_embedder.y_embedding on load. Our stage does the same (once,
    cached beside the output) and caption dropout / CFG use it."""
    from transformers import AutoTokenizer, T5EncoderModel

    from training.train import NULL_FILE, train

    shards = write_synthetic_shards(tmp_path / "s", n=8, n_shards=1)
    out = tmp_path / "out"
    train(tiny_stage(shards, out, steps=1, null_caption=str(tiny_models / "t5")), 0, 1)
    tok = AutoTokenizer.from_pretrained(tiny_models / "t5")
    t5 = T5EncoderModel.from_pretrained(tiny_models / "t5").eval()
    ids = tok("", max_length=300, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = t5(ids.input_ids, attention_mask=ids.attention_mask)[0][0]  # (300, 32)
    w = ckpt.load_weights(ckpt.latest(out))["y_embedder.y_embedding"]
    assert w.shape == (300, 32) and int(ids.attention_mask.sum()) == 1
    torch.testing.assert_close(w, ref, atol=1e-6, rtol=1e-5)
    assert (out / NULL_FILE).exists()
    model = ckpt.load_model(out)
    assert model.config.null_valid_tokens == 1 and model.config.null_policy == "own"


def test_init_from_refuses_pickles_unless_trusted(tmp_path):
    """A crafted .pth whose unpickling would create a marker file: refused with a message naming
    it, and the marker never appears; --trust-pickle / trust_pickle: true loads a pickle-only file."""
    import argparse

    from training.model import build_model
    from training.train import init_from

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    sd = build_model("PixArt-tiny").state_dict()
    torch.save({"state_dict": sd, "payload": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth: refused.*--trust-pickle"):
        init_from(build_model("PixArt-tiny"), str(tmp_path / "evil.pth"))
    assert not marker.exists()
    # the CLIs refuse it too (convert, sample), with the file named, and nothing runs
    from training import convert, sample

    with pytest.raises(SystemExit, match=r"evil\.pth: refused"):
        convert.main(["--to-diffusers", str(tmp_path / "evil.pth"), str(tmp_path / "d"), "--image-size", "64"])
    with pytest.raises(ValueError, match=r"evil\.pth: refused"):
        sample.load_dit(tmp_path / "evil.pth", preset="PixArt-tiny", image_size=64)
    assert not marker.exists()
    # a file that only needs a harmless class: loads when trusted
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1)}, tmp_path / "old.pth")
    with pytest.raises(ValueError, match="refused"):
        init_from(build_model("PixArt-tiny"), str(tmp_path / "old.pth"))
    m = build_model("PixArt-tiny")
    init_from(m, str(tmp_path / "old.pth"), trust_pickle=True)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())


def test_readme_states_every_lr_that_differs_from_the_official_configs():
    """Issue 22 item 14: the paper's Table 4 trains the 1024 stages at 1e-5 where the official
    1024 configs (PixArt_sigma_xl2_img1024_*.py) use 2e-5; training/README.md must say so for
    every pipelines.yaml stage at an lr other than the official 2e-5, naming stage and both values."""
    readme = (REPO / "training" / "README.md").read_text()
    names = [n for n in yaml.safe_load((REPO / "pipelines.yaml").read_text())["training"] if n.startswith("sigma-")]
    odd = {n: load_stage(REPO / "pipelines.yaml", n).lr for n in names}
    odd = {n: lr for n, lr in odd.items() if lr != 2e-5}
    assert sorted(odd) == ["sigma-1024", "sigma-1024-kv"] and set(odd.values()) == {1e-5}
    rows = [ln for ln in readme.splitlines() if ln.startswith("|") and "2e-5" in ln and "1e-5" in ln]
    assert rows and all(f"`{n}`" in rows[0] for n in odd), "no README row names the stages, 1e-5 and 2e-5"

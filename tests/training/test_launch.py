"""training.launch on Ray Train: 2 CPU workers (gloo DDP) train the tiny model a few steps with the
shards, the output and Ray Train's storage_path on S3 (the moto server of tests/conftest.py); the
ranks read disjoint shards, the checkpoint and the resolved config exist. (Ray startup is slow:
this is the only Ray test of the package.)"""
from __future__ import annotations

import json
import os

import pytest
import yaml

from _sigma import fs
from test_data import write_synthetic_shards
from training import checkpoint as ckpt


@pytest.mark.slow
def test_ray_train_two_cpu_workers_on_s3(tmp_path, ray_local, s3_bucket):
    from test_resume_s3 import _upload
    from training.launch import main

    shards = f"{s3_bucket}/shards/64"
    _upload(write_synthetic_shards(tmp_path / "shards", n=24, n_shards=3), shards)
    out = f"{s3_bucket}/train/two"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"pipelines": {}, "training": {"two": {
        "resolution": 64, "data": {"shards": shards}, "model": {"preset": "PixArt-tiny"},
        "steps": 3, "batch_size": 4, "lr": 1e-3, "grad_clip": 1.0, "num_workers": 2, "log_every": 1,
        "checkpoint_every": 3, "output": out, "null_caption": "keep"}}}))
    assert main(["--config", str(cfg), "--stage", "two", "--set", "seed=4"]) == 0

    logs = {r: [json.loads(x) for x in fs.read_text(fs.join(out, "logs", f"rank-{r:05d}.jsonl")).splitlines()]
            for r in (0, 1)}
    starts = {r: recs[0] for r, recs in logs.items()}
    assert all(s["world_size"] == 2 for s in starts.values())
    assert set(starts[0]["shards"]).isdisjoint(starts[1]["shards"])
    assert set(starts[0]["shards"]) | set(starts[1]["shards"]) == {f"shard-{i:06d}.tar" for i in range(3)}
    keys = {r: {k for x in recs if x["event"] == "step" for k in x["keys"]} for r, recs in logs.items()}
    assert keys[0] and keys[1] and keys[0].isdisjoint(keys[1])
    # every rank draws its own timesteps/noise: with disjoint data and seeds the losses differ
    losses = {r: [x["loss"] for x in recs if x["event"] == "step"] for r, recs in logs.items()}
    assert len(losses[0]) == len(losses[1]) == 3 and losses[0] != losses[1]

    c = ckpt.latest(out)
    assert c is not None and fs.basename(c) == "step-00000003"
    assert sorted(ckpt.read_meta(c)["files"]) == ["model.safetensors", "optimizer.pt", "rank-00000.pt", "rank-00001.pt"]
    assert ckpt.read_meta(c)["world_size"] == 2
    resolved = yaml.safe_load(fs.read_text(fs.join(out, "config.resolved.yaml")))
    assert resolved["resolved"]["seed"] == 4 and resolved["resolved"]["num_workers"] == 2
    assert fs.listdir(fs.join(out, "ray")) == ["train-two"]  # Ray Train's storage_path on S3
    # the end-of-stage report: curves plotted, summary from rank 0's log
    from training.report import read_logs, summary

    assert fs.size(fs.join(out, "training_curves.png")) > 1000
    s = summary(read_logs(out))
    assert s["ranks"] == 2 and s["steps_logged"] == 3 and s["last_step"] == 3
    assert s["loss_last"] == round(losses[0][-1], 5)  # log_every 1: the interval mean is the step loss


def _stage_yaml(tmp_path, **stage):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"pipelines": {}, "training": {"s": {"null_caption": "keep", **stage}}}))
    return cfg


def test_config_errors_before_any_work(tmp_path, capsys):
    from training.launch import main

    base = {"resolution": 64, "model": {"preset": "PixArt-tiny"}, "steps": 1, "batch_size": 2,
            "output": str(tmp_path / "out")}
    cfg = _stage_yaml(tmp_path, data={"shards": str(tmp_path / "none")}, **base)
    assert main(["--config", str(cfg), "--stage", "s", "--local"]) == 2
    assert "index.json does not exist" in capsys.readouterr().err
    shards = write_synthetic_shards(tmp_path / "shards", n=4, n_shards=1)
    cfg = _stage_yaml(tmp_path, data={"shards": str(shards)}, init_from=str(tmp_path / "prev"), **base)
    assert main(["--config", str(cfg), "--stage", "s", "--local"]) == 2
    assert "run the previous stage first" in capsys.readouterr().err
    assert main(["--config", str(cfg), "--stage", "s", "--set", "bogus=1"]) == 2
    assert main(["--config", str(cfg), "--stage", "s", "--local", "--set", "resolution=128"]) == 2
    err = capsys.readouterr().err
    assert "resolution 128 but its shards" in err and "were written at 64" in err
    assert not (tmp_path / "out").exists()


def test_torchrun_mode_single_process(tmp_path, monkeypatch):
    """The torchrun entry (env WORLD_SIZE/RANK) runs the same loop; world size 1 needs no group."""
    from training.launch import main

    shards = write_synthetic_shards(tmp_path / "shards", n=4, n_shards=1)
    cfg = _stage_yaml(tmp_path, resolution=64, data={"shards": str(shards)}, model={"preset": "PixArt-tiny"},
                      steps=2, batch_size=2, output=str(tmp_path / "out"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert main(["--config", str(cfg), "--stage", "s"]) == 0
    assert os.path.basename(ckpt.latest(tmp_path / "out")) == "step-00000002"
    assert (tmp_path / "out" / "config.resolved.yaml").exists() and not (tmp_path / "out" / "ray").exists()

"""Training on object storage, killed for real: shards, null caption and checkpoints on a real S3
HTTP server (moto, tests/conftest.py); the first run is SIGKILLed right after its 2nd checkpoint
commit (_sigma.faults, proven by the marker file); the rerun resumes from that checkpoint on S3 and
ends with weights bit-identical to an uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from _sigma import fs
from test_data import write_synthetic_shards
from training import checkpoint as ckpt


def _upload(local_dir, uri: str) -> None:
    for name in sorted(os.listdir(local_dir)):
        with open(os.path.join(local_dir, name), "rb") as f:
            fs.write_bytes(fs.join(uri, name), f.read())


def _stage(shards: str, out: str, null: str) -> dict:
    return {"resolution": 64, "data": {"shards": shards}, "model": {"preset": "PixArt-tiny"}, "steps": 6,
            "batch_size": 4, "lr": 1e-3, "lr_scaling": "none", "warmup_steps": 2, "grad_clip": 1.0,
            "caption_dropout": 0.3, "log_every": 1, "checkpoint_every": 2, "keep_last": 5, "output": out,
            "null_caption": null}


@pytest.mark.slow
def test_sigkill_then_resume_from_s3_equals_uninterrupted(tmp_path, s3_bucket):
    from training.launch import main
    from training.null import read_null, write_null

    _upload(write_synthetic_shards(tmp_path / "shards", n=16, n_shards=2), f"{s3_bucket}/run/shards/64")
    null = write_null(f"{s3_bucket}/models/null.safetensors", (torch.randn(300, 32) / 8, 1))
    out = f"{s3_bucket}/run/train/s"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"pipelines": {}, "training": {
        "s": _stage(f"{s3_bucket}/run/shards/64", out, null),
        "ref": _stage(f"{s3_bucket}/run/shards/64", str(tmp_path / "ref"), null)}}))

    marker = tmp_path / "killed"
    env = dict(os.environ, SIGMA_KILL_AT="train:2", SIGMA_KILL_MARKER=str(marker))
    r = subprocess.run([sys.executable, "-m", "training.launch", "--config", str(cfg), "--stage", "s", "--local"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -9, r.stderr[-3000:]  # SIGKILL ...
    assert marker.read_text() == "train:2\n"  # ... right after the 2nd checkpoint commit
    assert [fs.basename(c) for c in ckpt.list_checkpoints(out)] == ["step-00000002", "step-00000004"]

    assert main(["--config", str(cfg), "--stage", "s", "--local"]) == 0  # resumes from S3
    assert main(["--config", str(cfg), "--stage", "ref", "--local"]) == 0  # uninterrupted, local output
    starts = [json.loads(ln) for ln in fs.read_text(fs.join(out, "logs", "rank-00000.jsonl")).splitlines()]
    starts = [e for e in starts if e["event"] == "start"]
    assert [e["step"] for e in starts] == [0, 4] and starts[1]["resumed_from"].endswith("step-00000004")
    a = ckpt.load_weights(ckpt.latest(out))
    b = ckpt.load_weights(ckpt.latest(tmp_path / "ref"))
    assert fs.basename(ckpt.latest(out)) == "step-00000006" and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the null caption came from the null file on S3; the report was written there too
    torch.testing.assert_close(a["y_embedder.y_embedding"], read_null(null)[0], atol=0, rtol=0)
    assert fs.exists(fs.join(out, "training_curves.png")) and fs.exists(fs.join(out, "config.resolved.yaml"))

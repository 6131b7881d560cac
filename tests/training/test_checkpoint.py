"""training.checkpoint: atomic folders, keep-last, latest(), and EXACT resume of the loop."""
from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_data import write_synthetic_shards
from training import checkpoint as ckpt
from training.config import stage_from_dict


def tiny_stage(shards, out, **kw):
    d = {"name": "t", "resolution": 64, "data": {"shards": str(shards)}, "model": {"preset": "PixArt-tiny"},
         "steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "log_every": 1,
         "checkpoint_every": 3, "keep_last": 5, "output": str(out), "lr_scaling": "none", "null_caption": "keep"}
    d.update(kw)
    return stage_from_dict(d, "t")


def step_losses(out) -> dict:
    """step -> loss from the rank-0 JSONL log (a resumed run appends; the last record wins)."""
    recs = [json.loads(line) for line in (out / "logs" / "rank-00000.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["event"] == "step"}


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    from training.train import train

    shards = write_synthetic_shards(tmp_path / "shards", n=20, n_shards=2)
    common = dict(caption_dropout=0.3, ema=0.9)
    full = tiny_stage(shards, tmp_path / "full", **common)
    train(full, 0, 1)

    part = tiny_stage(shards, tmp_path / "part", steps=3, **common)
    train(part, 0, 1)
    assert os.path.basename(ckpt.latest(tmp_path / "part")) == "step-00000003"
    # clobber the global RNGs: resume must restore them from the checkpoint, not rely on luck
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    res = train(tiny_stage(shards, tmp_path / "part", **common), 0, 1)
    assert res["start"] == 3

    a, b = ckpt.latest(tmp_path / "full"), ckpt.latest(tmp_path / "part")
    assert os.path.basename(a) == os.path.basename(b) == "step-00000006"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)
    la, lb = step_losses(tmp_path / "full"), step_losses(tmp_path / "part")
    assert sorted(la) == sorted(lb) == list(range(1, 7))
    assert all(la[s] == lb[s] for s in la)  # bit-identical losses, including after the resume
    # the data position after 6 steps is identical too
    ra, rb = ckpt.load_rank_state(a, 0), ckpt.load_rank_state(b, 0)
    assert ra["data"] == rb["data"]

    # corrupt the newest checkpoint (one byte, same size): resume falls back to step 3 (it
    # verifies), retrains 4..6 and reaches the same weights again
    f = os.path.join(b, "model.safetensors")
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(f, "wb").write(bytes(data))
    with pytest.warns(UserWarning, match="step-00000006.*model.safetensors"):
        res = train(tiny_stage(shards, tmp_path / "part", **common), 0, 1)
    assert res["start"] == 3
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(3, 2)


def test_commit_protocol_checksums_and_keep_last(tmp_path):
    m = _Lin()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    assert ckpt.latest(tmp_path) is None
    for step in (10, 20, 30):
        ckpt.save(tmp_path, step, rank=0, world_size=1, model=m, optimizer=opt,
                  rank_state={"rng": ckpt.rng_state(), "data": {"epoch": 0, "cursor": step}},
                  meta={"preset": "x"}, keep_last=2)
    root = ckpt.checkpoints_dir(tmp_path)
    assert sorted(os.listdir(root)) == ["step-00000020", "step-00000030"]
    # a killed save: files written, no meta.json (the commit): never picked up as a checkpoint
    os.makedirs(os.path.join(root, "step-00000050"))
    open(os.path.join(root, "step-00000050", "model.safetensors"), "wb").write(b"partial")
    c = ckpt.latest(tmp_path)
    assert os.path.basename(c) == "step-00000030" and ckpt.resolve(c) == c and ckpt.resolve(tmp_path) == c
    meta = ckpt.read_meta(c)
    assert meta["step"] == 30 and meta["format"] == ckpt.FORMAT
    # meta.json records size + sha256 of every file (checked with hashlib, independently)
    assert sorted(meta["files"]) == ["model.safetensors", "optimizer.pt", "rank-00000.pt"]
    for name, rec in meta["files"].items():
        data = open(os.path.join(c, name), "rb").read()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    w = ckpt.load_weights(c)
    assert torch.equal(w["l.weight"], m.l.weight.detach())
    assert ckpt.load_rank_state(c, 0)["data"]["cursor"] == 30
    assert ckpt.load_rank_state(c, 1) is None
    # the next save removes the partial folder of the killed save
    ckpt.save(tmp_path, 60, rank=0, world_size=1, model=m, optimizer=None, rank_state={}, meta={}, keep_last=2)
    assert sorted(os.listdir(root)) == ["step-00000030", "step-00000060"]


def test_corrupt_or_truncated_files_are_refused(tmp_path):
    m = _Lin()
    c = ckpt.save(tmp_path, 1, rank=0, world_size=1, model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
                  rank_state={"rng": ckpt.rng_state()}, meta={})
    f = os.path.join(c, "model.safetensors")
    data = bytearray(open(f, "rb").read())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    open(f, "wb").write(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpoint, match="model.safetensors.*corrupt"):
        ckpt.load_weights(c)
    o = os.path.join(c, "optimizer.pt")
    open(o, "wb").write(open(o, "rb").read()[:-7])
    with pytest.raises(ckpt.CorruptCheckpoint, match="optimizer.pt"):
        ckpt.load_optimizer(c)


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(5)
    st = ckpt.rng_state(g)
    a = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    torch.manual_seed(0), np.random.seed(0), random.seed(0), g.manual_seed(0)
    ckpt.set_rng_state(st, g)
    b = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and torch.equal(a[3], b[3])


def test_tiny_dit_builds_and_loads(tmp_path):
    from training import tiny

    paths = tiny.build(tmp_path)
    m = ckpt.load_model(paths["dit"])
    assert m.config.caption_channels == 32 and m.config.base_size == 16
    x = torch.randn(2, 4, 8, 8)
    out = m(x, torch.tensor([1, 500]), torch.randn(2, 5, 32), torch.ones(2, 5))
    assert out.shape == (2, 8, 8, 8)
    with pytest.raises(FileNotFoundError):
        ckpt.load_model(tmp_path / "nothing")


def _old_format(c) -> None:
    """Rewrite a checkpoint's meta.json as format /1 wrote it: no `files` (nothing to verify against)."""
    meta = ckpt.read_meta(c)
    meta.pop("files")
    meta["format"] = "sigma-ckpt/1"
    with open(os.path.join(c, ckpt.META), "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("damage", ["bad_header", "truncated", "bad_header_checked"])
def test_load_newest_falls_back_past_an_unreadable_newest(tmp_path, damage):
    """Issue 22 item 4: the newest checkpoint's model.safetensors has a bad header or is cut short,
    with an old-format meta.json (no checksums) or a current one: resume takes the older one."""
    m = _Lin()
    for step in (1, 2):
        with torch.no_grad():
            m.l.weight.fill_(float(step))
        ckpt.save(tmp_path, step, rank=0, world_size=1, model=m, optimizer=None, rank_state={"step": step},
                  meta={}, keep_last=2)
    newest = ckpt.latest(tmp_path)
    f = os.path.join(newest, "model.safetensors")
    data = open(f, "rb").read()
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # the 8-byte header length now points past the end of the file
        data = (len(data) * 4).to_bytes(8, "little") + data[8:]
    open(f, "wb").write(data)
    if damage != "bad_header_checked":
        _old_format(newest)
    with pytest.warns(UserWarning, match="step-00000002 is unusable, falling back"):
        c, state = ckpt.load_newest(tmp_path, lambda c: ckpt.load_state(c, 0, ema=False))
    assert os.path.basename(c) == "step-00000001" and state["rank"] == {"step": 1}
    assert torch.equal(state["weights"]["l.weight"], torch.ones(2, 3))
    ckpt.save(tmp_path, 3, rank=0, world_size=1, model=m, optimizer=None, rank_state={}, meta={}, keep_last=2)
    _old_format(ckpt.latest(tmp_path))  # an intact old-format checkpoint still loads
    c, state = ckpt.load_newest(tmp_path, lambda c: ckpt.load_state(c, 0, ema=False))
    assert os.path.basename(c) == "step-00000003"

"""The training loop of one stage: `train(cfg, rank, world_size)`.

One flat loop, the same under Ray Train workers, torchrun and a plain single process:
  batch (bucket-pure, from training.data) -> caption dropout to the null caption -> t ~ U[0, T),
  noise ~ N(0, I) -> diffusion loss (eps MSE + VB for the learned variance) under autocast ->
  backward -> grad-norm clip -> CAME step at the scheduled lr -> EMA -> log -> checkpoint.
The null caption is T5("") padded to 300 tokens (training.null), set after the weights are loaded
as the official load_checkpoint does. The output is a local folder or a URI (_sigma.fs).
Differences from the official trainer, on purpose: every rank has its own seed; RNG and the exact
data position are checkpointed, so resume continues with the next batch; the stage resumes by
itself from the newest checkpoint that verifies (checksums in meta.json) when its output already
holds one; a checkpoint commit is reported to _sigma.faults (the SIGKILL tests).
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from _sigma import faults, fs
from _sigma.config import to_dict
from _sigma.device import DTYPES, pick_device, resolve_precision
from training import checkpoint as ckpt
from training.config import TrainStageConfig
from training.data import make_batches

CAME_EPS = (1e-30, 1e-16)
CAME_BETAS = (0.9, 0.999, 0.9999)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    # Distinct per rank (the official code seeds every rank the same, so all ranks draw the same
    # timesteps and noise, wasting the data parallelism of the diffusion noise).
    return seed * 1000 + rank


def lr_at(step: int, base_lr: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps (step is 1-based), then constant."""
    return base_lr * min(1.0, step / warmup) if warmup > 0 else base_lr


def train_device(cfg: TrainStageConfig, local_rank: int = 0) -> torch.device:
    if pick_device(1 if cfg.use_gpu else 0) == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_dtype(cfg: TrainStageConfig, device: torch.device) -> torch.dtype | None:
    p = resolve_precision(cfg.precision, device.type, auto_gpu="bf16")
    return None if p == "fp32" else DTYPES[p]


def build(cfg: TrainStageConfig):
    from training.diffusion import GaussianDiffusion
    from training.model import build_model

    kw = cfg.model_kwargs()
    if cfg.grad_checkpointing:
        kw["grad_checkpoint"] = True
    return build_model(cfg.model.preset, **kw), GaussianDiffusion.pixart()


NULL_FILE = "null_caption.safetensors"


def prepare_null(cfg: TrainStageConfig, rank: int, barrier, device: torch.device):
    """The stage's null caption (emb (L, D), valid) or None for `null_caption: keep`.

    Computed once per stage by rank 0 (T5("") of the configured T5, or read from a null file),
    cached as <output>/null_caption.safetensors (with its source), read by every rank."""
    from training.null import null_from, read_null, write_null

    source = cfg.null_caption
    if source == "keep":
        return None
    if source is None:  # explicit shards folder: the T5 the features stage recorded
        from _sigma.shards import read_index

        source = read_index(cfg.shards_dir).get("t5", {}).get("name")
        if not source:
            raise ValueError(f"training.{cfg.name}.null_caption: not set and {cfg.shards_dir}/index.json names no T5")
    cache = fs.join(cfg.output_dir, NULL_FILE)
    stamp = fs.join(cfg.output_dir, NULL_FILE + ".source")
    if rank == 0 and not (fs.exists(cache) and fs.exists(stamp) and fs.read_text(stamp) == source):
        try:
            null = null_from(source, cfg.data.max_length, cfg.trust_pickle,
                             device="cuda" if device.type == "cuda" else "cpu")
        except (OSError, ValueError) as e:
            raise ValueError(f"training.{cfg.name}: cannot make the null caption T5(\"\") from {source!r} "
                             f"({type(e).__name__}: {str(e)[:300]}); set null_caption to a T5 folder, a null "
                             "file, or keep") from None
        write_null(cache, null)
        fs.write_text(stamp, source)
    barrier()
    return read_null(cache)


def init_from(model: torch.nn.Module, source: str, trust_pickle: bool = False) -> dict:
    """Initialise from a previous stage (its newest checkpoint that verifies) or an official
    .pth/.safetensors (local or URI).

    training.convert.load_into does the fix-ups: pos_embed is never loaded (recomputed for the new
    resolution: PE interpolation needs no weights), the null-caption buffer is adopted (the stage
    then sets T5("")), and KV-compression layers absent from the source get the Conv Avg Init
    (w = 1/R^2); any other missing or unexpected key raises. Returns a small report."""
    from training.convert import load_into, read_state_dict

    if fs.isfile(source):
        src, (sd, _) = source, read_state_dict(source, trust_pickle)
    else:
        try:
            src, sd = ckpt.load_newest(source, ckpt.load_weights)
        except FileNotFoundError:
            raise FileNotFoundError(f"init_from {source}: no usable checkpoint there (run that stage first)") from None
    kv_init = load_into(model, sd)
    return {"source": str(src), "tensors": len(sd), "kv_avg_init": kv_init}


def resume_state(out: str, rank: int, world_size: int, want_ema: bool, device: torch.device) -> dict | None:
    """The newest checkpoint of `out` that verifies on EVERY rank (all-reduced), loaded; None when
    there is none. A corrupt or truncated checkpoint is skipped with a warning; when checkpoints
    exist but none verifies, raises (training from scratch over them would hide the damage)."""
    cands = ckpt.candidates(out)
    bad = []
    for c in cands:
        try:
            st, ok = ckpt.load_state(c, rank, want_ema), 1
        except ckpt.LOAD_ERRORS as e:
            st, ok = None, 0
            bad.append(f"{c}: {e}")
        if world_size > 1:
            flag = torch.tensor([ok], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = int(flag.item())
        if ok:
            if bad:
                warnings.warn("resuming from an older checkpoint; skipped: " + "; ".join(bad))
            return st
        if not bad or not bad[-1].startswith(c):
            bad.append(f"{c}: another rank could not verify it")
    if cands:
        raise RuntimeError(f"{out}: no checkpoint verifies: " + "; ".join(bad))
    return None


def make_optimizer(model: torch.nn.Module, cfg: TrainStageConfig, world_size: int = 1):
    """CAME with PixArt's settings; lr after the explicit scaling rule (the warmup sets it per step)."""
    from came_pytorch import CAME

    return CAME([p for p in model.parameters() if p.requires_grad], lr=cfg.scaled_lr(world_size),
                eps=CAME_EPS, betas=CAME_BETAS, weight_decay=cfg.weight_decay)


class JsonlLog:
    """Append-only JSONL log of one rank. Local: appended and flushed per record. Object store
    (no append): records go to a local spool seeded with the existing log, uploaded whole by
    `sync()` (every checkpoint and at the end) as one atomic PUT."""

    def __init__(self, uri: str):
        self.uri = uri
        self.remote = fs.is_remote(uri)
        if self.remote:
            fd, self.spool = tempfile.mkstemp(prefix="sigma-log-", suffix=".jsonl")
            os.close(fd)
            if fs.exists(uri):
                with open(self.spool, "wb") as f:
                    f.write(fs.read_bytes(uri))
            path = self.spool
        else:
            fs.makedirs(fs.parent(uri))
            path = uri
        self.fh = open(path, "a")

    def write(self, rec: dict) -> None:
        self.fh.write(json.dumps(rec, default=str) + "\n")
        self.fh.flush()

    def sync(self) -> None:
        if self.remote:
            with open(self.spool, "rb") as f:
                fs.write_bytes(self.uri, f.read())

    def close(self) -> None:
        self.fh.close()
        self.sync()
        if self.remote:
            os.unlink(self.spool)


def train(cfg: TrainStageConfig, rank: int = 0, world_size: int = 1, local_rank: int | None = None) -> dict:
    """Run (or resume) one stage to `cfg.steps`. Returns a summary (rank-local)."""
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        raise RuntimeError("world_size > 1 needs an initialised process group (training.launch does it)")
    barrier = dist.barrier if distributed else (lambda: None)
    device = train_device(cfg, rank if local_rank is None else local_rank)
    amp = autocast_dtype(cfg, device)
    out = cfg.output_dir
    seed_everything(rank_seed(cfg.seed, rank))
    gen = torch.Generator().manual_seed(rank_seed(cfg.seed, rank) + 1)  # timesteps + noise

    model, diffusion = build(cfg)
    model.to(device)
    base_lr = cfg.scaled_lr(world_size)
    opt = make_optimizer(model, cfg, world_size)
    log = JsonlLog(fs.join(out, "logs", f"rank-{rank:05d}.jsonl"))

    start, init_report, position, ema = 0, None, None, None
    resumed = resume_state(out, rank, world_size, cfg.ema is not None, device)
    if resumed is not None:
        from training.convert import load_into

        load_into(model, resumed["weights"])
        if resumed["optimizer"] is not None:
            opt.load_state_dict(resumed["optimizer"])
        start = int(resumed["meta"]["step"])
        if resumed["rank"] is not None:
            ckpt.set_rng_state(resumed["rank"]["rng"], gen)
            position = resumed["rank"]["data"]
        if resumed["ema"] is not None:
            ema = {k: v.to(device) for k, v in resumed["ema"].items()}
    elif cfg.init_from:
        init_report = init_from(model, cfg.init_from, cfg.trust_pickle)
    null = prepare_null(cfg, rank, barrier, device)
    if null is not None:  # T5("") padded to max_length, as the official load_checkpoint on every load
        model.set_null_embedding(*null)
    if cfg.ema is not None and ema is None:
        ema = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}
    # The data stream starts at the checkpointed position (the next batch after the saved step).
    data = make_batches(cfg.shards_dir, cfg.batch_size, rank, world_size, cfg.seed, cfg.long_ratio,
                        cfg.caption_dropout, cfg.data.pad_tokens, cfg.data.max_length,
                        cfg.data.prefetch if start < cfg.steps else 0, position)

    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    meta = {"preset": cfg.model.preset, "model_kwargs": cfg.model_kwargs(), "resolution": cfg.resolution,
            "config": to_dict(cfg)}
    log.write({"event": "start", "rank": rank, "world_size": world_size, "step": start,
               "resumed_from": resumed["ckpt"] if resumed else None,
               "init": init_report, "shards": data.shard_names, "samples": len(data.samples),
               "lr": base_lr, "device": str(device), "amp": str(amp), "time": time.time()})

    bar = None
    if rank == 0 and start < cfg.steps:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.name}", dynamic_ncols=True, mininterval=2.0)
    model.train()
    t_last, n_since, loss_sum, last = time.time(), 0, 0.0, {}
    for step in range(start + 1, cfg.steps + 1):
        b = next(data)
        x = b["x"].to(device)  # (B, 4, h, w)
        # Dropout was decided by the data position (deterministic); the model's null policy says how
        # the null caption replaces the caption, and it is told not to drop again (force_drop_ids = 0).
        y, mask = model.drop_captions(b["y"].to(device), b["mask"].to(device), b["drop"])  # (B, L, D), (B, L)
        no_drop = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=gen).to(device)
        noise = torch.randn(x.shape, generator=gen).to(device)
        lr = lr_at(step, base_lr, cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
        with ctx:
            terms = diffusion.training_losses(lambda xt, tt: net(xt, tt, y, mask, force_drop_ids=no_drop),
                                              x, t, noise=noise)
            loss = terms["loss"].mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if k in ema:
                        ema[k].mul_(cfg.ema).add_(v.float(), alpha=1 - cfg.ema)
        lval = float(loss.detach())
        if not math.isfinite(lval):
            raise FloatingPointError(f"rank {rank} step {step}: loss is {lval}")
        loss_sum += lval
        n_since += x.shape[0]
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.time()
            last = {"event": "step", "step": step, "loss": lval, "loss_avg": loss_sum / cfg.log_every
                    if step % cfg.log_every == 0 else lval, "lr": lr, "grad_norm": gnorm,
                    "samples_per_s": n_since * world_size / max(now - t_last, 1e-9), "epoch": data.epoch,
                    "bucket": b["bucket"], "keys": b["keys"], "time": now}
            log.write(last)
            t_last, n_since, loss_sum = now, 0, 0.0
            if bar is not None:
                bar.set_postfix(loss=f"{lval:.4f}", lr=f"{lr:.2e}", gn=f"{gnorm:.3f}")
        if bar is not None:
            bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            ckpt.save(out, step, rank=rank, world_size=world_size, model=model, optimizer=opt,
                      rank_state={"rng": ckpt.rng_state(gen), "data": data.state_dict()}, meta=meta,
                      ema=ema, keep_last=cfg.keep_last, barrier=barrier)
            log.sync()
            if rank == 0:
                faults.after_commit("train")  # SIGMA_KILL_AT=train:n kills here (resume tests)
    if bar is not None:
        bar.close()
    data.close()
    final = ckpt.latest(out)
    log.write({"event": "end", "rank": rank, "step": cfg.steps, "checkpoint": final, "time": time.time()})
    log.close()
    if rank == 0:
        print(f"[train {cfg.name}] {cfg.steps} steps done (started at {start}); last loss "
              f"{last.get('loss', float('nan')):.4f}; checkpoint {final}", flush=True)
    return {"rank": rank, "start": start, "steps": cfg.steps, "checkpoint": str(final), "last": last}

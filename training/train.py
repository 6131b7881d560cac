"""The training loop of one stage: `train(cfg, rank, world_size)`.

One flat loop, the same under Ray Train workers, torchrun and a plain single process:
  batch (bucket-pure, from training.data) -> caption dropout to the null embedding -> t ~ U[0, T),
  noise ~ N(0, I) -> diffusion loss (eps MSE + VB for the learned variance) under autocast ->
  backward -> grad-norm clip -> CAME step at the scheduled lr -> EMA -> log -> checkpoint.
Differences from the official trainer, on purpose: every rank has its own seed; lr scaling is an
explicit config rule; RNG and the exact data position are checkpointed, so resume continues with
the next batch; the stage resumes by itself when its output folder already holds a checkpoint.
"""
from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.config import to_dict
from training import checkpoint as ckpt
from training.config import TrainStageConfig
from training.data import apply_caption_dropout, make_batches

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


def pick_device(cfg: TrainStageConfig, local_rank: int = 0) -> torch.device:
    if cfg.use_gpu and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_dtype(cfg: TrainStageConfig, device: torch.device) -> torch.dtype | None:
    p = cfg.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def build(cfg: TrainStageConfig):
    from training.diffusion import GaussianDiffusion
    from training.model import build_model

    kw = cfg.model_kwargs()
    if cfg.grad_checkpointing:
        kw["grad_checkpoint"] = True
    return build_model(cfg.model.preset, **kw), GaussianDiffusion.pixart()


def null_embedding(model: torch.nn.Module) -> torch.Tensor:
    """(Ln, D) fixed embedding of the empty caption (the model's `y_embedding` buffer)."""
    return model.y_embedder.y_embedding.detach()


def init_from(model: torch.nn.Module, source: str) -> dict:
    """Initialise from a previous stage (its latest checkpoint) or an official .pth/.safetensors.

    training.convert.load_into does the fix-ups: pos_embed is never loaded (recomputed for the new
    resolution: PE interpolation needs no weights), the null-caption buffer is adopted, and
    KV-compression layers absent from the source get the Conv Avg Init (w = 1/R^2); any other
    missing or unexpected key raises. Returns a small report."""
    from training.convert import load_into, read_state_dict

    src = Path(source)
    if src.is_file():
        sd, _ = read_state_dict(src)
    else:
        c = ckpt.resolve(src)
        if c is None:
            raise FileNotFoundError(f"init_from {source}: no checkpoint there (run that stage first)")
        src, sd = c, ckpt.load_weights(c)
    kv_init = load_into(model, sd)
    return {"source": str(src), "tensors": len(sd), "kv_avg_init": kv_init}


def make_optimizer(model: torch.nn.Module, cfg: TrainStageConfig, world_size: int = 1):
    """CAME with PixArt's settings; lr after the explicit scaling rule (the warmup sets it per step)."""
    from came_pytorch import CAME

    return CAME([p for p in model.parameters() if p.requires_grad], lr=cfg.scaled_lr(world_size),
                eps=CAME_EPS, betas=CAME_BETAS, weight_decay=cfg.weight_decay)


class JsonlLog:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "a")

    def write(self, rec: dict) -> None:
        self.fh.write(json.dumps(rec, default=str) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def train(cfg: TrainStageConfig, rank: int = 0, world_size: int = 1, local_rank: int | None = None) -> dict:
    """Run (or resume) one stage to `cfg.steps`. Returns a summary (rank-local)."""
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        raise RuntimeError("world_size > 1 needs an initialised process group (training.launch does it)")
    barrier = dist.barrier if distributed else (lambda: None)
    device = pick_device(cfg, rank if local_rank is None else local_rank)
    amp = autocast_dtype(cfg, device)
    out = Path(cfg.output_dir)
    seed_everything(rank_seed(cfg.seed, rank))
    gen = torch.Generator().manual_seed(rank_seed(cfg.seed, rank) + 1)  # timesteps + noise

    model, diffusion = build(cfg)
    model.to(device)
    base_lr = cfg.scaled_lr(world_size)
    opt = make_optimizer(model, cfg, world_size)
    log = JsonlLog(out / "logs" / f"rank-{rank:05d}.jsonl")

    start, init_report, position = 0, None, None
    resume = ckpt.latest(out)
    if resume is not None:
        from training.convert import load_into

        load_into(model, ckpt.load_weights(resume))
        st = ckpt.load_optimizer(resume)
        if st is not None:
            opt.load_state_dict(st)
        start = ckpt.read_meta(resume)["step"]
        rs = ckpt.load_rank_state(resume, rank)
        if rs is not None:
            ckpt.set_rng_state(rs["rng"], gen)
            position = rs["data"]
    elif cfg.init_from:
        init_report = init_from(model, cfg.init_from)
    ema = None
    if cfg.ema is not None:
        ema = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}
        if resume is not None and (resume / "ema.safetensors").exists():
            ema = {k: v.to(device) for k, v in ckpt.load_weights(resume, ema=True).items()}
    null = null_embedding(model).cpu()  # (Ln, D)
    # The data stream starts at the checkpointed position (the next batch after the saved step).
    data = make_batches(cfg.shards_dir, cfg.batch_size, rank, world_size, cfg.seed, cfg.long_ratio,
                        cfg.caption_dropout, cfg.data.pad_tokens, cfg.data.max_length,
                        cfg.data.prefetch if start < cfg.steps else 0, position)

    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    meta = {"preset": cfg.model.preset, "model_kwargs": cfg.model_kwargs(), "config": to_dict(cfg)}
    log.write({"event": "start", "rank": rank, "world_size": world_size, "step": start, "resumed_from": resume,
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
        # Dropout was decided by the data position (deterministic); the whole null caption replaces
        # the caption and its mask, and the model is told not to drop again (force_drop_ids = 0).
        y, mask = apply_caption_dropout(b["y"], b["mask"], b["drop"], null)
        y, mask = y.to(device), mask.to(device)  # (B, L, D), (B, L)
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

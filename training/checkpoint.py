"""Training checkpoints: one folder per saved step, written atomically.

Layout (`<stage output>/checkpoints/step-00001000/`):
    model.safetensors   model weights (fp32, the unwrapped module's state_dict)
    ema.safetensors     EMA weights (only with `ema:` set)
    optimizer.pt        optimizer state_dict (rank 0; identical on every DDP rank)
    rank-00000.pt       per-rank state: RNG states (torch, numpy, python, cuda, the loop's generator)
                        and the data position {epoch, cursor, shards}
    meta.json           format, step, world_size, model preset + build kwargs, resolved stage config

Every rank writes its own rank file into a hidden temp folder; rank 0 writes the rest and renames
the folder into place, so a folder named step-* is always complete (a killed save leaves only a
.tmp-* folder, removed by the next save). `latest(dir)` returns the newest complete one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "sigma-ckpt/1"
PREFIX = "step-"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    d = checkpoints_dir(output_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(output_dir: str | Path) -> Path | None:
    """Newest complete checkpoint folder of a stage output (or None)."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve(path: str | Path) -> Path | None:
    """A checkpoint folder itself, or the latest one of a stage output folder."""
    p = Path(path)
    if (p / "meta.json").exists() and (p / "model.safetensors").exists():
        return p
    return latest(p)


# --- RNG ------------------------------------------------------------------------------------
def rng_state(generator: torch.Generator | None = None) -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        st["generator"] = generator.get_state()
    return st


def set_rng_state(st: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if generator is not None and "generator" in st:
        generator.set_state(st["generator"])


# --- save / load ------------------------------------------------------------------------------
def _cpu_state(sd: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save(output_dir: str | Path, step: int, *, rank: int, world_size: int, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None, rank_state: dict, meta: dict,
         ema: dict | None = None, keep_last: int = 2, barrier: Callable[[], None] = lambda: None) -> Path:
    """Collective: every rank calls it with its own `rank_state` (RNG + data position)."""
    root = checkpoints_dir(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    torch.save(rank_state, tmp / f"rank-{rank:05d}.pt")
    if rank == 0:
        save_file(_cpu_state(model.state_dict()), str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(_cpu_state(ema), str(tmp / "ema.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "step": step, "world_size": world_size, **meta},
                                                  indent=2, default=str))
    barrier()  # every rank file is written before the rename
    if rank == 0:
        if final.exists():  # a re-save of the same step (e.g. rerun after a crash mid-prune)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def read_meta(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def load_weights(ckpt: str | Path, ema: bool = False) -> dict:
    p = Path(ckpt) / ("ema.safetensors" if ema else "model.safetensors")
    return load_file(str(p))


def load_rank_state(ckpt: str | Path, rank: int) -> dict | None:
    p = Path(ckpt) / f"rank-{rank:05d}.pt"
    return torch.load(p, weights_only=False) if p.exists() else None


def load_optimizer(ckpt: str | Path) -> dict | None:
    p = Path(ckpt) / "optimizer.pt"
    return torch.load(p, weights_only=False, map_location="cpu") if p.exists() else None


def write_model_only(out_dir: str | Path, model: torch.nn.Module, meta: dict) -> Path:
    """A weights-only checkpoint folder (e.g. models/tiny/dit), same layout, atomic."""
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_cpu_state(model.state_dict()), str(tmp / "model.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "step": 0, "world_size": 1, **meta}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_model(ckpt: str | Path, ema: bool | None = None, device: str | torch.device = "cpu"):
    """Build the model recorded in a checkpoint (folder or stage output) and load its weights.

    ema=None uses the EMA weights when the checkpoint has them."""
    from training.model import build_model

    c = resolve(ckpt)
    if c is None:
        raise FileNotFoundError(f"{ckpt}: no checkpoint")
    meta = read_meta(c)
    model = build_model(meta["preset"], **meta.get("model_kwargs", {}))
    use_ema = (c / "ema.safetensors").exists() if ema is None else ema
    from training.convert import load_into

    load_into(model, load_weights(c, ema=use_ema))  # raises on any mismatch (pos_embed is recomputed)
    return model.to(device).eval()

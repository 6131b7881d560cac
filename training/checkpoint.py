"""Training checkpoints: one folder per saved step, committed by its meta.json, local or object store.

Layout (`<stage output>/checkpoints/step-00001000/`, the output a local path or a URI):
    model.safetensors   model weights (fp32, the unwrapped module's state_dict)
    ema.safetensors     EMA weights (only with `ema:` set)
    optimizer.pt        optimizer state_dict (rank 0; identical on every DDP rank)
    rank-00000.pt       per-rank state: RNG states (torch, numpy, python, cuda, the loop's generator)
                        and the data position {epoch, cursor, shards}
    meta.json           format, step, world_size, model preset + build kwargs, resolved stage config,
                        and `files`: {name: {bytes, sha256}} of every file above

Commit protocol (the same on local disks and object stores, which have no folder rename): every
file is written atomically (_sigma.fs: temp + fsync + rename locally, one PUT on object stores),
then rank 0 writes meta.json LAST. A folder is a checkpoint iff its meta.json exists; a killed
save leaves a folder without it, which is ignored and removed by the next save. Re-saving a step
first removes its meta.json. Every read checks the file's size and sha256 against meta.json, so a
truncated or corrupted file raises `CorruptCheckpoint` and resume falls back to the newest
checkpoint that verifies. Checkpoints whose meta.json predates checksums (format /1) are read
unchecked; a file there that does not parse (bad safetensors header, truncated data) makes resume
fall back the same way (`LOAD_ERRORS`). `.pt` files are read with torch.load(weights_only=True) only.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import warnings
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from _sigma import fs

FORMAT = "sigma-ckpt/2"
PREFIX = "step-"
META = "meta.json"


class CorruptCheckpoint(ValueError):
    """A checkpoint file whose size or checksum differs from its meta.json (or is missing)."""


def checkpoints_dir(output_dir) -> str:
    return fs.join(fs.normalize(output_dir), "checkpoints")


def _step_dirs(output_dir) -> list[tuple[int, str]]:
    d = checkpoints_dir(output_dir)
    out = []
    for name in fs.listdir(d):
        if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
            out.append((int(name[len(PREFIX):]), fs.join(d, name)))
    return sorted(out)


def list_checkpoints(output_dir) -> list[str]:
    """Committed checkpoint folders (meta.json present), oldest first."""
    return [p for _, p in _step_dirs(output_dir) if fs.exists(fs.join(p, META))]


def latest(output_dir) -> str | None:
    """Newest committed checkpoint folder of a stage output (or None); not verified."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def is_checkpoint(path) -> bool:
    return fs.exists(fs.join(fs.normalize(path), META))


def resolve(path) -> str | None:
    """A checkpoint folder itself, or the newest committed one of a stage output folder."""
    p = fs.normalize(path)
    return p if is_checkpoint(p) else latest(p)


def candidates(path) -> list[str]:
    """Checkpoints to try for `path`, newest first (a checkpoint folder: just itself)."""
    p = fs.normalize(path)
    return [p] if is_checkpoint(p) else list(reversed(list_checkpoints(p)))


def is_checkpoint_source(path) -> bool:
    """A training checkpoint folder or a stage output that holds at least one."""
    return bool(candidates(path))


# --- RNG ------------------------------------------------------------------------------------
def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG the loop uses, as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        st["generator"] = generator.get_state()
    return st


def set_rng_state(st: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if generator is not None and "generator" in st:
        generator.set_state(st["generator"])


# --- save -----------------------------------------------------------------------------------
def _cpu_state(sd: dict) -> dict:
    """CPU tensors safetensors can write: no copy of a contiguous CPU tensor unless it shares
    storage with one already taken (tied weights), so a 2.4 GB model costs no extra 2.4 GB."""
    out, seen = {}, set()
    for k, v in sd.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _write_safetensors(uri: str, state: dict) -> dict:
    """Stream the weights to a local temp file, then copy it into place while hashing: no bytes
    object of the whole checkpoint in memory (the real-size XL save peaked at 3 weight copies)."""
    import os
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="sigma-ckpt-") as d:
        local = os.path.join(d, "w.safetensors")
        save_file(state, local)
        h, n = hashlib.sha256(), 0
        with open(local, "rb") as src, fs.atomic_output(uri) as dst:
            while chunk := src.read(16 << 20):
                h.update(chunk)
                n += len(chunk)
                dst.write(chunk)
    return {"bytes": n, "sha256": h.hexdigest()}


def _digest(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _commit(folder: str, files: dict, meta: dict) -> None:
    fs.write_text(fs.join(folder, META), json.dumps({**meta, "files": files}, indent=2, default=str))


def save(output_dir, step: int, *, rank: int, world_size: int, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None, rank_state: dict, meta: dict,
         ema: dict | None = None, keep_last: int = 2, barrier: Callable[[], None] = lambda: None) -> str:
    """Collective: every rank calls it with its own `rank_state` (RNG + data position). Returns the
    committed folder (see the module docstring for the protocol)."""
    folder = fs.join(checkpoints_dir(output_dir), f"{PREFIX}{step:08d}")
    if rank == 0:
        fs.delete(fs.join(folder, META))  # a re-save of a step: uncommit it first
    barrier()
    fs.write_bytes(fs.join(folder, f"rank-{rank:05d}.pt"), _torch_bytes(rank_state))
    if rank == 0:
        files = {"model.safetensors": _write_safetensors(fs.join(folder, "model.safetensors"),
                                                         _cpu_state(model.state_dict()))}
        if ema is not None:
            files["ema.safetensors"] = _write_safetensors(fs.join(folder, "ema.safetensors"), _cpu_state(ema))
        if optimizer is not None:
            data = _torch_bytes(optimizer.state_dict())
            fs.write_bytes(fs.join(folder, "optimizer.pt"), data)
            files["optimizer.pt"] = _digest(data)
            del data
    barrier()  # every rank file is written before the commit
    if rank == 0:
        for r in range(world_size):
            name = f"rank-{r:05d}.pt"
            files[name] = _digest(fs.read_bytes(fs.join(folder, name)))
        _commit(folder, files, {"format": FORMAT, "step": step, "world_size": world_size, **meta})
        committed = list_checkpoints(output_dir)
        for old in committed[:-keep_last]:
            fs.delete_dir(old)
        for _, p in _step_dirs(output_dir):  # partial folders of killed saves
            if p != folder and p not in committed:
                fs.delete_dir(p)
    barrier()
    return folder


def write_model_only(out_dir, model: torch.nn.Module, meta: dict) -> str:
    """A weights-only checkpoint folder (e.g. models/tiny/dit), same layout and commit."""
    folder = fs.normalize(out_dir)
    fs.delete(fs.join(folder, META))
    digest = _write_safetensors(fs.join(folder, "model.safetensors"), _cpu_state(model.state_dict()))
    _commit(folder, {"model.safetensors": digest}, {"format": FORMAT, "step": 0, "world_size": 1, **meta})
    return folder


# --- load -----------------------------------------------------------------------------------
def read_meta(ckpt) -> dict:
    return fs.read_json(fs.join(fs.normalize(ckpt), META))


def read_verified(ckpt, name: str, meta: dict | None = None) -> bytes | None:
    """Bytes of one file, checked against meta.json (size + sha256); None when the checkpoint has
    no such file. Checkpoints written before checksums existed (format /1) are read unchecked."""
    ckpt = fs.normalize(ckpt)
    meta = read_meta(ckpt) if meta is None else meta
    want = (meta.get("files") or {}).get(name)
    uri = fs.join(ckpt, name)
    if want is None:
        if meta.get("files") is not None or not fs.exists(uri):
            return None
        return fs.read_bytes(uri)
    try:
        data = fs.read_bytes(uri)
    except (FileNotFoundError, OSError) as e:
        raise CorruptCheckpoint(f"{uri}: listed in meta.json but unreadable ({e})") from None
    got = _digest(data)
    if got != want:
        raise CorruptCheckpoint(f"{uri}: {got['bytes']} bytes sha256 {got['sha256'][:12]}..., meta.json records "
                                f"{want['bytes']} bytes sha256 {want['sha256'][:12]}... (corrupt or truncated)")
    return data


def _torch_from(data: bytes | None):
    return None if data is None else torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_weights(ckpt, ema: bool = False, meta: dict | None = None) -> dict:
    data = read_verified(ckpt, "ema.safetensors" if ema else "model.safetensors", meta)
    if data is None:
        raise CorruptCheckpoint(f"{ckpt}: no {'ema' if ema else 'model'}.safetensors")
    return st_load(data)


def load_rank_state(ckpt, rank: int, meta: dict | None = None) -> dict | None:
    return _torch_from(read_verified(ckpt, f"rank-{rank:05d}.pt", meta))


def load_optimizer(ckpt, meta: dict | None = None) -> dict | None:
    return _torch_from(read_verified(ckpt, "optimizer.pt", meta))


def load_state(ckpt, rank: int, ema: bool) -> dict:
    """Everything a resuming rank needs from one checkpoint, verified: meta, weights, optimizer,
    rank state, ema (or None). Raises CorruptCheckpoint (or a parse error) when anything is bad."""
    meta = read_meta(ckpt)
    return {"ckpt": fs.normalize(ckpt), "meta": meta, "weights": load_weights(ckpt, meta=meta),
            "optimizer": load_optimizer(ckpt, meta), "rank": load_rank_state(ckpt, rank, meta),
            "ema": load_weights(ckpt, ema=True, meta=meta) if ema and "ema.safetensors" in meta.get("files", {})
            else None}


# What an unusable checkpoint raises: a checksum mismatch, and for files read unchecked (format /1
# meta.json, without checksums) the parsers' own errors: safetensors' SafetensorError (bad header,
# truncated data: not a ValueError), torch.load's RuntimeError / UnpicklingError / EOFError.
LOAD_ERRORS = (CorruptCheckpoint, SafetensorError, pickle.UnpicklingError, ValueError, KeyError, RuntimeError,
               OSError, EOFError)


def load_newest(path, load: Callable[[str], object]):
    """(checkpoint, load(checkpoint)) for the newest checkpoint of `path` that loads; warns for
    each one skipped (corrupt, truncated, unreadable). FileNotFoundError when none loads."""
    tried = []
    for c in candidates(path):
        try:
            return c, load(c)
        except LOAD_ERRORS as e:
            warnings.warn(f"checkpoint {c} is unusable, falling back to an older one: {e}")
            tried.append(c)
    raise FileNotFoundError(f"{path}: no usable checkpoint" + (f" (tried {', '.join(tried)})" if tried else ""))


def load_model(ckpt, ema: bool | None = None, device: str | torch.device = "cpu"):
    """Build the model recorded in a checkpoint (folder, or a stage output: its newest checkpoint
    that verifies) and load its weights. ema=None uses the EMA weights when the checkpoint has them."""
    from training.convert import load_into
    from training.model import build_model

    def build(c):
        meta = read_meta(c)
        model = build_model(meta["preset"], **meta.get("model_kwargs", {}))
        has_ema = "ema.safetensors" in (meta.get("files") or {}) or \
            (meta.get("files") is None and fs.exists(fs.join(c, "ema.safetensors")))
        load_into(model, load_weights(c, ema=has_ema if ema is None else ema, meta=meta))  # pos_embed recomputed
        return model

    _, model = load_newest(ckpt, build)
    return model.to(device).eval()

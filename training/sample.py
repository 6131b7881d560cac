"""Sampling: DPM-Solver++ (diffusers scheduler, default 20 steps, cfg 4.5) and IDDPM (100 steps).

Library (stable API for eval code):
  sample_latents(model, y, mask, null_y, height, width, steps=None, cfg=4.5, sampler="dpm", seed=0)
      -> (B, 4, height/8, width/8) float32 latents (UNscaled: as the DiT sees them)
  decode_latents(vae, latents, scale_factor=0.13025) -> (B, H, W, 3) uint8 numpy
  encode_prompts(tokenizer, t5, prompts, max_length=300) -> (y (B, L, D), mask (B, L))
  load_dit(path, image_size=None, null=None, ...) -> model (a training checkpoint folder, a stage
      output, a diffusers transformer / pipeline folder, or an official/plain .pth / .safetensors)

CLI (sigma-sample, training.cli):
  python -m training.sample --checkpoint CKPT_OR_DIR (--prompts FILE | --prompt TEXT) --t5 PATH
      --vae PATH --out DIR [--height 1024 --width 1024 --steps --cfg 4.5 --seed 0 --sampler dpm|iddpm]

Image i of a run uses initial noise from seed + i, so results do not depend on the batch size
(DPM-Solver++ is deterministic given the noise). The unconditional branch uses the model's null
caption under its `null_policy` (what caption dropout trained): T5("") under its own mask for our
and diffusers-origin weights (= diffusers' PixArtSigmaPipeline), the 300-token null under the
prompt's mask for official-origin `.pth` weights (= PixArtMS.forward). The CLI always sets the null
to T5("") of --t5 (the official load_checkpoint does the same on every load); --negative-prompt
replaces it by T5(text) (valid tokens only).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from _sigma import fs
from _sigma.device import pick_device
from training.diffusion import GaussianDiffusion

VAE_DOWNSAMPLE = 8
DEFAULT_STEPS = {"dpm": 20, "iddpm": 100}


def dpm_scheduler(num_train_timesteps: int = 1000):
    """diffusers DPM-Solver++ (2M) on PixArt's 1000-step linear 1e-4..0.02 schedule, eps output
    (the learned-variance channels are dropped before the step). Matches the PixArt-Sigma release."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=num_train_timesteps, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", prediction_type="epsilon",
        lower_order_final=True, timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=False,
        thresholding=False)


def _noise(shape, seed: int) -> torch.Tensor:
    """(B, C, h, w): sample j from its own CPU generator seeded seed + j (batch-size independent)."""
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed + j))
                        for j in range(shape[0])])


@torch.no_grad()
def sample_latents(model, y: torch.Tensor, mask: torch.Tensor | None, null_y: torch.Tensor | None,
                   height: int, width: int, steps: int | None = None, cfg: float = 4.5, sampler: str = "dpm",
                   seed: int = 0, null_mask: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    """Generate latents for captions y (B, L, D) / mask (B, L) at an image size height x width
    (pixels; a multiple of 8 * patch). null_y (Ln, D) or (B, Ln, D) with null_mask (default all
    valid) = an explicit negative caption; None = the model's null caption under its null_policy
    (`PixArtSigma.forward_with_cfg`). cfg <= 1 disables guidance."""
    if sampler not in DEFAULT_STEPS:
        raise ValueError(f"sampler must be one of {list(DEFAULT_STEPS)}, got {sampler!r}")
    steps = steps or DEFAULT_STEPS[sampler]
    p = model.config.patch_size
    if height % (VAE_DOWNSAMPLE * p) or width % (VAE_DOWNSAMPLE * p):
        raise ValueError(f"height/width must be multiples of {VAE_DOWNSAMPLE * p}, got {height}x{width}")
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    b = y.shape[0]
    y = y.to(dev, dtype)
    mask = torch.ones(y.shape[:2], dtype=torch.bool, device=dev) if mask is None else mask.to(dev).bool()
    if null_y is not None:
        null_y = null_y.to(dev, dtype)
        if null_y.dim() == 2:
            null_y = null_y[None]
        if null_mask is not None:
            null_mask = null_mask.to(dev).bool().reshape(null_y.shape[0], -1)
    cin = model.config.in_channels

    def eps_fn(x, t):
        """x (B, C, h, w) float32, t (B,) -> guided output (B, Cout, h, w) float32."""
        xin = x.to(dtype)
        if cfg > 1.0:
            out = model.forward_with_cfg(xin, t, y, mask, null_y, cfg, null_mask=null_mask)
        else:
            out = model(xin, t, y, mask)
        return out.float()

    was_training = model.training
    model.eval()
    try:
        shape = (b, cin, height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE)
        x = _noise(shape, seed).to(dev)
        if sampler == "dpm":
            sched = dpm_scheduler()
            sched.set_timesteps(steps, device=dev)
            x = x * sched.init_noise_sigma
            it = sched.timesteps
            if progress:
                from tqdm.auto import tqdm
                it = tqdm(it, desc="dpm++")
            for t in it:
                eps = eps_fn(x, t.expand(b).to(dev))[:, :cin]  # drop learned-variance channels
                x = sched.step(eps, t, x).prev_sample
        else:
            diff = GaussianDiffusion(learn_sigma=model.config.learn_sigma).respaced(steps)
            gen = torch.Generator().manual_seed(seed)
            x = diff.p_sample_loop(lambda xx, tt: eps_fn(xx, tt), shape, noise=x, generator=gen, progress=progress)
    finally:
        model.train(was_training)
    return x.float()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale_factor: float = 0.13025, chunk: int = 4) -> np.ndarray:
    """VAE-decode (B, 4, h, w) latents (divided by scale_factor first) -> (B, 8h, 8w, 3) uint8."""
    param = next(vae.parameters())
    out = []
    for i in range(0, latents.shape[0], chunk):
        z = latents[i:i + chunk].to(param.device, param.dtype) / scale_factor
        img = vae.decode(z).sample.float().clamp(-1, 1)  # (b, 3, H, W) in [-1, 1]
        out.append(((img + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def encode_prompts(tokenizer, t5, prompts: list[str], max_length: int = 300):
    """T5 encoder features of prompts -> (y (B, L, D) float32, mask (B, L) bool), padded to the
    longest prompt of the batch (padding is masked, so this equals padding to max_length)."""
    tok = tokenizer(list(prompts), max_length=max_length, padding="longest", truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    dev = next(t5.parameters()).device
    ids, am = tok.input_ids.to(dev), tok.attention_mask.to(dev)
    y = t5(input_ids=ids, attention_mask=am).last_hidden_state
    return y.float(), am.bool()


def load_dit(path, preset: str = "PixArt-XL/2", device="cpu", image_size: int | None = None,
             version: str = "sigma", null=None, trust_pickle: bool = False, **overrides):
    """A training checkpoint folder or stage output (local or URI; PE and null policy from its
    meta), a diffusers transformer or pipeline folder, or a state-dict file (PE from its saved
    model_config, else `image_size` / `version` are required, as the official converter's
    --image_size). `null` (training.null source or a computed (emb, valid)) overwrites the null
    caption; a diffusers folder needs one (a pipeline folder brings its T5)."""
    from training import convert
    from training.checkpoint import is_checkpoint_source, load_model

    spath = str(path)
    if not is_checkpoint_source(spath):  # a diffusers folder or weight file on s3:// / gs://: cached per node
        from _sigma.fetch import local_model

        spath = local_model(spath)
    if is_checkpoint_source(spath):
        model = load_model(spath, device="cpu")
        if null is not None:
            model.set_null_embedding(*_null(null, model, trust_pickle))
    elif os.path.isdir(os.path.expanduser(spath)):
        if null is None and convert.pipeline_root(spath) is None:
            raise ValueError(f"{spath}: diffusers weights carry no null caption (diffusers encodes \"\" with T5 "
                             "when sampling): pass null= / --t5 (a T5 folder or a null file)")
        model = convert.from_diffusers(spath, null=None if null is None else _null(null, None, trust_pickle))
    else:
        model = convert.load_official(spath, preset, image_size, version, trust_pickle=trust_pickle)
        if null is not None:
            model.set_null_embedding(*_null(null, model, trust_pickle))
    if overrides:
        import dataclasses
        sd = model.state_dict()
        model = type(model)(dataclasses.replace(model.config, **overrides))
        convert.load_into(model, sd)
    return model.to(device).eval()


def dit_pe(path, image_size: int | None = None, version: str = "sigma", trust_pickle: bool = False) -> dict:
    """The position embedding `load_dit(path, image_size=..., version=...)` builds, read without
    loading the model: {"base_size", "pe_interpolation", "source"}. Training checkpoints (meta.json),
    diffusers folders (config.json) and our own `.pth` (model_config) record it; a plain official
    file does not, and needs `image_size` = the resolution it was TRAINED at (with `version`'s PE
    table), never the size one generates at. ValueError when it is missing, or when `image_size`
    contradicts a recorded PE."""
    import dataclasses

    from training import convert
    from training.checkpoint import candidates, is_checkpoint_source, read_meta
    from training.model import PRESETS, pe_settings

    spath = str(path)
    if not is_checkpoint_source(spath):  # as load_dit: a remote diffusers folder / file via its local cache
        from _sigma.fetch import local_model

        spath = local_model(spath)
    if is_checkpoint_source(spath):
        c = candidates(spath)[0]
        meta = read_meta(c)
        cfg = dataclasses.replace(PRESETS[meta["preset"]], **meta.get("model_kwargs", {}))
        source = f"recorded in {c}/meta.json"
    elif os.path.isdir(os.path.expanduser(spath)):
        root = convert.pipeline_root(spath)
        folder = (spath if os.path.isfile(os.path.join(spath, "config.json"))
                  else os.path.join(root or spath, "transformer"))
        with open(os.path.join(folder, "config.json")) as f:
            cfg = convert.config_from_diffusers(json.load(f))
        source = f"recorded in {folder}/config.json"
    else:
        patch, saved = _file_header(spath, trust_pickle)
        if saved:
            cfg = convert._saved_config(saved)
            source = f"recorded in {spath} (model_config)"
        elif image_size is not None:
            pe = pe_settings(int(image_size), version, patch)
            return {**pe, "source": f"trained at {int(image_size)} px ({version} PE table)"}
        else:
            raise ValueError(f"{spath}: the file does not record the resolution it was trained at: give it "
                             "(eval.weights_resolution, --image-size; not the size you generate at)")
    pe = {"base_size": cfg.base_size, "pe_interpolation": float(cfg.pe_interpolation)}
    if image_size is not None:
        want = pe_settings(int(image_size), version, cfg.patch_size)
        if (want["base_size"], float(want["pe_interpolation"])) != (pe["base_size"], pe["pe_interpolation"]):
            raise ValueError(f"{spath}: records PE base_size {pe['base_size']}, interpolation {pe['pe_interpolation']}"
                             f" ({source}); a training size of {image_size} px ({version}) gives {want}: drop the "
                             "training size setting or fix it")
    return {**pe, "source": source}


def _file_header(path: str, trust_pickle: bool) -> tuple[int, dict | None]:
    """(patch size, saved model_config or None) of a weight file, cheaply where possible:
    safetensors by its header, a local zip-format .pth memory-mapped (its tensors are not read)."""
    import pickle

    from training import convert

    local = fs.local_path(path)
    key = "x_embedder.proj.weight"  # (hidden, in_channels, patch, patch)
    if local and path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(local, "pt") as f:
            return int(f.get_slice(key).get_shape()[2]), None
    obj = None
    if local:
        try:
            obj = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, ValueError, pickle.UnpicklingError):  # legacy format or refused: the full reader says why
            obj = None
    if obj is None:
        sd, saved = convert.read_state_dict(path, trust_pickle)
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd, saved = obj["state_dict"], obj.get("model_config")
    else:
        sd, saved = obj, None
    return int(sd[key].shape[2]), saved


def _null(null, model, trust_pickle: bool):
    from training.null import null_from

    return null_from(null, model.config.null_tokens if model is not None else 300, trust_pickle)


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:n] or "empty"


def main(argv=None) -> int:
    """`python -m training.sample` = `sigma-sample` (training.cli holds the parser and the checks)."""
    from training.cli import sample

    return sample(argv)


def run(args) -> None:
    """The sampling of checked sigma-sample arguments (training.cli.sample_problem passed)."""
    from _sigma.models import load_t5, load_vae

    args.device = args.device or pick_device()

    from tqdm import tqdm
    from PIL import Image

    prompts = [args.prompt] if args.prompt is not None else \
        [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer, t5 = load_t5(args.t5, args.device)  # folder | hub name | s3:// / gs:// (_sigma.fetch)
    from training.null import encode_null

    try:  # the null caption is T5("") of this T5, whatever the weights carried (official rule)
        model = load_dit(args.checkpoint, args.preset, device=args.device, image_size=args.image_size,
                         version=args.version, null=encode_null(tokenizer, t5, args.max_length),
                         trust_pickle=args.trust_pickle)
    except ValueError as e:  # incl. training.files.PickleRefused and a missing --image-size
        from _sigma.cli import fail

        fail("sigma-sample", str(e))
    vae = load_vae(args.vae, args.device)
    scale = args.scale_factor or getattr(vae.config, "scaling_factor", None) or 0.13025
    null_y = null_mask = None
    if args.negative_prompt is not None:
        ny, nm = encode_prompts(tokenizer, t5, [args.negative_prompt], args.max_length)
        null_y = ny[0][nm[0]]  # valid tokens only (n, D)
    names = [f"{i:05d}_{_slug(p)}.png" for i, p in enumerate(prompts)]
    todo = [i for i in range(len(prompts)) if not (out / names[i]).exists()]  # resume
    done = 0
    for s in tqdm(range(0, len(todo), args.batch_size), desc="sample", unit="batch"):
        idx = todo[s:s + args.batch_size]
        y, mask = encode_prompts(tokenizer, t5, [prompts[i] for i in idx], args.max_length)
        # image i uses seed + i: run consecutive runs of indices together to keep that mapping
        lat = torch.cat([sample_latents(model, y[j:j + 1], mask[j:j + 1], null_y, args.height, args.width,
                                        args.steps, args.cfg, args.sampler, args.seed + i, null_mask)
                         for j, i in enumerate(idx)]) if idx != list(range(idx[0], idx[0] + len(idx))) else \
            sample_latents(model, y, mask, null_y, args.height, args.width, args.steps, args.cfg, args.sampler,
                           args.seed + idx[0], null_mask)
        imgs = decode_latents(vae, lat, scale)
        for i, img in zip(idx, imgs):
            with fs.atomic_output(str(out / names[i])) as f:
                Image.fromarray(img).save(f, format="PNG")
            done += 1
    summary = {"prompts": len(prompts), "written": done, "skipped_existing": len(prompts) - len(todo),
               "sampler": args.sampler, "steps": args.steps or DEFAULT_STEPS[args.sampler], "cfg": args.cfg,
               "size": [args.height, args.width], "seconds": round(time.time() - t0, 1)}
    fs.write_json(str(out / "sample_summary.json"), summary, indent=2)
    print(f"[sample] {json.dumps(summary)}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-step time of our PixArt-Sigma DiT vs diffusers' PixArtTransformer2DModel.

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_bench.py [--hidden 128 --heads 4 --depth 4
      --latent 32 --batch 4 --steps 10]

Both models hold the SAME weights (ours exported with training.convert.to_diffusers) and run the
same step: diffusion loss (eps MSE + VB, training.diffusion) -> backward -> CAME step. Steps are
interleaved (ours, diffusers, ours, ...) after a warm-up so machine load hits both alike; the
median is reported. Ratio = ours / diffusers (goal <= 1.0).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from came_pytorch import CAME

from training.convert import to_diffusers
from training.diffusion import GaussianDiffusion
from training.model import build_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--latent", type=int, default=32, help="latent side (tokens = (latent/2)^2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=120, help="padded caption length")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    ours = build_model("PixArt-tiny", hidden_size=args.hidden, num_heads=args.heads, depth=args.depth,
                       caption_channels=32, base_size=args.latent // 2, pe_interpolation=1.0, caption_dropout=0.0)
    theirs = to_diffusers(ours)
    diff = GaussianDiffusion()
    g = torch.Generator().manual_seed(1)
    b = args.batch
    x = torch.randn(b, 4, args.latent, args.latent, generator=g)
    y = torch.randn(b, args.tokens, 32, generator=g)
    lengths = torch.randint(8, args.tokens + 1, (b,), generator=g)
    mask = torch.arange(args.tokens)[None] < lengths[:, None]  # (B, L) variable-length captions

    def their_fn(xt, t, y, mask):
        return theirs(xt, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask.long(), return_dict=False)[0]

    runs = {"ours": (ours, ours), "diffusers": (theirs, their_fn)}
    opts = {k: CAME(m.parameters(), lr=2e-5, eps=(1e-30, 1e-16), betas=(0.9, 0.999, 0.9999), weight_decay=0.0)
            for k, (m, _) in runs.items()}
    times = {k: [] for k in runs}

    def step(k):
        m, fn = runs[k]
        m.train()
        t = torch.randint(0, 1000, (b,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        t0 = time.perf_counter()
        loss = diff.training_losses(fn, x, t, model_kwargs={"y": y, "mask": mask}, noise=noise)["loss"].mean()
        loss.backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up
        for k in runs:
            step(k)
    for _ in range(args.steps):
        for k in runs:
            times[k].append(step(k))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"# config: hidden {args.hidden}, heads {args.heads}, depth {args.depth}, latent {args.latent}^2 "
          f"({(args.latent // 2) ** 2} tokens), batch {b}, caption {args.tokens} tokens (variable length), "
          f"params {sum(p.numel() for p in ours.parameters()):,}")
    for k in runs:
        print(f"{k:10s} median step {med[k] * 1000:8.1f} ms  (min {min(times[k]) * 1000:.1f} ms, {args.steps} steps)")
    print(f"ratio ours/diffusers: {med['ours'] / med['diffusers']:.3f}")


if __name__ == "__main__":
    main()

"""Training-step time of our PixArt-Sigma DiT vs diffusers' PixArtTransformer2DModel.

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_bench.py [--hidden 128 --heads 4 --depth 4
      --latent 32 --batch 4 --steps 10 --captions mix|uniform --tokens 300]

Both models hold the SAME weights (ours exported with training.convert.to_diffusers) and run the
same step: diffusion loss (eps MSE + VB, training.diffusion) -> backward -> CAME step. Steps are
interleaved (ours, diffusers, ours, ...) after a warm-up so machine load hits both alike; the
median is reported. Ratio = ours / diffusers (goal <= 1.0).

Captions, as the training data feeds them: `mix` (default) pads every caption to --tokens (300,
PixArt-Sigma's T5 length, as the official loader does) and draws each sample's valid length from
the paper's 60 % long / 40 % short mix (long ~N(230, 40) tokens clipped to 100..300, short
8..45); `uniform` draws lengths uniformly in 8..--tokens. Both models get the same tensors.
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


def caption_lengths(kind: str, b: int, tokens: int, g: torch.Generator) -> torch.Tensor:
    """(B,) valid caption lengths: the 60/40 long/short mix, or uniform in 8..tokens."""
    if kind == "uniform":
        return torch.randint(8, tokens + 1, (b,), generator=g)
    long_ = torch.rand(b, generator=g) < 0.6
    n_long = (230 + 40 * torch.randn(b, generator=g)).round().clamp(100, 300).long()
    n_short = torch.randint(8, 46, (b,), generator=g)
    return torch.where(long_, n_long, n_short).clamp(max=tokens)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--latent", type=int, default=32, help="latent side (tokens = (latent/2)^2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=300, help="padded caption length")
    ap.add_argument("--captions", choices=("mix", "uniform"), default="mix", help="valid-length distribution")
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
    lengths_per_step = [caption_lengths(args.captions, b, args.tokens, g) for _ in range(args.steps + 2)]

    def their_fn(xt, t, y, mask):
        return theirs(xt, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask.long(), return_dict=False)[0]

    runs = {"ours": (ours, ours), "diffusers": (theirs, their_fn)}
    opts = {k: CAME(m.parameters(), lr=2e-5, eps=(1e-30, 1e-16), betas=(0.9, 0.999, 0.9999), weight_decay=0.0)
            for k, (m, _) in runs.items()}
    times = {k: [] for k in runs}

    def step(k, i):
        m, fn = runs[k]
        mask = torch.arange(args.tokens)[None] < lengths_per_step[i][:, None]  # same captions for both
        m.train()
        t = torch.randint(0, 1000, (b,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        t0 = time.perf_counter()
        loss = diff.training_losses(fn, x, t, model_kwargs={"y": y, "mask": mask}, noise=noise)["loss"].mean()
        loss.backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for i in range(2):  # warm-up
        for k in runs:
            step(k, i)
    for i in range(args.steps):
        for k in runs:
            times[k].append(step(k, i + 2))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"# config: hidden {args.hidden}, heads {args.heads}, depth {args.depth}, latent {args.latent}^2 "
          f"({(args.latent // 2) ** 2} tokens), batch {b}, captions padded to {args.tokens} tokens, valid lengths "
          f"'{args.captions}' (mean batch max {statistics.mean(int(v.max()) for v in lengths_per_step):.0f}), "
          f"params {sum(p.numel() for p in ours.parameters()):,}")
    for k in runs:
        print(f"{k:10s} median step {med[k] * 1000:8.1f} ms  (min {min(times[k]) * 1000:.1f} ms, {args.steps} steps)")
    print(f"ratio ours/diffusers: {med['ours'] / med['diffusers']:.3f}")


if __name__ == "__main__":
    main()

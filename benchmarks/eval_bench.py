"""Eval throughput on this machine: FID feature extraction and generation, images/s.

    python benchmarks/eval_bench.py [--inception models/fid/default_1.pt] [--n 64] [--gen-n 8]

Feature extraction (preprocess from decoded PIL images + extractor forward, after 2 warm-up calls
per batch shape): batched
(eval.batch_size-style batches of --batch, FID protocol --protocol) vs batch 1, with the real TorchScript InceptionV3
when --inception points at it (else the tiny extractor). Generation (eval.generate.Generator with
the tiny models: T5 + DiT DPM-Solver++ 20 steps, cfg 4.5 + VAE decode at a 256 bucket): runs of
--gen-batch consecutive seeds vs batch 1. Both ratios are measured in this process.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (512, 384) if i % 2 else (384, 512)
        low = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
        out.append(Image.fromarray(low).resize((w, h), Image.BICUBIC))
    return out


def extract_rate(cfg, extractor, imgs, batch: int) -> float:
    from eval import fid

    # warm-up at this batch shape: TorchScript's profiling executor specialises on the first calls
    for _ in range(2):
        fid.features(extractor, imgs[:batch], cfg.fid_protocol)
    t0 = time.perf_counter()
    for s in range(0, len(imgs), batch):
        fid.features(extractor, imgs[s:s + batch], cfg.fid_protocol)
    return len(imgs) / (time.perf_counter() - t0)


def gen_rate(gen, rows, batch: int) -> float:
    from eval.generate import runs

    gen.generate(rows[:1])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(rows), batch):
        for group in runs(rows[s:s + batch]):
            gen.generate(group)
    return len(rows) / (time.perf_counter() - t0)


def main() -> None:
    from eval.config import EvalConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inception", default="models/fid/default_1.pt", help="TorchScript FID Inception file")
    ap.add_argument("--n", type=int, default=64, help="images for feature extraction")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--protocol", default="pytorch-fid", help="FID preprocessing protocol (eval.fid.PROTOCOLS)")
    ap.add_argument("--gen-n", type=int, default=8, help="images to generate per setting")
    ap.add_argument("--gen-batch", type=int, default=4)
    ap.add_argument("--tiny", default="models/tiny", help="tiny models folder")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}", flush=True)

    from eval import fid

    if Path(args.inception).exists():
        cfg = EvalConfig(fid_extractor="torchscript", fid_weights=args.inception, fid_protocol=args.protocol)
    else:
        print(f"(no {args.inception}: tiny extractor at 299 px)", flush=True)
        cfg = EvalConfig(fid_extractor="tiny", fid_protocol=args.protocol)
    extractor = fid.make_extractor(cfg)
    imgs = images(args.n)
    base = extract_rate(cfg, extractor, imgs[: max(8, args.n // 4)], 1)
    fast = extract_rate(cfg, extractor, imgs, args.batch)
    print(f"feature extraction [{cfg.fid_extractor}, protocol {cfg.fid_protocol}, 512x384 inputs]: batch {args.batch} "
          f"{fast:.2f} img/s vs batch 1 {base:.2f} img/s -> ratio {fast / base:.2f}x", flush=True)

    from eval.generate import Generator
    from _sigma.buckets import table

    tiny = Path(args.tiny)
    gen = Generator(checkpoint=str(tiny / "dit"), t5=str(tiny / "t5"), vae=str(tiny / "vae"), out_dir="/tmp",
                    sampler="dpm", steps=20, cfg_scale=4.5, max_length=300, scale_factor=0.13025)
    h, w = table(256)["1.0"]
    rows = [{"key": f"k{i}", "prompt": f"a photo of a red house number {i} near a lake", "seed": i,
             "height": h, "width": w} for i in range(args.gen_n)]
    g1 = gen_rate(gen, rows, 1)
    gb = gen_rate(gen, rows, args.gen_batch)
    print(f"generation [tiny DiT + T5 + VAE, DPM-Solver++ 20 steps, cfg 4.5, {h}x{w}]: batch {args.gen_batch} "
          f"{gb:.2f} img/s vs batch 1 {g1:.2f} img/s -> ratio {gb / g1:.2f}x", flush=True)


if __name__ == "__main__":
    main()

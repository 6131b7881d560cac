"""Cost of verifying training shards on read (issue 22 item 1):
`python benchmarks/shard_verify_bench.py [--samples 96] [--shards 2] [--dim 4096] [--repeats 5]`.

Shards of realistic 512 px samples (fp16 latent (8, 64, 64), fp16 T5 tokens of D = 4096: long
caption 120-250 valid tokens, short 15-40), written by `_sigma.shards.write_shard` (every member
with its sha256 in its PAX header). Measured in one process, pages warm, the two variants
interleaved and repeated (median):
 (a) sequential: `iter_samples(d)` (every member checked against its sha256 before decoding) vs the
     same reader with verify=False (the plain read: tar parse + np.load + decode);
 (b) training: one epoch of `training.data.ShardBatches` batches (random access, read_member +
     decode + posterior sample + re-pad), verify on vs off;
 (c) for scale: the alternative design (checking every shard whole against index.json's sha256
     before its first use: one more full read) as a ratio of (a)'s plain read.
Prints CPU seconds of this process (user + system, `time.process_time`: what the read costs, and
robust to other jobs on a shared machine, unlike wall time) and the ratio verified / plain.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from _sigma import shards  # noqa: E402


def write(d: str, n: int, n_shards: int, dim: int, seed: int = 0) -> int:
    """n samples over n_shards shards + index.json in d; returns the bytes written."""
    rng = np.random.default_rng(seed)
    per = -(-n // n_shards)
    sides = []
    for s in range(n_shards):
        samples = []
        for i in range(s * per, min(n, (s + 1) * per)):
            key = f"{s:05d}_{i:06d}"
            nl, ns = int(rng.integers(120, 250)), int(rng.integers(15, 40))
            lat = np.concatenate([rng.normal(size=(4, 64, 64)), rng.uniform(0.01, 0.1, (4, 64, 64))]).astype(np.float16)
            meta = {"key": key, "bucket": "1.0", "height": 512, "width": 512, "n_long": nl, "n_short": ns,
                    "caption_long": "a long caption " * 20, "caption_short": "a short one"}
            samples.append({"key": key, "meta": meta, "latent": shards.npy_bytes(lat),
                            "t5_long": shards.encode_tokens(rng.normal(size=(nl, dim)).astype(np.float16)),
                            "t5_short": shards.encode_tokens(rng.normal(size=(ns, dim)).astype(np.float16))})
        sides.append(shards.write_shard(os.path.join(d, shards.shard_name(s, 0)), samples, {}))
    shards.write_index(d, shards.build_index(512, sides, {"name": "bench", "scale_factor": 0.13025,
                                                           "latent_channels": 4},
                                             {"name": "bench", "max_length": 300, "dim": dim}))
    return sum(s["bytes"] for s in sides)


def sequential(d: str, verify: bool) -> float:
    t = time.process_time()
    n = sum(1 for _ in shards.iter_samples(d, verify=verify))
    assert n > 0
    return time.process_time() - t


def training_epoch(d: str, verify: bool) -> float:
    from training.data import ShardBatches

    t = time.process_time()
    b = ShardBatches(d, batch_size=8, long_ratio=0.6, caption_dropout=0.1, verify=verify)
    for _ in range(len(b.epoch_order(0))):
        next(b)
    b.close()
    return time.process_time() - t


def whole(d: str) -> float:
    t = time.process_time()
    for e in shards.read_index(d)["shards"]:
        assert shards.file_sha256(os.path.join(d, e["name"])) == e["sha256"]
    return time.process_time() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="shard-verify-") as d:
        nbytes = write(d, args.samples, args.shards, args.dim)
        print(f"{args.samples} samples (512 px, D={args.dim}) in {args.shards} shards: {nbytes / 2**20:.1f} MiB")
        sequential(d, False), training_epoch(d, False)  # warm the page cache and imports
        res: dict[str, list[float]] = {k: [] for k in ("seq_plain", "seq_verified", "train_plain", "train_verified",
                                                       "whole")}
        for _ in range(args.repeats):  # interleaved: a load change hits both variants alike
            res["seq_plain"].append(sequential(d, False))
            res["seq_verified"].append(sequential(d, True))
            res["train_plain"].append(training_epoch(d, False))
            res["train_verified"].append(training_epoch(d, True))
            res["whole"].append(whole(d))
        med = {k: statistics.median(v) for k, v in res.items()}
        mb = nbytes / 2**20
        print("CPU seconds (median of the repeats):")
        print(f"(a) sequential iter_samples: plain {med['seq_plain']:.3f} s ({mb / med['seq_plain']:.0f} MiB/s), "
              f"verified {med['seq_verified']:.3f} s: ratio {med['seq_verified'] / med['seq_plain']:.3f}")
        print(f"(b) training epoch (ShardBatches, batch 8): plain {med['train_plain']:.3f} s, verified "
              f"{med['train_verified']:.3f} s: ratio {med['train_verified'] / med['train_plain']:.3f}")
        print(f"(c) whole-shard sha256 before use (the alternative): {med['whole']:.3f} s = "
              f"{med['whole'] / med['seq_plain']:.3f} of a plain sequential read, "
              f"{med['whole'] / med['train_plain']:.3f} of a plain training epoch")


if __name__ == "__main__":
    main()

"""FID interval cost: one half-sample resample with eval.fid.fid_lowrank (the (n1, n2) SVD form of
tr sqrt(S1 S2)) vs eval.fid.fid_of (the (D, D) scipy sqrtm, as pytorch-fid), on 2048-d
Inception-shaped features with fewer images than dimensions (the regime of intervals on small
benchmarks, strata and the demo), measured in the same process. Also prints how far the old
with-replacement bootstrap sits above its own estimate there (the bias the half-samples avoid).

    OMP_NUM_THREADS=1 python benchmarks/fid_ci_bench.py [--n 500] [--reps 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from eval import metrics
from eval.fid import fid_lowrank, fid_of


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500, help="images per side")
    ap.add_argument("--reps", type=int, default=3, help="resamples timed per method")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 2048)) / 8

    def feats(shift):
        return np.maximum((rng.normal(size=(args.n, 64)) + shift) @ w + 0.3 * rng.normal(size=(args.n, 2048)) + 0.2, 0)

    ref, gen = feats(0.0), feats(0.1)
    idx = list(metrics.half_samples(args.n, args.reps, seed=1))
    t0 = time.perf_counter()
    slow = [fid_of(ref[i], gen[i]) for i in idx]
    t_slow = (time.perf_counter() - t0) / args.reps
    t0 = time.perf_counter()
    fast = [fid_lowrank(ref[i], gen[i]) for i in idx]
    t_fast = (time.perf_counter() - t0) / args.reps
    rel = max(abs(a - b) / abs(a) for a, b in zip(slow, fast))
    point = fid_lowrank(ref, gen)
    old = metrics.percentile_ci([fid_lowrank(ref[i], gen[i]) for i in metrics.bootstrap(args.n, 20, seed=2)], 0.95)
    new = metrics.subsample_ci(lambda i: fid_lowrank(ref[i], gen[i]), args.n, point, 20, 0.95, seed=3)
    print(f"n={args.n} per side, D=2048, half-samples of {args.n // 2}: fid_of (sqrtm) {t_slow:.2f} s, "
          f"fid_lowrank {t_fast:.3f} s per resample -> {t_slow / t_fast:.0f}x faster, max rel diff {rel:.1e}")
    print(f"FID {point:.2f}: with-replacement bootstrap 95 % [{old[0]:.2f}, {old[1]:.2f}] (20 resamples), "
          f"half-sampling [{new[0]:.2f}, {new[1]:.2f}] (20 resamples)")


if __name__ == "__main__":
    main()

"""More than one number: KID, confidence intervals, per-stratum tables.

All functions work on per-prompt arrays aligned by benchmark key: reference features (N, D),
generated features (N, D), CLIP-Scores (N,), reward scores (N,), so that every resampling keeps
each prompt's reference image and generated image together (the prompt set is the sampling unit).

- KID (Binkowski et al.; the formula and subset scheme of clean-fid's `kernel_distance`): the
  unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over
  `subsets` random subsets of m = min(N_ref, N_gen, subset_size) images per side drawn without
  replacement. With more images than subset_size: the mean, the std over subsets and the SE of the
  mean (std / sqrt(subsets); subsets overlap, so it is a lower bound). With N <= subset_size every
  subset is the whole set (std 0, no information): the SE then comes from half-samples (below);
  with fewer than 4 images a side it is reported as not available, with the reason.
- Set statistics (FID, CMMD): half-sampling, no duplicates. Resampling prompts WITH replacement
  duplicates images, which inflates FID (a duplicated image shrinks the covariance rank and
  shifts the means), so a percentile bootstrap can lie entirely above its own estimate
  (2048-d features, hundreds of images). Instead: `b` subsets of m = N // 2 distinct prompts
  (seeded), the statistic T_m on each; the spread of T_m around its median, scaled by
  sqrt(m / (N - m)) (the delete-d jackknife factor, d = N - m: it turns the variance of a
  size-m subsample of N into that of the full-size estimate; 1 at m = N / 2), is put around the
  point estimate T_N:  [T_N + s q_lo, T_N + s q_hi], q = quantiles of T_m - median(T_m). Centring
  on the median removes the bias difference between n / 2 and n (FID is biased upwards at small
  n) and makes q_lo <= 0 <= q_hi, so the interval always contains T_N; the lower end is clipped
  at 0 (both are squared distances).
- Means (CLIP-Score, rewards): percentile bootstrap over `b` prompt resamples with replacement
  (a mean is not biased by duplicates).
- Strata: aspect bucket x prompt-length bin (and the category of MJHQ-30K): per stratum n,
  CLIP-Score, rewards and FID over that stratum's prompts. FID is biased upwards at small n: only
  compare the same stratum across runs (equal n), never strata with each other.
"""
from __future__ import annotations

import numpy as np

from eval.fid import fid_lowrank, fid_of

CI_METHODS = {
    "fid": "half-sampling without duplicates (m = N/2, delete-d jackknife scale, median-centred)",
    "cmmd": "half-sampling without duplicates (m = N/2, delete-d jackknife scale, median-centred)",
    "mean": "percentile bootstrap over prompt resamples",
}


def _kid_value(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel between x (m, D) and y (m, D)."""
    m, d = len(x), x.shape[1]
    a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
    b = (x @ y.T / d + 1) ** 3
    return float(((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m)


def kid(ref: np.ndarray, gen: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> dict | None:
    """{kid, kid_std, kid_se, se_method, subsets, subset_size} or None with fewer than 2 images a side."""
    ref, gen = np.asarray(ref, np.float64), np.asarray(gen, np.float64)
    m = min(len(ref), len(gen), subset_size)
    if m < 2:
        return None
    rng = np.random.RandomState(seed)  # the same draw order as clean-fid under np.random.seed(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        x = gen[rng.choice(len(gen), m, replace=False)]
        y = ref[rng.choice(len(ref), m, replace=False)]
        vals[i] = _kid_value(x, y)
    out = {"kid": float(vals.mean()), "subsets": subsets, "subset_size": m}
    if len(ref) > m and len(gen) > m and subsets >= 2:  # subsets differ: their spread is informative
        std = float(vals.std())
        return dict(out, kid_std=std, kid_se=std / np.sqrt(subsets),
                    se_method=f"std over {subsets} subsets of {m} / sqrt(subsets) (overlapping subsets: a lower bound)")
    # Every subset is the whole smaller set: std 0 says nothing. Half-samples of the paired sets.
    n = min(len(ref), len(gen))
    h = n // 2
    if h < 2 or subsets < 2:
        return dict(out, kid_std=None, kid_se=None,
                    se_method=f"not available: {n} images a side (half-samples need >= 4) or {subsets} subset(s)")
    rng_h = np.random.default_rng(seed)
    half = np.array([_kid_value(gen[rng_h.choice(len(gen), h, replace=False)],
                                ref[rng_h.choice(len(ref), h, replace=False)]) for _ in range(subsets)])
    std = float(half.std(ddof=1))
    return dict(out, kid_std=std, kid_se=std * float(np.sqrt(h / (n - h))),
                se_method=f"N <= subset_size: every subset is the whole set; SE from {subsets} half-samples of {h} "
                          f"without replacement, scaled by sqrt(m / (N - m)) (delete-d jackknife)")


def percentile_ci(samples: np.ndarray, ci: float) -> list[float] | None:
    s = np.asarray([v for v in samples if v is not None and np.isfinite(v)], np.float64)
    if len(s) < 2:
        return None
    a = (1 - ci) / 2
    return [float(np.quantile(s, a)), float(np.quantile(s, 1 - a))]


def bootstrap(n: int, b: int, seed: int = 0):
    """b index resamples (n,) of range(n), with replacement, from a seeded generator."""
    rng = np.random.default_rng(seed)
    for _ in range(b):
        yield rng.integers(0, n, size=n)


def half_samples(n: int, b: int, seed: int = 0):
    """b index subsets (n // 2,) of range(n), without replacement (no duplicates), seeded."""
    rng = np.random.default_rng(seed)
    for _ in range(b):
        yield rng.choice(n, n // 2, replace=False)


def subsample_ci(stat, n: int, point: float | None, b: int, ci: float, seed: int = 0,
                 floor: float | None = 0.0) -> list[float] | None:
    """Half-sampling interval of a set statistic `stat(idx) -> float | None` around `point` (see the
    module docstring); None when it cannot be formed (n < 4, no point, < 2 finite subsample values)."""
    m = n // 2
    if point is None or not np.isfinite(point) or m < 2 or n - m < 1 or b < 2:
        return None
    vals = np.asarray([v for v in (stat(idx) for idx in half_samples(n, b, seed)) if v is not None and np.isfinite(v)])
    if len(vals) < 2:
        return None
    c = vals - np.median(vals)
    a = (1 - ci) / 2
    s = float(np.sqrt(m / (n - m)))
    lo, hi = point + s * float(np.quantile(c, a)), point + s * float(np.quantile(c, 1 - a))
    if floor is not None:
        lo = max(lo, floor)
    return [float(min(lo, point)), float(max(hi, point))]


def bootstrap_cis(ref: np.ndarray, gen: np.ndarray, per_prompt: dict[str, np.ndarray], b: int, ci: float,
                  seed: int = 0, ref_emb: np.ndarray | None = None, gen_emb: np.ndarray | None = None,
                  fid_point: float | None = None, cmmd_point: float | None = None) -> dict:
    """{"fid": [lo, hi], "cmmd": [lo, hi], "<name>": [lo, hi] ...}: half-sampling for FID (and CMMD
    when the paired CLIP embeddings are given), percentile bootstrap for the per-prompt means.
    `fid_point` / `cmmd_point`: the reported estimates the intervals are put around (default: computed
    here over the paired prompts; FID with fid_lowrank, equal to fid_of up to float rounding)."""
    from eval.cmmd import mmd

    n = len(gen)
    if b == 0 or n < 2:
        return {}
    point = fid_point if fid_point is not None else fid_lowrank(ref, gen)
    out = {"fid": subsample_ci(lambda i: fid_lowrank(ref[i], gen[i]), n, point, b, ci, seed)}
    if ref_emb is not None and gen_emb is not None and len(ref_emb) == n and len(gen_emb) == n:
        cpoint = cmmd_point if cmmd_point is not None else mmd(ref_emb, gen_emb)
        out["cmmd"] = subsample_ci(lambda i: mmd(ref_emb[i], gen_emb[i]), n, cpoint, b, ci, seed + 1)
    means = {k: [] for k in per_prompt}
    for idx in bootstrap(n, b, seed):
        for k, v in per_prompt.items():
            means[k].append(float(np.mean(v[idx])))
    out.update({k: percentile_ci(np.array(v), ci) for k, v in means.items()})
    return out


def strata(rows: list[dict], ref: np.ndarray, gen: np.ndarray, per_prompt: dict[str, np.ndarray],
           column: str | tuple[str, ...]) -> list[dict]:
    """One dict per stratum (rows aligned with ref/gen/per_prompt): n, FID, mean of each score."""
    cols = (column,) if isinstance(column, str) else tuple(column)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(tuple(r.get(c) for c in cols), []).append(i)

    def order(k):  # numeric values (bucket ratios, bins) numerically, then the rest as text
        return tuple((0, float(v), "") if isinstance(v, (int, float)) or _numeric(v) else (1, 0.0, str(v)) for v in k)

    out = []
    for key in sorted(groups, key=order):
        idx = np.array(groups[key])
        entry = {c: v for c, v in zip(cols, key)}
        entry.update(n=len(idx), fid=fid_of(ref[idx], gen[idx]))
        entry.update({k: float(np.mean(v[idx])) for k, v in per_prompt.items()})
        out.append(entry)
    return out


def _numeric(v) -> bool:
    try:
        float(v)
        return v is not None
    except (TypeError, ValueError):
        return False

"""More than one number: KID, bootstrap confidence intervals, per-stratum tables.

All functions work on per-prompt arrays aligned by benchmark key: reference features (N, D),
generated features (N, D), CLIP-Scores (N,), reward scores (N,), so that every resampling keeps
each prompt's reference image and generated image together.

- KID (Binkowski et al.; the formula and subset scheme of clean-fid's `kernel_distance`): the
  unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over
  `subsets` random subsets of m = min(N_ref, N_gen, subset_size) images per side drawn without
  replacement. Reported: the mean, the std over subsets (torchmetrics' "kid_std") and the
  standard error of the mean (std / sqrt(subsets); subsets overlap, so it is optimistic).
- Bootstrap CIs: `B` resamples of the prompt set with replacement (seeded), the statistic on
  each, percentile interval at level `ci`. FID on a resample uses the same prompts on both sides
  (the prompt set is the sampling unit). Costs B FID evaluations (2 covariances + one sqrtm each).
- Strata: aspect bucket x prompt-length bin (and the category of MJHQ-30K): per stratum n,
  CLIP-Score, rewards and FID over that stratum's prompts. FID is biased upwards at small n: only
  compare the same stratum across runs (equal n), never strata with each other.
"""
from __future__ import annotations

import numpy as np

from eval.fid import fid_of


def kid(ref: np.ndarray, gen: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> dict | None:
    """{kid, kid_std, kid_se, subsets, subset_size} or None with fewer than 2 images a side."""
    ref, gen = np.asarray(ref, np.float64), np.asarray(gen, np.float64)
    m = min(len(ref), len(gen), subset_size)
    if m < 2:
        return None
    d = ref.shape[1]
    rng = np.random.RandomState(seed)  # the same draw order as clean-fid under np.random.seed(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        x = gen[rng.choice(len(gen), m, replace=False)]
        y = ref[rng.choice(len(ref), m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        vals[i] = ((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m
    std = float(vals.std())
    return {"kid": float(vals.mean()), "kid_std": std, "kid_se": std / np.sqrt(subsets), "subsets": subsets,
            "subset_size": m}


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


def bootstrap_cis(ref: np.ndarray, gen: np.ndarray, per_prompt: dict[str, np.ndarray], b: int, ci: float,
                  seed: int = 0) -> dict:
    """{"fid": [lo, hi], "<name>": [lo, hi] ...} over b prompt resamples (means for per_prompt)."""
    if b == 0 or len(gen) < 2:
        return {}
    fids, means = [], {k: [] for k in per_prompt}
    for idx in bootstrap(len(gen), b, seed):
        fids.append(fid_of(ref[idx], gen[idx]))
        for k, v in per_prompt.items():
            means[k].append(float(np.mean(v[idx])))
    out = {"fid": percentile_ci(np.array(fids, dtype=object), ci)}
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

"""KID against clean-fid's own kernel_distance, bootstrap intervals, per-stratum tables."""
from __future__ import annotations

import numpy as np
import pytest

from eval import fid, metrics


def test_kid_equals_clean_fid_on_the_same_subsets():
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 16))
    gen = rng.normal(0.3, 1.1, size=(250, 16))
    np.random.seed(11)  # clean-fid draws its subsets from numpy's global generator
    theirs = kernel_distance(ref, gen, num_subsets=20, max_subset_size=100)
    ours = metrics.kid(ref, gen, subsets=20, subset_size=100, seed=11)
    assert ours["kid"] == pytest.approx(theirs, rel=1e-10)
    assert ours["subset_size"] == 100 and ours["kid_std"] > 0
    assert ours["kid_se"] == pytest.approx(ours["kid_std"] / np.sqrt(20))
    same = metrics.kid(ref, rng.normal(size=(250, 16)), subsets=20, subset_size=100)
    assert abs(same["kid"]) < 3 * same["kid_std"] < ours["kid"]  # unbiased: ~0 for one distribution
    assert metrics.kid(ref[:1], gen) is None


def test_bootstrap_interval_covers_the_truth():
    """Means of samples from N(0, 1): the 90 % percentile interval covers 0 in about 90 % of trials."""
    rng = np.random.default_rng(1)
    hits = 0
    for t in range(60):
        x = rng.normal(size=80)
        ci = metrics.bootstrap_cis(np.zeros((80, 1)), np.zeros((80, 1)), {"m": x}, b=200, ci=0.9, seed=t)["m"]
        hits += ci[0] <= 0 <= ci[1]
    assert 45 <= hits <= 60


def _inception_like(rng, n: int, shift: float, w: np.ndarray) -> np.ndarray:
    """(n, 2048) features shaped like Inception pool3: non-negative (ReLU), low-rank correlated, ~0.3 mean."""
    z = rng.normal(size=(n, w.shape[0])) + shift
    return np.maximum(z @ w + 0.3 * rng.normal(size=(n, w.shape[1])) + 0.2, 0.0)


def test_fid_interval_contains_its_estimate_on_inception_shaped_data():
    """2048-d, a few hundred images: resampling WITH replacement inflates FID so much that its
    percentile interval lies above the estimate (the reported defect: 0.85 vs [1.38, 1.68]); the
    half-sampling interval contains it, for close and for distant sets."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(64, 2048)) / 8
    ref = _inception_like(rng, 240, 0.0, w)
    for shift in (0.1, 0.0, 0.5):
        gen = _inception_like(rng, 240, shift, w)
        point = fid.fid_lowrank(ref, gen)  # = fid_of (test below); a 2048-d sqrtm costs ~20 s here
        old = metrics.percentile_ci([fid.fid_lowrank(ref[i], gen[i]) for i in metrics.bootstrap(240, 20, seed=0)], 0.95)
        assert old[0] > point  # the defect shows at this dimension
        ci = metrics.bootstrap_cis(ref, gen, {}, b=40, ci=0.95, seed=3, fid_point=point)["fid"]
        assert ci[0] <= point <= ci[1] and ci[0] >= 0 and ci[1] - ci[0] > 0
    assert metrics.bootstrap_cis(ref, gen, {}, b=0, ci=0.95) == {}


def test_lowrank_fid_equals_the_sqrtm_fid():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(32, 384)) / 6
    ref = _inception_like(rng, 150, 0.0, w)
    for shift in (0.0, 0.3):
        gen = _inception_like(rng, 120, shift, w)
        assert fid.fid_lowrank(ref, gen) == pytest.approx(fid.fid_of(ref, gen), rel=1e-6)
    assert fid.fid_lowrank(ref[:, :8], gen[:, :8]) == fid.fid_of(ref[:, :8], gen[:, :8])  # n >= D: the same code


def test_half_sampling_spread_matches_the_sampling_spread():
    """The interval's width estimates the spread of the full-size estimate: compare its implied SD
    with the SD of the statistic over independent draws of the whole data set (a plain recount)."""
    rng = np.random.default_rng(4)
    draws = lambda: (rng.normal(size=(200, 8)), rng.normal(0.4, 1.0, size=(200, 8)))  # noqa: E731
    truth = np.std([fid.fid_of(*draws()) for _ in range(150)])
    widths = []
    for t in range(20):
        ref, gen = draws()
        lo, hi = metrics.bootstrap_cis(ref, gen, {}, b=100, ci=0.95, seed=t)["fid"]
        widths.append((hi - lo) / (2 * 1.96))
    assert 0.6 * truth < np.median(widths) < 1.6 * truth


def test_kid_se_when_every_subset_is_the_whole_set():
    """n <= subset_size: clean-fid's subsets are all the whole set (std 0); the SE comes from half
    samples and agrees with the spread of KID over independent draws."""
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(5)
    draws = lambda: (rng.normal(size=(120, 32)), rng.normal(0.3, 1.0, size=(120, 32)))  # noqa: E731
    ref, gen = draws()
    np.random.seed(0)
    theirs = kernel_distance(ref, gen, num_subsets=10, max_subset_size=1000)
    k = metrics.kid(ref, gen, subsets=30, subset_size=1000, seed=0)
    assert k["kid"] == pytest.approx(theirs, rel=1e-10)  # the value is clean-fid's
    assert k["kid_se"] > 0 and "half-samples" in k["se_method"]
    truth = np.std([metrics.kid(*draws(), subsets=1, subset_size=1000)["kid"] for _ in range(80)])
    ses = [metrics.kid(*draws(), subsets=30, subset_size=1000, seed=t)["kid_se"] for t in range(10)]
    assert 0.5 * truth < np.median(ses) < 2.0 * truth
    tiny = metrics.kid(ref[:3], gen[:3], subsets=10)
    assert tiny["kid_se"] is None and tiny["se_method"].startswith("not available")


def test_strata_split_by_bucket_and_length():
    rng = np.random.default_rng(3)
    rows = [{"bucket": b, "length_bin": lb} for b in ("0.5", "1.0", "2.0") for lb in (0, 1) for _ in range(10)]
    ref = rng.normal(size=(60, 3))
    gen = ref + rng.normal(0, 0.1, size=(60, 3))
    cs = np.arange(60, dtype=float)
    table = metrics.strata(rows, ref, gen, {"clip_score": cs}, ("bucket", "length_bin"))
    assert [(t["bucket"], t["length_bin"]) for t in table] == [(b, lb) for b in ("0.5", "1.0", "2.0") for lb in (0, 1)]
    for j, t in enumerate(table):
        idx = np.arange(10 * j, 10 * j + 10)
        assert t["n"] == 10 and t["clip_score"] == pytest.approx(cs[idx].mean())
        assert t["fid"] == pytest.approx(fid.fid_of(ref[idx], gen[idx]))

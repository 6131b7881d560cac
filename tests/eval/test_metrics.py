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


def test_fid_ci_brackets_the_point_estimate():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(200, 4))
    gen = rng.normal(0.5, 1.0, size=(200, 4))
    cis = metrics.bootstrap_cis(ref, gen, {}, b=100, ci=0.95)
    point = fid.fid_of(ref, gen)
    assert cis["fid"][0] < point < cis["fid"][1]
    assert metrics.bootstrap_cis(ref, gen, {}, b=0, ci=0.95) == {}


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

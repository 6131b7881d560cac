"""The browser's what-if at the run's own settings reproduces the run's `selected` column exactly
(issue 22 item 11): it calls select's resolution (curation.dedup.resolve), so byte copies collapse
before the greedy pass and a copy chain keeps one row, as select does. Here on a synthetic scored run
with planted copy chains (dedup + select really run); tests/curation/test_run.py checks the demo."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
from scored_data import synthetic, write_scored

from _sigma import manifest
from _sigma.config import save_resolved
from curation.browse import whatif
from curation.browse.store import Run
from curation.config import PipelineConfig, SelectConfig
from curation.dedup import run_dedup
from curation.select import run_select


def plant_chains(d: dict, n_groups: int, seed: int = 3) -> list[list[int]]:
    """Groups of three byte copies (sha, embedding, size) whose LOWEST row scores the lowest
    aesthetic: dedup stores star edges from the lowest key, so following direct pairs alone keeps
    the two others."""
    rng = np.random.default_rng(seed)
    ok = np.flatnonzero(d["status"] == "ok")
    taken = {i for p in d["near"] + d["exact"] for i in p}
    free = [int(i) for i in rng.permutation(ok) if int(i) not in taken]
    groups = [sorted(free[3 * g:3 * g + 3]) for g in range(n_groups)]
    for a, b, c in groups:
        for x in (a, b, c):
            d["emb"][x], d["sha"][x] = d["emb"][a], d["sha"][a]
            d["width"][x], d["height"][x] = 2000, 1500
        # the same bytes scored differently (batch-dependent float sums, issue 22 item 10)
        d["aesthetic"][a], d["aesthetic"][b], d["aesthetic"][c] = 5.6, 6.0, 6.5
    return groups


def _reasons(out) -> dict:
    m = manifest.read_manifest(out, ["reject_reason"]).column("reject_reason").to_pylist()
    c: dict = {}
    for r in m:
        for x in (r or "").split(";"):
            if x:
                c[x] = c.get(x, 0) + 1
    return c


@pytest.mark.parametrize("keep", ["best", "first"])
def test_whatif_at_the_run_settings_is_the_run_selection_with_copy_chains(tmp_path, ray_local, keep):
    d = synthetic(600, d=32, seed=11, n_near=40, n_exact=15, n_bad=15)
    groups = plant_chains(d, 12)
    out = str(tmp_path / "out")
    keys = write_scored(out, d, 200)
    cfg = PipelineConfig(name="t", output=out, select=SelectConfig(
        min_side=1200, aesthetic_min=5.5, dedup_threshold=0.94, dedup_keep=keep))
    run_dedup(cfg, out, progress=False)
    res = run_select(cfg, out, progress=False)
    save_resolved(cfg, out)
    t = manifest.read_manifest(out, ["key", "selected"])
    sel = dict(zip(t.column("key").to_pylist(), t.column("selected").to_pylist()))
    chain_kept = [sum(sel[keys[i]] for i in g) for g in groups]
    assert max(chain_kept) == 1 and sum(chain_kept) >= 4  # one of a chain, unless all are near another row
    w = whatif.whatif(Run(out), {})  # untouched: the run's own settings
    assert (w["would"], w["gained"], w["lost"]) == (res["selected"], 0, 0)  # the same rows, not just as many
    assert w["dedup"]["keep"] == keep
    got = {r["reason"]: r["n"] for r in w["reasons"]}
    assert got.get("duplicate", 0) == _reasons(out).get("duplicate", 0) > 0


def test_whatif_moves_with_the_threshold_as_select_does(tmp_path, ray_local):
    """A higher threshold in the what-if equals select rerun at that threshold."""
    d = synthetic(400, d=32, seed=12, n_near=40, n_exact=10, n_bad=10)
    plant_chains(d, 8)
    out = str(tmp_path / "out")
    write_scored(out, d, 200)
    cfg = PipelineConfig(name="t", output=out, select=SelectConfig(min_side=0, dedup_threshold=0.93))
    run_dedup(cfg, out, progress=False)
    run_select(cfg, out, progress=False)
    save_resolved(cfg, out)
    run = Run(out)
    w = whatif.whatif(run, {"dedup_threshold": "0.97"})
    res = run_select(PipelineConfig(name="t", output=out, select=SelectConfig(min_side=0, dedup_threshold=0.97)), out,
                     progress=False)
    sel = manifest.read_manifest(out, ["selected"]).column("selected")
    assert w["would"] == res["selected"] == int(pc.sum(sel).as_py()) and w["would"] > 0

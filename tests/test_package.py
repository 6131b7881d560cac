"""`pip install .` (not editable) runs `make demo`'s pipeline with no file of the repo.

Builds the wheel from a copy of the packages + pyproject.toml, installs it with --no-deps into a
fresh venv, and runs its `sigma-demo` console script (curation download .. stats, the three
weak-to-strong training stages, sampling, eval) from a folder outside the repo with PYTHONPATH
unset. The dependencies come from this test's own venv: the new venv gets a
.pth line naming that site-packages folder (a plain path line: the editable install's finder .pth
inside it is not run, so no module resolves to a checkout). `python -m venv --system-site-packages`
would not do: a venv's "system" is the base interpreter, not the venv it was created from.
What the job reads from outside the wheel is user data: pipelines.yaml and the tiny models.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("_sigma", "curation", "captioning", "features", "training", "eval")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd}: rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv bin) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    for p in PACKAGES:
        shutil.copytree(REPO / p, src / p, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "whl"),
          str(src)])
    (wheel,) = (tmp / "whl").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == set(PACKAGES)  # no generic name (common, tests, benchmarks) in site-packages
    for data in ("curation/sql/views.sql", "curation/sql/table1.sql", "captioning/sql/caption_coverage.sql",
                 "captioning/scripts/make_vllm_venv.sh", "curation/browse/static/index.html"):
        assert data in names, data

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "sigma-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)])
    return py, venv / "bin"


def _env(bin_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # the venv's console scripts first; then this venv's (ray, duckdb) for tools the stages call
    env["PATH"] = f"{bin_dir}:{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_pipeline_outside_the_repo(installed, tmp_path, tiny_models):
    py, bin_dir = installed
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    shutil.copy(REPO / "pipelines.yaml", work)  # the user's config; model paths in it are models/tiny/...
    (work / "models" / "tiny").symlink_to(tiny_models)
    env = _env(bin_dir)

    where = _run([str(py), "-c", "import _sigma, curation, eval, features, training, captioning as m\n"
                  "import importlib.util as u\n"
                  "print(*(x.__file__ for x in (_sigma, curation, eval, features, training, m)))\n"
                  "print(u.find_spec('common'))"], cwd=work, env=env).stdout.split("\n")
    assert all(f.startswith(str(py.parent.parent)) for f in where[0].split()), where[0]  # the venv's copy
    assert where[1] == "None"  # the old generic name is gone
    _run([str(bin_dir / "sigma-curate"), "--help"], cwd=work, env=env)

    _run([str(bin_dir / "sigma-demo")], cwd=work, env=env, timeout=1200)  # what `make demo` runs

    out = work / "runs" / "demo"
    urls = pq.read_table(work / "runs" / "demo-data" / "urls.parquet")
    manifest = pq.ParquetDataset(sorted(str(p) for p in (out / "manifest").glob("part-*.parquet"))).read()
    assert manifest.num_rows == urls.num_rows  # every URL row has its manifest row
    sel = manifest.filter(manifest["selected"]).num_rows
    held = pq.read_table(next((out / "eval" / "benchmarks").glob("*/exclude.parquet"))).column("key").to_pylist()
    index = json.loads((out / "shards" / "256" / "index.json").read_text())
    samples = sum(s["samples"] for s in index["shards"])
    assert 0 < samples <= sel - len(set(held) & set(manifest.filter(manifest["selected"])["key"].to_pylist()))
    table1 = (out / "report" / "table1.md").read_text()  # the stats SQL shipped as package data ran
    assert "| ours | all |" in table1 and (out / "report" / "stats_setup.sql").is_file()
    # the training stages and eval ran from the installed code too
    for stage in ("demo-256", "demo-512", "demo-512-kv"):
        assert list((out / "train" / stage / "checkpoints").iterdir()), stage
    assert "demo-512-kv" in (out / "eval" / "report.md").read_text()

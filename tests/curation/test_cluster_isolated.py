"""Two nodes that share nothing but the S3 server: the worker node runs in its own mount namespace
(`unshare --mount`, as root) in which the repository checkout (with models/), the head's Ray temp
folder, this test session's temp folders and ~/.cache are hidden under empty tmpfs mounts; only the
Python environment is mounted back at its path. The job is submitted with `--working-dir` (a copy
of the code and pipelines.yaml), its URL list, models (sigma-upload-models) and output are on
`s3://`; the S3 endpoint and credentials reach both nodes through the environment of `ray start`.

Checks that every part stage ran tasks on the worker node too, and that the result equals a
single-node run on local disk with the local models (test_cluster._result)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from _sigma import fs
from curation import demo_data as dd
from curation import run as run_mod
from curation import upload_models
from raycluster import Cluster, cluster_env
from test_cluster import PART_STAGES, _args, _result

REPO = Path(__file__).resolve().parents[2]
CODE = ("_sigma", "curation", "captioning", "features", "training", "eval", "pipelines.yaml", "pyproject.toml")

# Runs as root inside `unshare --mount`: $1 the venv, $2 a mount point for it outside what is hidden,
# then the folders to hide, `--`, and the `ray start` command.
_ISOLATE = r"""
set -e
venv=$1; keep=$2; shift 2
mount --make-rprivate /
mount --bind "$venv" "$keep"
while [ "$1" != "--" ]; do mount -t tmpfs tmpfs "$1"; shift; done
shift
mkdir -p "$venv"
mount --bind "$keep" "$venv"
if [ -e "$REPO_CHECK/pipelines.yaml" ] || [ -e "$REPO_CHECK/models" ]; then echo "checkout still visible" >&2; exit 3; fi
exec "$@"
"""


class IsolatedCluster(Cluster):
    """Cluster whose worker nodes see none of `hide` (each replaced by an empty tmpfs)."""

    def __init__(self, env: dict, hide: list[str], venv: Path, **kw):
        super().__init__(env, **kw)
        self.hide, self.venv = hide, venv

    def _start(self, args: list[str], resources: str) -> None:
        if "--head" in args:
            return super()._start(args, resources)
        keep = Path("/tmp") / f"rc{self.port}venv"
        keep.mkdir(exist_ok=True)
        real_run = subprocess.run

        def run_isolated(cmd, **kw):
            head_tmp = str(self.dirs[0])
            wrapped = ["unshare", "--mount", "sh", "-c", _ISOLATE, "sh", str(self.venv), str(keep),
                       *self.hide, head_tmp, "--", *cmd]
            return real_run(wrapped, **kw)

        subprocess.run = run_isolated  # Cluster._start calls subprocess.run(cmd, env=...)
        try:
            super()._start(args, resources)
        finally:
            subprocess.run = real_run


def _code_copy(dst: Path) -> Path:
    """What `git clone` would give a user: the packages and the config (no models/, no runs/)."""
    for name in CODE:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst / name)
    return dst


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare (mount namespaces)")
def test_nodes_share_only_s3(s3_bucket, tmp_path, tmp_path_factory, tiny_models, ray_local, monkeypatch):
    wd = _code_copy(tmp_path / "checkout")
    monkeypatch.chdir(REPO)  # the demo config names models/tiny/... relative to the checkout
    assert upload_models.main(["--config", str(wd / "pipelines.yaml"), "--pipeline", "demo", "--to",
                               f"{s3_bucket}/models", "--write-config", str(wd / "pipelines.s3.yaml")]) == 0
    from _sigma.config import iter_path_fields
    from curation.config import load_pipeline

    fields = dict(iter_path_fields(load_pipeline(str(wd / "pipelines.s3.yaml"), "demo", check=False)))
    assert fields and all(v.startswith(f"{s3_bucket}/models/") for v in fields.values()), fields  # no local model

    items = dd.demo_items(n_synthetic=8, near_duplicates=False)[-8:]
    env = cluster_env()  # AWS_ENDPOINT_URL + credentials of the S3 server: both raylets pass them on
    # node-local model caches: the head's in this test's folder; on the worker the same path is under
    # the hidden (empty tmpfs) temp folders, so it starts empty and fetches from S3 itself
    env["SIGMA_MODEL_CACHE"] = str(tmp_path / "model-cache")
    env["REPO_CHECK"] = str(REPO)
    hide = [str(REPO), str(tmp_path_factory.getbasetemp()), os.path.expanduser("~/.cache")]
    with dd.DemoServer(items) as srv, IsolatedCluster(env, hide, REPO / ".venv", workers=1, cpus=2) as cluster:
        local_urls = tmp_path / "urls.parquet"
        dd.write_url_list(srv, items, local_urls, with_edge_rows=False)
        urls = s3_bucket + "/lists/urls.parquet"
        fs.write_bytes(urls, local_urls.read_bytes())
        out = s3_bucket + "/run"
        sets = {"input.part_size": 4, "caption.generation.max_new_tokens": 8, "stats.workers": 1, "eval.n": 2}
        cmd = ["python", "-m", "curation.run", "--config", "pipelines.s3.yaml", "--pipeline", "demo",
               "--input", urls, "--output", out, "--no-progress"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        r = cluster.submit(wd, cmd)
        log = r.stdout + r.stderr
        assert r.returncode == 0 and "succeeded" in log, log[-6000:]
        local = tmp_path / "local"
        assert run_mod.main(_args(tiny_models, str(local_urls), str(local))) == 0
    resolved = fs.read_text(fs.join(out, "config.resolved.yaml"))
    import re

    where = re.findall(r"(\S*)models/tiny/", resolved)  # every model the job read came from the bucket
    assert where and set(where) == {f"{s3_bucket}/"}, where
    summary = fs.read_json(fs.join(out, "report", "summary.json"))
    nodes = {st["stage"]: set(st["nodes"]) for st in summary["stages"]}
    everywhere = set().union(*nodes.values())
    assert len(everywhere) == 2, nodes  # head and the isolated worker
    for stage in PART_STAGES:
        assert nodes[stage] == everywhere, (stage, nodes)  # each part stage ran tasks on the worker too
    got, want = _result(out), _result(str(local))
    assert len(got["rows"]) == len(items) and got["selected"] and got["captioned"] and got["held_out"]
    assert got == want, json.dumps({"got": str(got)[:2000], "want": str(want)[:2000]})

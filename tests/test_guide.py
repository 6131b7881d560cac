"""docs/guide.md: every `bash` block runs, in order, as written, in a fresh folder holding the
config and the demo models, with the console scripts on PATH, an S3 server standing in for
`s3://my-bucket` and the demo sample served as `urls.parquet`. Blocks preceded by
`<!-- guide-test: skip -->` need GPUs, real weights or a cluster and are only checked to exist."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "guide.md"
SKIP = "<!-- guide-test: skip -->"


def blocks(text: str) -> list[tuple[bool, str]]:
    """(run?, code) of every ```bash block, in order."""
    out = []
    for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
        before = text[:m.start()].rstrip().splitlines()[-1:]
        out.append((not (before and before[0].strip() == SKIP), m.group(1)))
    return out


def _scripts(bin_dir: Path) -> None:
    """The console scripts, as `pip install` would write them (entry points of pyproject.toml)."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    bin_dir.mkdir()
    for name, target in scripts.items():
        mod, fn = target.split(":")
        p = bin_dir / name
        p.write_text(f"#!{sys.executable}\nimport sys\nfrom {mod} import {fn}\n\n"
                     f"if __name__ == '__main__':  # spawned children (img2dataset) import this file again\n"
                     f"    sys.exit({fn}())\n")
        p.chmod(0o755)


def test_guide_has_blocks_and_links():
    text = GUIDE.read_text()
    got = blocks(text)
    assert sum(run for run, _ in got) >= 5 and sum(not run for run, _ in got) >= 2
    assert "docs/guide.md" in "\n".join((REPO / "README.md").read_text().splitlines()[:12])  # first screen


@pytest.mark.slow
def test_guide_commands_run(tmp_path, tiny_models, s3_server):
    import pyarrow.fs as pafs

    from curation import demo_data as dd

    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir("my-bucket")
    work = tmp_path / "work"
    work.mkdir()
    (work / "pipelines.yaml").write_bytes((REPO / "pipelines.yaml").read_bytes())
    (work / "models").symlink_to(tiny_models.parent)
    _scripts(tmp_path / "bin")
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHONPATH=str(REPO), SIGMA_MODEL_CACHE=str(tmp_path / "model-cache"))
    env.pop("RAY_ADDRESS", None)
    items = dd.demo_items(n_synthetic=6, near_duplicates=False)[-6:]
    outputs = []
    with dd.DemoServer(items) as srv:
        dd.write_url_list(srv, items, work / "list.parquet", with_edge_rows=True)
        t = pq.read_table(work / "list.parquet")  # LAION-style: an extra column the run must keep
        pq.write_table(t.append_column("similarity", pa.array([0.3] * t.num_rows, pa.float64())), work / "urls.parquet")
        for run, code in blocks(GUIDE.read_text()):
            if not run:
                continue
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env, capture_output=True,
                               text=True, timeout=1200)
            assert r.returncode == 0, f"guide block failed:\n{code}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
            outputs.append(r.stdout + r.stderr)
    text = "\n".join(outputs)
    n = t.num_rows
    # what a run prints: our bars and summaries; Ray Data's and img2dataset's chatter is in <output>/logs
    for chatter in ("Running Dataset", "logging_progress", "Execution plan", "Downloading starting now", "Sharding file"):
        assert chatter not in text, chatter
    logs = "".join(p.read_text() for p in (work / "runs/mine/logs").iterdir())
    assert "Downloading starting now" in logs and "Dataset" in logs
    assert "=== curation.run summary ===" in text and "--- stage score" in text
    assert re.search(rf"│\s+{n}\s+│", text)  # the list check counted every row
    assert "--set score.clip_pretrained=s3://my-bucket/models/tiny/clip/open_clip_model.safetensors" in text
    from _sigma import manifest

    for run_dir in ("runs/mine", "runs/from-s3"):
        m = manifest.read_manifest(str(work / run_dir), ["key", "status"]).to_pylist()
        assert len(m) == n and sum(r["status"] == "ok" for r in m) >= len(items), run_dir
    extra = manifest.read_manifest(str(work / "runs/mine"), ["similarity"]).column("similarity").to_pylist()
    assert extra == [0.3] * n  # input.extra_cols: LAION's column kept in the manifest
    resolved = (work / "runs/from-s3/config.resolved.yaml").read_text()
    assert "s3://my-bucket/models/tiny/clip/open_clip_model.safetensors" in resolved
    # the two runs scored with the same models, one read from the bucket: the same aesthetic scores
    a = manifest.read_manifest(str(work / "runs/mine"), ["key", "aesthetic"]).to_pylist()
    b = manifest.read_manifest(str(work / "runs/from-s3"), ["key", "aesthetic"]).to_pylist()
    assert sorted(map(tuple, (r.values() for r in a)), key=str) == sorted(map(tuple, (r.values() for r in b)), key=str)

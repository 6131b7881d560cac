"""sigma-upload-models against a real S3 endpoint (moto server): every local model of the demo
pipeline lands in the bucket byte for byte with its sha256 recorded, the printed --set overrides and
the written config point there (and pass check_paths), a second upload sends nothing."""
from __future__ import annotations

import hashlib
from pathlib import Path

from _sigma import fs
from _sigma.config import iter_path_fields
from _sigma.fetch import SUMS_NAME
from curation import upload_models
from curation.config import load_pipeline

REPO = Path(__file__).resolve().parents[2]


def _files(p: Path) -> dict[str, bytes]:
    return {"": p.read_bytes()} if p.is_file() else \
        {q.relative_to(p).as_posix(): q.read_bytes() for q in sorted(p.rglob("*")) if q.is_file()}


def test_upload_demo_models_and_config(s3_bucket, tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    to = f"{s3_bucket}/models"
    cfg_out = tmp_path / "pipelines.s3.yaml"
    assert upload_models.main(["--pipeline", "demo", "--to", to, "--write-config", str(cfg_out)]) == 0
    sets = [ln.split(" ", 1)[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("--set ")]
    local = load_pipeline("pipelines.yaml", "demo", check=False)
    want = {k: v for k, v in iter_path_fields(local) if (REPO / v).exists()}
    assert want and {s.split("=", 1)[0] for s in sets} == set(want)  # every local model, nothing else
    for s in sets:
        key, uri = s.split("=", 1)
        src = REPO / want[key]
        assert uri.startswith(to + "/tiny/")  # models/tiny/t5 -> <to>/tiny/t5
        files = _files(src)
        sums = fs.read_json(fs.join(fs.parent(uri) if src.is_file() else uri, SUMS_NAME))
        for rel, data in files.items():
            target = uri if rel == "" else fs.join(uri, rel)
            assert fs.read_bytes(target) == data, target
            assert sums[rel or src.name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    remote = load_pipeline(str(cfg_out), "demo", check=True)  # check_paths lists every URI: all there
    assert {k: v for k, v in iter_path_fields(remote) if k in want} == dict(s.split("=", 1) for s in sets)
    assert upload_models.main(["--pipeline", "demo", "--to", to]) == 0
    import re

    sent = re.findall(r"\((\d+)/(\d+) files sent", capsys.readouterr().err)
    assert len(sent) == len(set(dict(s.split("=", 1) for s in sets).values())) and all(n == "0" for n, _ in sent)

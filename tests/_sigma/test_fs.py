"""_sigma.fs: one API for local folders and a real S3 server (moto, HTTP on 127.0.0.1)."""
import os

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from _sigma import fs, manifest


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/out"


def test_write_read_list_delete(root):
    fs.write_text(fs.join(root, "a", "x.txt"), "hello")
    fs.write_json(fs.join(root, "a", "y.json"), {"n": 1})
    assert fs.read_text(fs.join(root, "a", "x.txt")) == "hello"
    assert fs.read_json(fs.join(root, "a", "y.json")) == {"n": 1}
    assert fs.listdir(fs.join(root, "a")) == ["x.txt", "y.json"]
    assert fs.list_files(root, recursive=True) == [("a/x.txt", 5), ("a/y.json", len('{\n  "n": 1\n}'))]
    assert fs.isdir(fs.join(root, "a")) and fs.isfile(fs.join(root, "a", "x.txt"))
    assert fs.listdir(fs.join(root, "missing")) == [] and not fs.exists(fs.join(root, "missing"))
    assert fs.delete(fs.join(root, "a", "x.txt")) and not fs.delete(fs.join(root, "a", "x.txt"))
    fs.delete_dir(fs.join(root, "a"))
    assert fs.list_files(root, recursive=True) == []


def test_failed_writer_leaves_the_old_file_and_no_temp(root):
    target = fs.join(root, "f.bin")
    fs.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with fs.atomic_output(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("writer died")
    assert fs.read_bytes(target) == b"old"
    assert fs.list_files(root, recursive=True) == [("f.bin", 3)]  # no temp file left behind


def test_manifest_parts_summaries_and_duckdb(root):
    manifest.write_part(root, 0, pa.table({"key": ["00000_000000", "00000_000001"],
                                           "status": ["ok", "failed_download"]}), "download", "fp")
    manifest.write_part(root, 100000, pa.table({"key": ["100000_000000"], "status": ["ok"]}), "download", "fp")
    assert manifest.list_parts(root) == [0, 100000]  # 6-digit part numbers are parts too
    assert manifest.run_summary(root) == {"rows": 3, "status": {"ok": 2, "failed_download": 1}, "selected": None}
    manifest.write_embeddings(root, 0, ["00000_000000"], np.ones((1, 4)))
    k, e = manifest.read_part_embeddings(root, 0)
    assert k.tolist() == ["00000_000000"] and e.shape == (1, 4) and e.dtype == np.float16
    con = duckdb.connect()
    con.register("m", manifest.manifest_dataset(root))
    assert con.sql("select count(*) from m where status = 'ok'").fetchall() == [(2,)]


def test_normalize():
    assert fs.normalize("rel/dir") == os.path.abspath("rel/dir")
    assert fs.normalize("file:///tmp/x") == "/tmp/x"
    assert fs.normalize("s3://b/p/") == "s3://b/p"
    with pytest.raises(ValueError, match="unsupported scheme"):
        fs.normalize("ftp://host/x")

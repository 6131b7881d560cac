"""The manifest format: parts, stage fingerprints, column merges, embeddings, atomicity."""
import numpy as np
import pyarrow as pa
import pytest

from _sigma import manifest


def _part(keys):
    return pa.table({"key": pa.array(keys, pa.string()), "status": pa.array(["ok"] * len(keys), pa.string())})


def test_write_read_fingerprints_and_no_temp_files(tmp_path):
    manifest.write_part(tmp_path, 0, _part(["00000_000000", "00000_000001"]), "download", "fp1")
    manifest.write_part(tmp_path, 1, _part(["00001_000000"]), "download", "fp1")
    assert manifest.list_parts(tmp_path) == [0, 1]
    assert manifest.part_fingerprints(tmp_path, 0) == {"download": "fp1"}
    assert manifest.stage_done(tmp_path, 0, "download", "fp1")
    assert not manifest.stage_done(tmp_path, 0, "download", "other")
    assert manifest.read_manifest(tmp_path).num_rows == 3
    assert not [p for p in (tmp_path / "manifest").iterdir() if "tmp" in p.name]
    manifest.check_invariants(tmp_path, 3)
    with pytest.raises(AssertionError, match="3 manifest rows for 4 input rows"):
        manifest.check_invariants(tmp_path, 4)


def test_duplicate_keys_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate keys"):
        manifest.write_part(tmp_path, 0, _part(["a", "a"]), "download", "x")


def test_update_part_joins_by_key_and_keeps_order(tmp_path):
    manifest.write_part(tmp_path, 0, _part(["k1", "k2", "k3"]), "download", "d")
    new = pa.table({"key": ["k3", "k1"], "aesthetic": [7.0, 5.0]})
    t = manifest.update_part(tmp_path, 0, new, "score", "s")
    assert t.column("key").to_pylist() == ["k1", "k2", "k3"]
    assert t.column("aesthetic").to_pylist() == [5.0, None, 7.0]
    assert manifest.part_fingerprints(tmp_path, 0) == {"download": "d", "score": "s"}
    # re-running a stage replaces its columns instead of duplicating them
    t = manifest.update_part(tmp_path, 0, pa.table({"key": ["k2"], "aesthetic": [6.0]}), "score", "s2")
    assert t.column_names.count("aesthetic") == 1 and t.column("aesthetic").to_pylist() == [None, 6.0, None]


def test_duckdb_reads_with_one_glob(tmp_path):
    import duckdb

    manifest.write_part(tmp_path, 0, _part(["a", "b"]), "download", "d")
    manifest.update_part(tmp_path, 0, pa.table({"key": ["a"], "aesthetic": [5.5]}), "score", "s")
    manifest.write_part(tmp_path, 1, _part(["c"]), "download", "d")  # no score columns yet
    q = f"select count(*), count(aesthetic) from read_parquet('{manifest.manifest_glob(tmp_path)}', union_by_name=true)"
    assert duckdb.sql(q).fetchall()[0] == (3, 1)


def test_embeddings_roundtrip(tmp_path):
    e = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    manifest.write_embeddings(tmp_path, 0, ["a", "b"], e[:2])
    manifest.write_embeddings(tmp_path, 1, ["c", "d"], e[2:])
    keys, emb = manifest.read_embeddings(tmp_path)
    assert keys.tolist() == ["a", "b", "c", "d"] and emb.dtype == np.float16
    np.testing.assert_allclose(emb.astype(np.float32), e, atol=2e-3)
    keys, _ = manifest.read_embeddings(tmp_path, [1])
    assert keys.tolist() == ["c", "d"]

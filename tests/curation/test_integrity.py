"""Reruns of the download stage trust nothing they did not verify: a corrupt or missing shard file
is fetched again, a corrupt manifest part is rebuilt, changed settings fetch everything again;
every reason names the file."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _sigma import manifest
from _sigma.config import parse
from curation import demo_data as dd
from curation.config import PipelineConfig
from curation.download import run_download
from curation.inputs import prepare_inputs
from hostile_web import HostileServer


def _cfg(tmp_path, **download):
    return parse(PipelineConfig, {"name": "t", "output": str(tmp_path / "out"),
                                  "input": {"path": str(tmp_path / "urls.parquet"), "part_size": 3},
                                  "download": {"processes": 1, "threads": 4, "timeout": 5,
                                               "allow_private_addresses": True, **download}})


@pytest.mark.slow
def test_reruns_verify_shards_and_parts(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("SIGMA_QUIET", "1")
    bodies = {f"i{i}.jpg": dd._jpeg(dd.synthetic("red", "green", "square", (80, 60), i)) for i in range(6)}
    routes = {n: (lambda b: lambda h: (h.send_response(200), h.send_header("Content-Length", str(len(b))),
                                       h.end_headers(), h.wfile.write(b)))(b) for n, b in bodies.items()}
    with HostileServer(routes) as srv:
        pq.write_table(pa.table({"url": [f"{srv.base}/{n}" for n in bodies]}), tmp_path / "urls.parquet")
        cfg = _cfg(tmp_path)
        out = cfg.out
        prepare_inputs(cfg.input, out)
        first = run_download(cfg, out, progress=False)
        assert first["status"] == {"ok": 6} and first["parts_fetched"] == 2 and len(srv.requested) == 6
        dl = tmp_path / "out" / "download"
        good_tar = (dl / "00001.tar").read_bytes()

        # Same settings: nothing fetched, nothing rewritten.
        again = run_download(cfg, out, progress=False)
        assert (again["parts_fetched"], again["parts_written"], len(srv.requested)) == (0, 0, 6)

        # One flipped byte in a tar (same size) and a missing img2dataset parquet: both shards again.
        bad = bytearray(good_tar)
        bad[len(bad) // 2] ^= 0xFF
        (dl / "00001.tar").write_bytes(bytes(bad))
        (dl / "00000.parquet").unlink()
        redo = run_download(cfg, out, progress=False)
        assert redo["parts_fetched"] == 2 and len(srv.requested) == 12
        assert "00001.tar" in redo["redone"][1] and "sha256" in redo["redone"][1]
        assert "00000.parquet" in redo["redone"][0] and "missing" in redo["redone"][0]
        assert "00001.tar" in capfd.readouterr().err  # reported as it happens
        assert redo["status"] == {"ok": 6} and (dl / "00001.tar").stat().st_size == len(good_tar)

        # A truncated manifest part: readers refuse it naming the file, the download stage rebuilds
        # it from the verified shard (no fetch).
        part = tmp_path / "out" / "manifest" / "part-00001.parquet"
        part.write_bytes(part.read_bytes()[:-40])
        with pytest.raises(manifest.CorruptPartError, match="part-00001.parquet"):
            manifest.read_part(out, 1)
        fixed = run_download(cfg, out, progress=False)
        assert fixed["parts_fetched"] == 0 and fixed["parts_written"] == 1 and len(srv.requested) == 12
        assert "part-00001.parquet" in fixed["redone"][1]
        assert manifest.read_part(out, 1).num_rows == 3 and manifest.part_problem(out, 1) is None

        # Changed download settings: every shard is fetched again, not just re-stamped.
        changed = run_download(_cfg(tmp_path, timeout=6), out, progress=False)
        assert changed["parts_fetched"] == 2 and len(srv.requested) == 18
        assert all("download settings changed" in r for r in changed["redone"].values())
        # ...but how the work is spread is not a setting of the result.
        spread = run_download(_cfg(tmp_path, timeout=6, threads=2), out, progress=False)
        assert spread["parts_fetched"] == 0 and len(srv.requested) == 18


def test_manifest_part_records_survive_a_kill_between_record_and_part(tmp_path):
    """write_part writes the record first: a part from before the kill still verifies."""
    t = pa.table({"key": ["00000_000000"], "status": ["ok"]})
    manifest.write_part(tmp_path, 0, t, "download", "a")
    old = (tmp_path / "manifest" / "part-00000.parquet").read_bytes()
    manifest.write_part(tmp_path, 0, t, "score", "b")
    (tmp_path / "manifest" / "part-00000.parquet").write_bytes(old)  # as if killed before the part's rename
    assert manifest.part_problem(tmp_path, 0) is None
    assert manifest.part_fingerprints(tmp_path, 0) == {"download": "a"}  # so score is simply redone
    (tmp_path / "manifest" / "part-00000.parquet").write_bytes(old[:10] + b"x" + old[11:])
    assert "sha256" in manifest.part_problem(tmp_path, 0)

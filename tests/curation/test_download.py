"""The download stage on a real img2dataset run: originals by default, max_side/re-encode on request."""
import hashlib
import io

from PIL import Image

from _sigma import manifest
from _sigma.config import parse
from curation import demo_data as dd
from curation.config import PipelineConfig
from _sigma.images import iter_download_images as iter_images
from curation.download import run_download
from curation.inputs import prepare_inputs


def _cfg(tmp_path, name, **download):
    return parse(PipelineConfig, {"name": "t", "output": str(tmp_path / name),
                                  "input": {"path": str(tmp_path / "urls.parquet"), "part_size": 4},
                                  "download": {"processes": 1, "threads": 4, "timeout": 5,
                                               "allow_private_addresses": True, **download}})


def test_originals_kept_and_max_side_option(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMA_QUIET", "1")
    items = [dd.Item(f"i{i}.jpg", dd._jpeg(dd.synthetic("red", "blue", "circle", (600, 300), i)), f"c{i}") for i in range(5)]
    with dd.DemoServer(items) as srv:
        dd.write_url_list(srv, items, tmp_path / "urls.parquet", with_edge_rows=False)
        for name, opts in (("orig", {}), ("small", {"max_side": 128, "reencode": True})):
            cfg = _cfg(tmp_path, name, **opts)
            out = cfg.out
            prepare_inputs(cfg.input, out)
            s = run_download(cfg, out)
            assert s["rows"] == 5 and s["status"] == {"ok": 5} and s["parts"] == 2
            got = dict(kv for p in manifest.list_parts(out) for kv in iter_images(out, p))
            rows = {r["key"]: r for r in manifest.read_manifest(out).to_pylist()}
            assert set(got) == set(rows)
            for key, data in got.items():
                i = int(rows[key]["url"].rsplit("i", 1)[-1].split(".")[0])
                if name == "orig":  # byte-for-byte original, and the recorded sha256 is of those bytes
                    assert data == items[i].body
                    assert rows[key]["sha256"] == hashlib.sha256(data).hexdigest()
                else:
                    assert max(Image.open(io.BytesIO(data)).size) == 128
            again = run_download(cfg, out)  # rerun: every part already done
            assert again["parts_written"] == 0

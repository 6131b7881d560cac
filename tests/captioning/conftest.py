"""Fixtures of the caption tests: a small pipeline output (manifest parts + img2dataset-style tars)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from _sigma import manifest
from curation.inputs import KEY_COL


def _jpeg(color, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def make_output(out: Path, parts: dict[int, list[dict]]) -> Path:
    """Write manifest parts (after select) and download tars.

    rows: dict(key, caption, selected, image: bytes | None (None: not in the tar)).
    """
    for part, rows in parts.items():
        table = pa.table({
            "key": [r["key"] for r in rows], "url": [f"http://x/{r['key']}.jpg" for r in rows],
            "caption": [r.get("caption") for r in rows], "status": ["ok"] * len(rows),
            "error": pa.nulls(len(rows), pa.string()), "selected": [r["selected"] for r in rows]})
        manifest.write_part(out, part, table, "select", "fp-select")
        tar_path = out / "download" / f"{part:05d}.tar"
        tar_path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar_path, "w") as tar:
            for i, r in enumerate(rows):
                if r.get("image") is None:
                    continue
                base = f"{part:05d}{i:04d}"
                for name, data in ((f"{base}.jpg", r["image"]), (f"{base}.json", json.dumps({KEY_COL: r["key"], "key": base}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return out


@pytest.fixture
def small_output(tmp_path) -> tuple[Path, dict]:
    """2 parts, 9 rows: 6 selected with good images, 1 selected corrupt, 1 selected missing, 1 not selected."""
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (120, 120, 120)]
    alts = ["a red square on a table", "", "IMG_2031.jpg", "https://example.com/a.jpg", "green and blue tiles", None]
    p0 = [{"key": f"00000_00000{i}", "caption": alts[i], "selected": True, "image": _jpeg(colors[i])} for i in range(4)]
    p0.append({"key": "00000_000004", "caption": "corrupt bytes", "selected": True, "image": b"\xff\xd8\xffnot a jpeg"})
    p1 = [{"key": f"00001_00000{i}", "caption": alts[4 + i], "selected": True, "image": _jpeg(colors[4 + i])}
          for i in range(2)]
    p1.append({"key": "00001_000002", "caption": "missing from the tar", "selected": True, "image": None})
    p1.append({"key": "00001_000003", "caption": "not selected", "selected": False, "image": _jpeg((1, 2, 3))})
    out = make_output(tmp_path / "run", {0: p0, 1: p1})
    return out, {"selected": 8, "good": 6, "rows": 9}

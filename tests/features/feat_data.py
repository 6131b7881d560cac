"""Test data of the features tests: a small pipeline output (manifest parts + download tars)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

# (width, height): landscape, square, tall, tiny (upscaled), very wide, portrait, ...
SIZES = [(640, 480), (512, 512), (300, 900), (96, 128), (1200, 320), (480, 640), (800, 600), (256, 256),
         (700, 500), (333, 777), (1024, 256), (520, 480)]


def _image(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                    np.full((h, w), rng.integers(0, 255))], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar_add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_pipeline_output(out: Path, n_parts: int = 2, per_part: int = 6) -> dict:
    """Manifest parts + img2dataset-like download tars. Returns facts the tests check against."""
    from _sigma import manifest

    out.mkdir(parents=True, exist_ok=True)
    (out / "download").mkdir(exist_ok=True)
    facts = {"selected": [], "not_selected": [], "missing_image": [], "no_long": [], "rows": {}}
    i = 0
    for p in range(n_parts):
        recs = []
        with tarfile.open(out / "download" / f"{p:05d}.tar", "w") as tar:
            for r in range(per_part):
                key = f"{p:05d}_{r:06d}"
                w, h = SIZES[i % len(SIZES)]
                sel = not (p == 0 and r == 1)
                missing = p == 1 and r == 2
                no_long = p == 1 and r == 4
                if not missing:
                    stem = f"{p:05d}{r:04d}"
                    _tar_add(tar, f"{stem}.jpg", _image(w, h, i))
                    _tar_add(tar, f"{stem}.json", json.dumps({"sigma_key": key, "url": f"http://x/{key}.jpg"}).encode())
                    _tar_add(tar, f"{stem}.txt", b"alt")
                long_ = None if no_long else (f"A detailed photograph of a red car number {i} parked on a city street at "
                                              f"sunset. " + "The lighting is soft and warm. " * (i % 5))
                recs.append({"key": key, "url": f"http://x/{key}.jpg", "caption": f"red car {i}", "status": "ok",
                             "width": w, "height": h, "aesthetic": 5.0 + i / 10, "selected": sel,
                             "caption_long": long_, "caption_short": None})
                facts["rows"][key] = recs[-1]
                (facts["selected"] if sel else facts["not_selected"]).append(key)
                if missing:
                    facts["missing_image"].append(key)
                if no_long:
                    facts["no_long"].append(key)
                i += 1
        table = pa.Table.from_pylist(recs)
        manifest.write_part(out, p, table, "select", "test")
    return facts


def features_cfg(out: Path, models: Path, **kw):
    """A PipelineConfig for `out` with a FeaturesConfig parsed from `kw` (strict parser)."""
    from _sigma.config import parse
    from curation.config import PipelineConfig

    # 2 CPUs: actors take half a CPU each so the read / prepare tasks still get scheduled.
    res = {"batch_size": 4, "actors": 1, "num_cpus": 0.5}
    feats = {"resolutions": [256, 512], "vae": str(models / "vae"), "t5": str(models / "t5"),
             "shard_max_samples": 4, "t5_resources": res, "vae_resources": res}
    feats.update(kw)
    return parse(PipelineConfig, {"name": "t", "output": str(out), "features": feats,
                                  "ray": {"num_cpus": 2, "progress_bars": False}})

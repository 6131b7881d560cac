"""Download throughput: img2dataset called directly vs our download stage, same URLs, one process.

Our stage = URL-list validation + keying + img2dataset + one manifest part per shard with a status
for every row. Prints images/s of each and the ratio ours / direct (goal >= 0.9).

    .venv/bin/python benchmarks/download_bench.py [--images 400] [--processes 2] [--threads 16]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["SIGMA_QUIET"] = "1"

import img2dataset  # noqa: E402

from common.config import parse  # noqa: E402
from curation import demo_data as dd  # noqa: E402
from curation.config import PipelineConfig  # noqa: E402
from curation.download import img2dataset_kwargs, run_download  # noqa: E402
from curation.inputs import prepare_inputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--part-size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    items = []
    for i in range(args.images):
        img = dd.synthetic(list(dd.COLOURS)[i % 8], list(dd.COLOURS)[(i + 3) % 8], dd.SHAPES[i % 3], (640, 480), i)
        items.append(dd.Item(f"img_{i:05d}.jpg", dd._jpeg(img), f"image {i}"))
    work = Path(tempfile.mkdtemp(prefix="dlbench"))
    best = {"direct": float("inf"), "ours": float("inf")}
    with dd.DemoServer(items) as srv:
        dd.write_url_list(srv, items, work / "urls.parquet", with_edge_rows=False)
        cfg = parse(PipelineConfig, {"name": "bench", "output": str(work / "ours"),
                                     "input": {"path": str(work / "urls.parquet"), "part_size": args.part_size},
                                     "download": {"processes": args.processes, "threads": args.threads, "timeout": 10,
                                                  "allow_private_addresses": True}})
        for _ in range(args.rounds):
            for mode in ("direct", "ours"):
                out = work / mode
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                if mode == "direct":
                    # The same img2dataset call our stage makes, on the same keyed parts, with no manifest.
                    prep = work / "prep"
                    if not (prep / "input").exists():
                        prepare_inputs(cfg.input, prep)
                    kw = img2dataset_kwargs(cfg, prep)
                    kw["output_folder"] = str(out)
                    t0 = time.perf_counter()
                    img2dataset.download(**kw)
                else:
                    prepare_inputs(cfg.input, out)
                    summary = run_download(cfg, out)
                    assert summary["rows"] == args.images and summary["status"].get("ok") == args.images
                best[mode] = min(best[mode], time.perf_counter() - t0)
    rate = {k: args.images / v for k, v in best.items()}
    print(f"images: {args.images}, processes {args.processes}, threads {args.threads}, best of {args.rounds}")
    print(f"img2dataset direct : {rate['direct']:8.1f} images/s")
    print(f"our download stage : {rate['ours']:8.1f} images/s (incl. keying + manifest)")
    print(f"ratio ours/direct  : {rate['ours'] / rate['direct']:.3f}  (goal >= 0.9)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

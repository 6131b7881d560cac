"""Run browser benchmark (issue 16): page latency of curation.browse at 1M vs 10K manifest rows.

Writes a synthetic manifest (curation.browse.sample.make_manifest: realistic columns, ~1 % of rows
in candidate pairs) of each size, builds the browser's DuckDB table once (as the server does at
start), then times the requests a page makes: a grid page under a filter and a sort at the first,
middle and last offset (LIMIT/OFFSET over the materialised table; the count of a filter is cached
after its first page), one row's detail, a duplicate group and a what-if. Median of --repeat runs
each; the ratio 1M / 10K says how far paging is from constant time. Baseline (same process): the
middle page as plain LIMIT/OFFSET with ORDER BY over the table, what paging.py avoids.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/browse_bench.py [--rows 10000,1000000] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.browse import sample, whatif  # noqa: E402
from curation.browse.store import Run  # noqa: E402

FILTER = "status = 'ok' AND aesthetic > 6"
GRIDCOLS = "key, aesthetic, width, height, status, reject_reason, bucket, selected, caption"


def timed(fn, repeat: int) -> float:
    """Median wall time of fn() in ms."""
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000)
    return statistics.median(ts)


def bench(rows: int, repeat: int, tmp: str) -> dict:
    out = os.path.join(tmp, f"m{rows}")
    t0 = time.perf_counter()
    sample.make_manifest(out, rows, part_rows=min(rows, 100_000))
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = Run(out)
    t_build = time.perf_counter() - t0
    n = run.count(FILTER)
    mid, last = (n // 2) // 48 * 48, max(0, (n - 1) // 48 * 48)
    res = {"rows": rows, "write_s": t_write, "build_s": t_build}
    first = time.perf_counter()
    run.page("aesthetic > 6.5", "key", False, 0)  # a new filter: its count is computed here
    res["new filter, page 1 (count + page)"] = (time.perf_counter() - first) * 1000
    first = time.perf_counter()
    whatif.whatif(run, {"aesthetic_min": "5.5", "min_side": "512"})
    res["first what-if (loads its arrays)"] = (time.perf_counter() - first) * 1000
    cases = {"page 1, key": lambda: run.page("", "key", False, 0),
             "page 1, filter + sort aesthetic desc": lambda: run.page(FILTER, "aesthetic", True, 0),
             "middle page, filter + sort": lambda: run.page(FILTER, "aesthetic", True, mid),
             "last page, filter + sort": lambda: run.page(FILTER, "aesthetic", True, last),
             "last page, key, no filter": lambda: run.page("", "key", False, (rows - 1) // 48 * 48),
             "baseline: middle page as LIMIT/OFFSET over m": lambda: run.query(
                 f"SELECT {GRIDCOLS} FROM m WHERE {FILTER} ORDER BY aesthetic DESC NULLS LAST, key DESC "
                 f"LIMIT 48 OFFSET {mid}"),
             "row detail": lambda: run.row("00000_000123"),
             "duplicate group": lambda: run.dup_group("00000_000123"),
             "what-if, a slider moved": lambda: whatif.whatif(run, {"aesthetic_min": "5.6", "min_side": "640",
                                                                     "dedup_threshold": "0.95"})}
    for name, fn in cases.items():
        res[name] = timed(fn, repeat)
    run.con.close()
    shutil.rmtree(out, ignore_errors=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="10000,1000000")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.rows.split(",")]
    tmp = tempfile.mkdtemp(prefix="browse-bench-")
    try:
        results = [bench(n, args.repeat, tmp) for n in sizes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"# browse_bench: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"median of {args.repeat}, filter `{FILTER}`")
    print(f"{'':52}" + "".join(f"{r['rows']:>14,}" for r in results) + ("     ratio" if len(results) == 2 else ""))
    print(f"{'write manifest (s)':52}" + "".join(f"{r['write_s']:>14.1f}" for r in results))
    print(f"{'build DuckDB table at server start (s)':52}" + "".join(f"{r['build_s']:>14.2f}" for r in results))
    for name in [k for k in results[0] if k not in ("rows", "write_s", "build_s")]:
        vals = [r[name] for r in results]
        ratio = f"{vals[-1] / vals[0]:>10.1f}" if len(vals) == 2 and vals[0] else ""
        print(f"{name + ' (ms)':52}" + "".join(f"{v:>14.1f}" for v in vals) + ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())

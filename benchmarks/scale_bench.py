"""Dedup + select at scale (issue 11 item 7), with the Table 1 SQL over the result.

Per size (default 10K, 100K, 1M rows), three subprocesses:
1. generate (untimed): a synthetic *scored* output written through _sigma.manifest (parts of
   10,000 rows, fp16 768-d embeddings) -- CLIP-like structure: a shared direction, a Zipf mixture of
   topics (~1 per 300 rows), noise with a decaying spectrum; 95 % status ok; planted exact copies (1 %
   of rows: same sha256, embedding, size) and near duplicates (2 %: cosine drawn from 0.92-0.99,
   resized 0.5-1x), their sources in the same part or in parts p+1 / p+P/2; long side log-normal
   around 1600 px, 7 aspect ratios incl. 5:1 panoramas, aesthetic ~ N(5.3, 0.9).
2. run (timed; this process is "the driver"): embedded Ray with 2 CPUs, then curation.dedup.run_dedup
   and curation.select.run_select with the `pixart-sigma` dedup/select settings of pipelines.yaml,
   then the Table 1 SQL (curation/sql/table1.sql via curation.stats.table1) over the manifest and a
   synthetic caption_nouns.parquet (one raw caption of ~12 Zipf nouns per row, as stats_bench).
   Driver peak RSS: getrusage(RUSAGE_SELF).ru_maxrss (this process only, its whole life, Ray start
   and imports included) and the peak of /proc/self VmRSS sampled every 20 ms during the stages.
3. recall (untimed, sizes <= 100K): exact all-pairs search (torch fp32 blocks over every status-ok
   embedding) at the candidate threshold; recall of the stored pairs against it and against the
   planted pairs (exact copies map onto their lowest key, which is what dedup searches).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_bench.py [--sizes 10000,100000,1000000] [--root /tmp/scale]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

D, PART_ROWS, SEED = 768, 10_000, 0
ASPECTS = np.array([1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3, 1 / 5])  # h/w: ... 5:1 panoramas (fail select)
ASPECT_P = np.array([0.25, 0.25, 0.15, 0.15, 0.1, 0.07, 0.03])


# --- 1. generate -------------------------------------------------------------------------------

def _world(n: int):
    rng = np.random.default_rng(SEED)
    m = rng.standard_normal(D)
    k = max(50, n // 300)
    topics = rng.standard_normal((k, D))
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    w = np.arange(1, k + 1) ** -0.7
    spec = (np.arange(1, D + 1) ** -0.6)[rng.permutation(D)]
    return m / np.linalg.norm(m), topics, w / w.sum(), spec / np.linalg.norm(spec)


def _base(part: int, n: int, world) -> np.ndarray:
    """(n, D) float32 unit embeddings of a part before planting, a function of (SEED, part) only."""
    m, topics, w, spec = world
    rng = np.random.default_rng([SEED, part, 1])
    x = 0.55 * m + 0.6 * topics[rng.choice(len(topics), n, p=w)] + 0.62 * rng.standard_normal((n, D)) * spec
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _sizes(rng, n):
    long = np.clip(rng.lognormal(np.log(1600), 0.5, n), 200, 8000)
    r = ASPECTS[rng.choice(len(ASPECTS), n, p=ASPECT_P)]
    w = np.where(r <= 1, long, long / r)
    return w.astype(np.int64), np.maximum(1, (w * r)).astype(np.int64)


def _attrs(part: int, n: int):
    rng = np.random.default_rng([SEED, part, 2])
    w, h = _sizes(rng, n)
    return w, h, rng.normal(5.3, 0.9, n), rng.random(n) < 0.95


def generate_part(part: int, n_parts: int, n: int, out: str, world, total: int) -> None:
    from _sigma import manifest

    rng = np.random.default_rng([SEED, part, 3])
    x = _base(part, n, world)
    w, h, aes, ok = _attrs(part, n)
    sha = [hashlib.sha256(f"{SEED}:{part}:{i}".encode()).hexdigest() for i in range(n)]
    n_near, n_exact = n // 50, n // 100
    src_parts = rng.choice([part, (part + 1) % n_parts, (part + n_parts // 2) % n_parts], n_near + n_exact)
    cache, planted = {}, []
    for j, q in enumerate(src_parts):  # rows 0 .. n_near + n_exact - 1 are the planted copies
        n_q = min(PART_ROWS, total - q * PART_ROWS)
        if q not in cache:
            cache[q] = (_base(q, n_q, world), *_attrs(q, n_q))
        i = int(rng.integers(n_near + n_exact, n_q))  # a source that is no planted row itself
        qx, qw, qh, qa, qok = cache[q]
        if j < n_near:  # near: cosine c exactly, along a direction with the data's spectrum
            c = rng.uniform(0.92, 0.99)
            u = rng.standard_normal(D) * world[3]
            u -= (u @ qx[i]) * qx[i]
            x[j] = c * qx[i] + np.sqrt(1 - c * c) * u / np.linalg.norm(u)
            s = rng.uniform(0.5, 1.0)
            w[j], h[j], aes[j] = max(1, int(qw[i] * s)), max(1, int(qh[i] * s)), qa[i] + rng.normal(0, 0.1)
            kind = "near"
        else:  # exact: the same bytes
            x[j], w[j], h[j], aes[j] = qx[i], qw[i], qh[i], qa[i]
            sha[j] = hashlib.sha256(f"{SEED}:{q}:{i}".encode()).hexdigest()
            ok[j] = qok[i]
            kind = "exact"
        planted.append((f"{part:05d}_{j:06d}", f"{q:05d}_{i:06d}", kind))
    keys = [f"{part:05d}_{i:06d}" for i in range(n)]
    status = np.where(ok, "ok", "failed_download")
    t = pa.table({"key": keys, "url": [f"http://img.example/{k}.jpg" for k in keys], "caption": ["a photo"] * n,
                  "status": status.tolist(), "sha256": [s if o else None for s, o in zip(sha, ok)],
                  "width": np.where(ok, w, 0), "height": np.where(ok, h, 0),
                  "aspect_ratio": np.where(ok, h / np.maximum(w, 1), np.nan), "aesthetic": np.where(ok, aes, np.nan)})
    manifest.write_part(out, part, t, "score", "bench-score", keep={"download": "bench-download"})
    manifest.write_embeddings(out, part, np.array(keys)[ok], x[ok])
    pl = pa.table({"a": [p[0] for p in planted], "b": [p[1] for p in planted], "kind": [p[2] for p in planted]})
    os.makedirs(os.path.join(out, "bench"), exist_ok=True)
    pq.write_table(pl, os.path.join(out, "bench", f"planted-{part:05d}.parquet"))


def caption_nouns(out: str, n: int, vocab: int = 50_000) -> None:
    """stats/caption_nouns.parquet: one raw caption per row (what curation.stats would extract)."""
    from curation.stats.nouns import NOUN_SCHEMA

    rng = np.random.default_rng(SEED)
    keys = pa.array([f"{i // PART_ROWS:05d}_{i % PART_ROWS:06d}" for i in range(n)])
    counts = rng.poisson(12, n).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    ids = np.minimum(rng.zipf(1.3, int(offsets[-1])) - 1, vocab - 1)
    nouns = pa.ListArray.from_arrays(pa.array(offsets), pa.array([f"noun{i}" for i in range(vocab)]).take(pa.array(ids)))
    os.makedirs(os.path.join(out, "stats"), exist_ok=True)
    pq.write_table(pa.table({"key": keys, "kind": pa.array(["raw"] * n), "words": rng.poisson(20, n).astype(np.int32),
                             "n_nouns": counts, "nouns": nouns, "error": pa.nulls(n, pa.string())}, schema=NOUN_SCHEMA),
                   os.path.join(out, "stats", "caption_nouns.parquet"))


def cmd_generate(n: int, out: str) -> None:
    from concurrent.futures import ProcessPoolExecutor

    n_parts = (n + PART_ROWS - 1) // PART_ROWS
    world = _world(n)
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(generate_part, range(n_parts), [n_parts] * n_parts,
                    [min(PART_ROWS, n - p * PART_ROWS) for p in range(n_parts)], [out] * n_parts, [world] * n_parts,
                    [n] * n_parts))
    caption_nouns(out, n)


# --- 2. run (the measured driver) ----------------------------------------------------------------

def _rss_sampler(stop, peak):
    while not stop.is_set():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        time.sleep(0.02)


def cmd_run(out: str) -> dict:
    import resource
    import threading

    from _sigma.raystage import init_ray
    from curation.config import RayConfig, load_pipeline
    from curation.dedup import run_dedup
    from curation.select import run_select

    cfg = load_pipeline(str(REPO / "pipelines.yaml"), "pixart-sigma", [f"output={out}"], check=False)
    t = time.perf_counter()
    init_ray(RayConfig(num_cpus=2, progress_bars=False))
    ray_start = time.perf_counter() - t
    stop, peak = threading.Event(), [0]
    th = threading.Thread(target=_rss_sampler, args=(stop, peak), daemon=True)
    th.start()
    t0 = time.perf_counter()
    dd = run_dedup(cfg, out, progress=False)
    t1 = time.perf_counter()
    sel = run_select(cfg, out, progress=False)
    t2 = time.perf_counter()
    from curation.stats import table1

    con = table1.connect([out], ["bench"])
    t1_rows = table1.query(con, "table1").num_rows
    con.close()
    t3 = time.perf_counter()
    stop.set()
    th.join()
    return {"dedup_s": t1 - t0, "select_s": t2 - t1, "table1_s": t3 - t2, "table1_rows": t1_rows,
            "ray_start_s": ray_start, "peak_rss_sampled": peak[0],
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "dedup": dd, "select": {k: v for k, v in sel.items() if k != "nodes"}}


# --- 3. recall -----------------------------------------------------------------------------------

def cmd_recall(out: str, threshold: float, all_pairs: bool = True) -> dict:
    import pyarrow.compute as pc
    import torch

    from _sigma import fs, manifest
    from curation.dedup.pairs import pair_files

    torch.set_num_threads(2)
    keys, emb = manifest.read_embeddings(out)
    m = manifest.read_manifest(out, ["key", "sha256"])
    sha = dict(zip(m.column("key").to_pylist(), m.column("sha256").to_pylist()))
    first: dict = {}
    for k in sorted(keys.tolist()):
        first.setdefault(sha[k], k)
    rep = {k: first[sha[k]] for k in keys.tolist()}
    e = torch.from_numpy(emb.astype(np.float32))
    ref = set()
    for s in range(0, len(e) if all_pairs else 0, 2048):  # exact all-pairs search, fp32
        sims = e[s:s + 2048] @ e.T
        i, j = torch.nonzero(sims >= threshold, as_tuple=True)
        for a, b in zip((i + s).tolist(), j.tolist()):
            if a < b:
                ra, rb = rep[keys[a]], rep[keys[b]]
                if ra != rb:
                    ref.add((min(ra, rb), max(ra, rb)))
    stored = set()
    for uri in pair_files(out):
        t = fs.read_parquet(uri)
        t = t.filter(pc.equal(t.column("kind"), "near"))
        stored.update(zip(t.column("a").to_pylist(), t.column("b").to_pylist()))
    planted = pa.concat_tables([pq.read_table(os.path.join(out, "bench", f))
                                for f in sorted(os.listdir(os.path.join(out, "bench")))]).to_pylist()
    hits = total = 0
    for p in planted:
        if p["a"] in rep and p["b"] in rep:
            ra, rb = rep[p["a"]], rep[p["b"]]
            total += 1
            if ra == rb:  # an exact copy: found by the sha256 group-by (dedup_test checks the star edges)
                hits += 1
            else:
                hits += (min(ra, rb), max(ra, rb)) in stored
    res = {"stored_near": len(stored), "planted": total, "recall_planted": hits / max(1, total)}
    if all_pairs:
        res.update(ref_pairs=len(ref), recall_all_pairs=len(ref & stored) / max(1, len(ref)),
                   precision_vs_all_pairs=len(ref & stored) / max(1, len(stored)))
    return res


def _sub(*args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{args[0]} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--root", default="/tmp/scale")
    ap.add_argument("--keep", action="store_true", help="keep the generated outputs (reused when present; select then finds its parts done and only counts them)")
    ap.add_argument("--recall-max", type=int, default=100_000)
    a = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        out = os.path.join(a.root, f"n{n}")
        if not os.path.exists(os.path.join(out, "stats", "caption_nouns.parquet")):
            t = time.perf_counter()
            subprocess.run(["rm", "-rf", out], check=True)
            _sub("generate", str(n), out)
            print(f"[{n:,}] generated in {time.perf_counter() - t:.0f} s (untimed)", flush=True)
        for d in ("dedup", "_work"):  # every run starts without dedup / select results
            subprocess.run(["rm", "-rf", os.path.join(out, d)], check=True)
        load0 = os.getloadavg()[0]
        r = _sub("run", out)
        r.update(n=n, load=(load0, os.getloadavg()[0]))
        # all pairs up to --recall-max rows (1M rows: ~2 h here), the planted pairs at every size
        r.update(_sub("recall", out, "0.9", "all" if n <= a.recall_max else "planted"))
        total = r["dedup_s"] + r["select_s"]
        print(f"[{n:,}] dedup {r['dedup_s']:.1f} s + select {r['select_s']:.1f} s = {total:.1f} s "
              f"({n / total:,.0f} rows/s); Table 1 SQL {r['table1_s']:.1f} s; driver peak RSS "
              f"{r['ru_maxrss'] / 2**20:.0f} MiB (sampled during stages {r['peak_rss_sampled'] / 2**20:.0f} MiB); "
              f"load {r['load'][0]:.1f}->{r['load'][1]:.1f}", flush=True)
        print(f"      dedup {json.dumps(r['dedup'])}\n      select {json.dumps(r['select'])}", flush=True)
        if "recall_all_pairs" not in r:
            print(f"      recall of planted {r['recall_planted']:.4f} ({r['planted']})", flush=True)
        else:
            print(f"      recall vs exact all-pairs {r['recall_all_pairs']:.4f} ({r['ref_pairs']} pairs), "
                  f"precision {r['precision_vs_all_pairs']:.4f}, recall of planted {r['recall_planted']:.4f} "
                  f"({r['planted']})", flush=True)
        rows.append(r)
        if not a.keep:
            subprocess.run(["rm", "-rf", out], check=True)
    print("\n| rows | dedup + select | rows/s | s per 1M rows | driver peak RSS | recall (all pairs / planted) | Table 1 SQL | load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        total = r["dedup_s"] + r["select_s"]
        rec = f"{r['recall_all_pairs']:.4f} / {r['recall_planted']:.4f}" if "recall_all_pairs" in r \
            else f"- / {r['recall_planted']:.4f}"
        print(f"| {r['n']:,} | {r['dedup_s']:.1f} + {r['select_s']:.1f} = {total:.1f} s | {r['n'] / total:,.0f} | "
              f"{total / r['n'] * 1e6:.0f} | {r['ru_maxrss'] / 2**20:.0f} MiB | {rec} | {r['table1_s']:.1f} s | "
              f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("generate", "run", "recall"):
        cmd, args = sys.argv[1], sys.argv[2:]
        if cmd == "generate":
            cmd_generate(int(args[0]), args[1])
            print("{}")
        elif cmd == "run":
            print(json.dumps(cmd_run(args[0]), default=str))
        else:
            print(json.dumps(cmd_recall(args[0], float(args[1]), args[2:] != ["planted"])))
    else:
        main()

"""Dedup + select at scale (issue 11 item 7; issue 19: any distribution, measured recall, memory).

Per size (default 10K, 100K, 1M rows; `--rows N` for one), three subprocesses:
1. generate (untimed; parts written by 2 worker processes, not the driver): a synthetic *scored*
   output written through _sigma.manifest (parts of 10,000 rows, fp16 768-d embeddings) of
   `--dist`: topic (CLIP-like: a shared direction, a Zipf mixture of topics ~1 per 300 rows, noise
   with a decaying spectrum), iso (isotropic: no structure at all) or mixed (the second half of every
   part isotropic); 95 % status ok; planted exact copies (1 % of rows: same sha256, embedding, size)
   and near duplicates (2 %: cosine drawn from 0.90-0.999, along the topic spectrum or, for
   isotropic sources, any direction; resized 0.5-1x), their sources in the same part or in parts
   p+1 / p+P/2; long side log-normal around 1600 px, 7 aspect ratios incl. 5:1 panoramas,
   aesthetic ~ N(5.3, 0.9).
2. run (timed; this process is "the driver"): embedded Ray with 2 CPUs, then curation.dedup.run_dedup
   (with dedup.recall_sample = `--recall-sample`: the stage's own exact-sample recall) and
   curation.select.run_select with the `pixart-sigma` settings of pipelines.yaml, then the Table 1
   SQL over the manifest and a synthetic caption_nouns.parquet. RssSampler: the peak RSS of every
   process of the run (this driver and every Ray process under it, every 0.25 s), with its
   object-store (RssShmem) and library (RssFile) parts and the tasks each worker ran.
3. recall (untimed): planted pairs found per cosine band (and per region for mixed), and up to
   `--recall-max` rows the stored pairs against an exact fp32 all-pairs search.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale_bench.py [--sizes 10000,100000,1000000 | --rows N]
        [--dist topic|iso|mixed] [--recall-sample 10000] [--root /tmp/scale] [--keep]
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


DIST = os.environ.get("SCALE_BENCH_DIST", "topic")  # topic | iso | mixed (set by --dist for the subprocesses)


def _iso_rows(n: int) -> np.ndarray:
    """(n,) bool: rows drawn isotropically (no cluster structure): none, all, or the second half of
    every part (mixed: dense topics and a sparse region side by side)."""
    return np.zeros(n, bool) if DIST == "topic" else np.ones(n, bool) if DIST == "iso" else np.arange(n) >= n // 2


def _base(part: int, n: int, world) -> np.ndarray:
    """(n, D) float32 unit embeddings of a part before planting, a function of (SEED, DIST, part) only."""
    m, topics, w, spec = world
    rng = np.random.default_rng([SEED, part, 1])
    x = 0.55 * m + 0.6 * topics[rng.choice(len(topics), n, p=w)] + 0.62 * rng.standard_normal((n, D)) * spec
    iso = _iso_rows(n)
    x[iso] = rng.standard_normal((int(iso.sum()), D))
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
    cache, planted, cos_planted = {}, [], []
    for j, q in enumerate(src_parts):  # rows 0 .. n_near + n_exact - 1 are the planted copies
        n_q = min(PART_ROWS, total - q * PART_ROWS)
        if q not in cache:
            cache[q] = (_base(q, n_q, world), *_attrs(q, n_q))
        i = int(rng.integers(n_near + n_exact, n_q))  # a source that is no planted row itself
        qx, qw, qh, qa, qok = cache[q]
        if j < n_near:  # near: cosine c exactly, along a direction with the data's spectrum (isotropic rows: any)
            c = rng.uniform(0.90, 0.999)
            u = rng.standard_normal(D) * (1.0 if _iso_rows(n_q)[i] else world[3])
            u -= (u @ qx[i]) * qx[i]
            x[j] = c * qx[i] + np.sqrt(1 - c * c) * u / np.linalg.norm(u)
            s = rng.uniform(0.5, 1.0)
            w[j], h[j], aes[j] = max(1, int(qw[i] * s)), max(1, int(qh[i] * s)), qa[i] + rng.normal(0, 0.1)
            kind = "near"
            cos_planted.append(c)
        else:  # exact: the same bytes
            x[j], w[j], h[j], aes[j] = qx[i], qw[i], qh[i], qa[i]
            sha[j] = hashlib.sha256(f"{SEED}:{q}:{i}".encode()).hexdigest()
            ok[j] = qok[i]
            kind = "exact"
            cos_planted.append(1.0)
        planted.append((f"{part:05d}_{j:06d}", f"{q:05d}_{i:06d}", kind))
    keys = [f"{part:05d}_{i:06d}" for i in range(n)]
    status = np.where(ok, "ok", "failed_download")
    t = pa.table({"key": keys, "url": [f"http://img.example/{k}.jpg" for k in keys], "caption": ["a photo"] * n,
                  "status": status.tolist(), "sha256": [s if o else None for s, o in zip(sha, ok)],
                  "width": np.where(ok, w, 0), "height": np.where(ok, h, 0),
                  "aspect_ratio": np.where(ok, h / np.maximum(w, 1), np.nan), "aesthetic": np.where(ok, aes, np.nan)})
    manifest.write_part(out, part, t, "score", "bench-score", keep={"download": "bench-download"})
    manifest.write_embeddings(out, part, np.array(keys)[ok], x[ok])
    pl = pa.table({"a": [p[0] for p in planted], "b": [p[1] for p in planted], "kind": [p[2] for p in planted],
                   "cos": pa.array(cos_planted, pa.float32())})
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

def _proc_tree(root: int) -> list[int]:
    """Pids of `root` and all its descendants (the embedded Ray: gcs, raylet, workers)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _mem(pid: int) -> tuple[int, int, str, int] | None:
    """(VmRSS, RssShmem bytes, process title, RssFile) of a pid: RssShmem is the part of RSS in
    shared memory (Ray workers: object store pages they mapped), RssFile mapped files (libraries)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            st = {k: v for k, v in (ln.split(":", 1) for ln in f if ":" in ln)}
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().split(b"\0")[0].decode(errors="replace")[:60]
    except OSError:
        return None
    kb = lambda k: int(st.get(k, "0 kB").split()[0]) * 1024  # noqa: E731
    return kb("VmRSS"), kb("RssShmem"), title, kb("RssFile")


class RssSampler:
    """Peak RSS of every process of the run (this driver and every Ray process under it), sampled
    every `every` s; per process: peak RSS, its shared part at that moment, and its title then
    (Ray workers name the task they run: ray::route, ray::_search, ...) and the tasks it ran."""

    def __init__(self, every: float = 0.25):
        import threading

        self.every, self.peak, self.tasks, self.stop = every, {}, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _run(self):
        me = os.getpid()
        while not self.stop.is_set():
            for pid in _proc_tree(me):
                m = _mem(pid)
                if m is None:
                    continue
                if m[2].startswith("ray::") and m[2] != "ray::IDLE":
                    self.tasks.setdefault(pid, set()).add(m[2][5:])
                if m[0] > self.peak.get(pid, (0,))[0]:
                    self.peak[pid] = (*m[:3], "driver" if pid == me else "", m[3])
            time.sleep(self.every)

    def report(self) -> dict:
        rows = sorted(([pid, rss, shm, (role or title) + (" ran " + ",".join(sorted(self.tasks[pid]))
                                                           if pid in self.tasks else ""), file]
                       for pid, (rss, shm, title, role, file) in self.peak.items()), key=lambda r: -r[1])
        drv = self.peak.get(os.getpid(), (0, 0))
        workers = [r for r in rows if r[0] != os.getpid() and r[3].startswith("ray::")]
        return {"driver": drv[0], "max_worker": max((r[1] for r in workers), default=0),
                "max_worker_private": max((r[1] - r[2] - r[4] for r in workers), default=0),
                "max_any": rows[0][1] if rows else 0, "processes": rows[:40]}


def cmd_run(out: str, recall_sample: int) -> dict:
    import resource

    from _sigma.raystage import init_ray
    from curation.config import RayConfig, load_pipeline
    from curation.dedup import run_dedup
    from curation.select import run_select

    cfg = load_pipeline(str(REPO / "pipelines.yaml"), "pixart-sigma",
                        [f"output={out}", f"dedup.recall_sample={recall_sample}"], check=False)
    t = time.perf_counter()
    init_ray(RayConfig(num_cpus=2, progress_bars=False))
    ray_start = time.perf_counter() - t
    with RssSampler() as rss:
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
    return {"dedup_s": t1 - t0, "select_s": t2 - t1, "table1_s": t3 - t2, "table1_rows": t1_rows,
            "ray_start_s": ray_start, "rss": rss.report(),
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "dedup": dd, "select": {k: v for k, v in sel.items() if k != "nodes"}}


# --- 3. recall -----------------------------------------------------------------------------------

BANDS = ((0.90, 0.95), (0.95, 0.99), (0.99, 1.0))


def cmd_recall(out: str, threshold: float, all_pairs: bool = True) -> dict:
    """Planted near pairs found, per cosine band of their planted cosine (every size), and (small
    sizes) the stored pairs against an exact fp32 all-pairs search. Exact copies map onto their
    lowest ok key (what dedup searches)."""
    import pyarrow.compute as pc

    from _sigma import fs, manifest
    from curation.dedup.pairs import pair_files

    planted = pa.concat_tables([pq.read_table(os.path.join(out, "bench", f))
                                for f in sorted(os.listdir(os.path.join(out, "bench")))])
    m = manifest.read_manifest(out, ["key", "status"])
    bad = set(m.filter(pc.not_equal(m.column("status"), "ok")).column("key").to_pylist())
    del m
    rep: dict = {}  # exact copies -> lowest ok key of the copy group (planted copies only)
    ex = planted.filter(pc.equal(planted.column("kind"), "exact"))
    groups: dict = {}
    for a, b in zip(ex.column("a").to_pylist(), ex.column("b").to_pylist()):
        groups.setdefault(b, {b}).add(a)
    for src, members in groups.items():
        ok = sorted(k for k in members if k not in bad)
        for k in ok:
            rep[k] = ok[0]
    stored = set()
    for uri in pair_files(out):
        t = fs.read_parquet(uri, ["a", "b", "kind"])
        t = t.filter(pc.equal(t.column("kind"), "near"))
        stored.update(zip(t.column("a").to_pylist(), t.column("b").to_pylist()))
    near = planted.filter(pc.equal(planted.column("kind"), "near"))
    hits = {b: [0, 0] for b in BANDS}
    region = {"topic": {b: [0, 0] for b in BANDS}, "iso": {b: [0, 0] for b in BANDS}}  # by the source row's kind
    for a, b, c in zip(near.column("a").to_pylist(), near.column("b").to_pylist(), near.column("cos").to_pylist()):
        if a in bad or b in bad:
            continue
        ra, rb = rep.get(a, a), rep.get(b, b)
        band = next(x for x in BANDS if x[0] <= c < x[1] or (x[1] == 1.0 and c >= x[0]))
        found = (min(ra, rb), max(ra, rb)) in stored
        hits[band][1] += 1
        hits[band][0] += found
        iso = DIST == "iso" or (DIST == "mixed" and int(b.split("_")[1]) >= PART_ROWS // 2)
        region["iso" if iso else "topic"][band][0] += found
        region["iso" if iso else "topic"][band][1] += 1
    res = {"stored_near": len(stored), "planted": {f"{lo:.2f}-{hi:.2f}": h for (lo, hi), h in hits.items()},
           "planted_by_region": {k: {f"{lo:.2f}-{hi:.2f}": h for (lo, hi), h in v.items()} for k, v in region.items()}}
    f95 = sum(hits[b][0] for b in BANDS[1:])
    n95 = sum(hits[b][1] for b in BANDS[1:])
    res["recall_planted_095"] = f95 / max(1, n95)
    if all_pairs:
        import torch

        torch.set_num_threads(2)
        keys, emb = manifest.read_embeddings(out)
        e = torch.from_numpy(emb.astype(np.float32))
        mm = manifest.read_manifest(out, ["key", "sha256"])
        sha = dict(zip(mm.column("key").to_pylist(), mm.column("sha256").to_pylist()))
        first: dict = {}
        for k in sorted(keys.tolist()):
            first.setdefault(sha[k], k)
        rp = {k: first[sha[k]] for k in keys.tolist()}
        ref = {}
        for s in range(0, len(e), 2048):  # exact all-pairs search, fp32
            sims = e[s:s + 2048] @ e.T
            i, j = torch.nonzero(sims >= threshold, as_tuple=True)
            for x, y, v in zip((i + s).tolist(), j.tolist(), sims[i, j].tolist()):
                if x < y and rp[keys[x]] != rp[keys[y]]:
                    ref[(min(rp[keys[x]], rp[keys[y]]), max(rp[keys[x]], rp[keys[y]]))] = v
        band_all = {}
        for lo, hi in BANDS:
            sel = [p for p, v in ref.items() if lo <= v < hi or (hi == 1.0 and v >= lo)]
            band_all[f"{lo:.2f}-{hi:.2f}"] = [sum(p in stored for p in sel), len(sel)]
        res.update(ref_pairs=len(ref), all_pairs=band_all,
                   recall_all_pairs=len(set(ref) & stored) / max(1, len(ref)),
                   precision_vs_all_pairs=len(set(ref) & stored) / max(1, len(stored)))
    return res


def _sub(*args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{args[0]} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _band(b: dict) -> str:
    return " ".join(f"{k}: {v['found']}/{v['pairs']}" + (f" = {v['recall']:.4f}" if v["recall"] is not None else "")
                    for k, v in b.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--rows", type=int, help="one size (overrides --sizes)")
    ap.add_argument("--dist", default="topic", choices=["topic", "iso", "mixed"],
                    help="embedding distribution: topic mixture, isotropic (no structure), or both")
    ap.add_argument("--root", default="/tmp/scale")
    ap.add_argument("--keep", action="store_true", help="keep the generated outputs (reused when present; select then finds its parts done and only counts them)")
    ap.add_argument("--recall-max", type=int, default=100_000)
    ap.add_argument("--recall-sample", type=int, default=10_000,
                    help="dedup.recall_sample: rows the stage searches exactly for its measured recall")
    a = ap.parse_args()
    os.environ["SCALE_BENCH_DIST"] = a.dist
    print(f"load average at start: {os.getloadavg()}; dist {a.dist}", flush=True)
    rows = []
    for n in [a.rows] if a.rows else [int(s) for s in a.sizes.split(",")]:
        out = os.path.join(a.root, f"{a.dist}-n{n}")
        if not os.path.exists(os.path.join(out, "stats", "caption_nouns.parquet")):
            t = time.perf_counter()
            subprocess.run(["rm", "-rf", out], check=True)
            _sub("generate", str(n), out)
            print(f"[{n:,}] generated in {time.perf_counter() - t:.0f} s (untimed)", flush=True)
        for d in ("dedup", "_work"):  # every run starts without dedup / select results
            subprocess.run(["rm", "-rf", os.path.join(out, d)], check=True)
        load0 = os.getloadavg()[0]
        r = _sub("run", out, str(a.recall_sample))
        r.update(n=n, load=(load0, os.getloadavg()[0]))
        r["disk"] = subprocess.run(["du", "-sh", out], capture_output=True, text=True).stdout.split()[0]
        # all pairs up to --recall-max rows (1M rows: ~2 h here), the planted pairs at every size
        r.update(_sub("recall", out, "0.9", "all" if n <= a.recall_max else "planted"))
        total = r["dedup_s"] + r["select_s"]
        rss = r["rss"]
        print(f"[{n:,}] dedup {r['dedup_s']:.1f} s + select {r['select_s']:.1f} s = {total:.1f} s "
              f"({n / total:,.0f} rows/s); Table 1 SQL {r['table1_s']:.1f} s; peak RSS: driver "
              f"{rss['driver'] / 2**20:.0f} MiB, largest Ray worker {rss['max_worker'] / 2**20:.0f} MiB "
              f"({rss['max_worker_private'] / 2**20:.0f} MiB anonymous), any process "
              f"{rss['max_any'] / 2**20:.0f} MiB; disk {r['disk']}; load {r['load'][0]:.1f}->{r['load'][1]:.1f}",
              flush=True)
        for pid, b, shm, title, file in rss["processes"][:12]:
            print(f"      pid {pid:>7} {b / 2**20:7.0f} MiB ({shm / 2**20:5.0f} object store, {file / 2**20:4.0f} files)  {title}")
        print(f"      dedup {json.dumps(r['dedup'])}\n      select {json.dumps(r['select'])}", flush=True)
        rec = r["dedup"].get("recall") or {}
        print(f"      sampled recall (the stage's, {rec.get('sample_rows')} rows searched exactly): {_band(rec.get('bands', {}))}",
              flush=True)
        print(f"      planted pairs found: " + " ".join(f"{k}: {f}/{t}" for k, (f, t) in r["planted"].items())
              + f"; >= 0.95: {r['recall_planted_095']:.4f}", flush=True)
        for reg, bands in r["planted_by_region"].items():
            if any(t for _, t in bands.values()):
                print(f"        {reg} rows: " + " ".join(f"{k}: {f}/{t}" for k, (f, t) in bands.items()), flush=True)
        if "recall_all_pairs" in r:
            print(f"      vs exact all-pairs: {r['recall_all_pairs']:.4f} ({r['ref_pairs']} pairs), precision "
                  f"{r['precision_vs_all_pairs']:.4f}; per band " + " ".join(f"{k}: {f}/{t}" for k, (f, t) in r["all_pairs"].items()),
                  flush=True)
        rows.append(r)
        if not a.keep:
            subprocess.run(["rm", "-rf", out], check=True)
    print("\n| dist | rows | dedup + select | s per 1M rows | A | peak RSS driver / worker (private) | sampled recall >= 0.95 [95 % CI] | planted >= 0.95 | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        total = r["dedup_s"] + r["select_s"]
        rec = r["dedup"].get("recall") or {}
        ci = rec.get("interval") or [0, 1]
        print(f"| {a.dist} | {r['n']:,} | {r['dedup_s']:.1f} + {r['select_s']:.1f} = {total:.1f} s | "
              f"{total / r['n'] * 1e6:.0f} | {r['dedup'].get('assignments')} | {r['rss']['driver'] / 2**20:.0f} / "
              f"{r['rss']['max_worker'] / 2**20:.0f} ({r['rss']['max_worker_private'] / 2**20:.0f}) MiB | "
              f"{rec.get('recall')} [{ci[0]:.4f}, {ci[1]:.4f}] ({rec.get('pairs')}) | {r['recall_planted_095']:.4f} | "
              f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("generate", "run", "recall"):
        cmd, args = sys.argv[1], sys.argv[2:]
        if cmd == "generate":
            cmd_generate(int(args[0]), args[1])
            print("{}")
        elif cmd == "run":
            print(json.dumps(cmd_run(args[0], int(args[1])), default=str))
        else:
            print(json.dumps(cmd_recall(args[0], float(args[1]), args[2:] != ["planted"])))
    else:
        main()

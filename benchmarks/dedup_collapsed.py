"""Adversarial data for dedup: 100K low-rank 'collapsed' embeddings (rank 16 + a common direction,
heavy-tailed scales, small isotropic noise): no clusters, 70x more pairs at 0.8-0.9 than at >= 0.9,
natural near pairs everywhere, plus 1,000 planted copies at 0.90-0.999. Truth: 5,000 random rows
searched exactly (fp32) against all rows.

In-process (no Ray: the stage's plain-call mode), default dedup settings except exact_search_rows
0 (so the clustered search runs at 100K):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dedup_collapsed.py [/tmp/dedup-collapsed]
"""
import hashlib
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "curation")]

import numpy as np  # noqa: E402
import torch  # noqa: E402


def gen(n, seed=0, d=768, rank=48):
    """Low-rank 'collapsed' embeddings (a common direction + a 48-d subspace with a decaying
    spectrum + small isotropic noise), heavy-tailed per-row scale: unlike the topic mixture (no
    clusters) and unlike isotropic data (most variance in 48 directions)."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal(d); m /= np.linalg.norm(m)
    B = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    spec = np.arange(1, rank + 1) ** -0.5
    z = rng.standard_normal((n, rank)) * spec * rng.standard_t(3, (n, 1)).clip(-6, 6)
    x = 0.45 * m + (z @ B.T) * 0.9 + 0.25 * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


from scored_data import write_scored  # noqa: E402
from curation.config import DedupConfig, PipelineConfig
from curation.dedup import run_dedup
from curation.dedup.pairs import pair_files, key_ids, ROW_BASE
from _sigma import fs
n, part = 100_000, 10_000
rng = np.random.default_rng(9)
x = gen(n, seed=3, rank=16)
src, dst = rng.permutation(n)[:2000].reshape(2, 1000)
c = rng.uniform(0.90, 0.999, 1000)
u = rng.standard_normal((1000, 768)); u -= (u * x[src]).sum(1, keepdims=True) * x[src]; u /= np.linalg.norm(u, axis=1, keepdims=True)
x[dst] = c[:, None] * x[src] + np.sqrt(1 - c ** 2)[:, None] * u
data = {"emb": x.astype(np.float16), "sha": [hashlib.sha256(f"adv{i}".encode()).hexdigest() for i in range(n)],
        "status": np.array(["ok"] * n, object), "width": np.full(n, 2000), "height": np.full(n, 2000), "aesthetic": np.full(n, 6.0)}
out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/dedup-collapsed"; fs.delete_dir(out)
write_scored(out, data, part)
cfg = PipelineConfig(name="adv", output=out, dedup=DedupConfig(exact_search_rows=0, recall_sample=1000))
t = time.time(); res = run_dedup(cfg, out, progress=False); dt = time.time() - t
stored = set()
import pyarrow.compute as pc
for uri in pair_files(out):
    tb = fs.read_parquet(uri); tb = tb.filter(pc.equal(tb.column("kind"), "near"))
    a, b = key_ids(tb.column("a")), key_ids(tb.column("b"))
    rows = lambda k: (k // ROW_BASE) * part + k % ROW_BASE
    stored.update(zip(rows(a).tolist(), rows(b).tolist()))
e = torch.from_numpy(data["emb"].astype(np.float32))
pick = np.random.default_rng(1).choice(n, 5000, replace=False)
sims = e[torch.from_numpy(pick)] @ e.T
i, j = torch.nonzero(sims >= 0.9, as_tuple=True)
bands = {(0.9, 0.95): [0, 0], (0.95, 0.99): [0, 0], (0.99, 1.01): [0, 0]}
for a, b, s in zip(pick[i.numpy()], j.numpy(), sims[i, j].numpy()):
    if a == b: continue
    band = next(k for k in bands if k[0] <= s < k[1]); bands[band][1] += 1
    bands[band][0] += (min(a, b), max(a, b)) in stored
print(f"dedup {dt:.1f} s, A {res['assignments']}, candidates {res['candidates']}, near {res['near']}, code_threshold {res['code_threshold']}, routed {res['routed_rows']}")
print("truth (5,000 rows x all, fp32):", {f"{k[0]}-{min(k[1],1.0)}": f"{f}/{t}" for k, (f, t) in bands.items()})
print("stage's own sample:", {k: f"{v['found']}/{v['pairs']}" for k, v in res["recall"]["bands"].items()})
pf = sum(((min(s_, d_), max(s_, d_)) in stored) for s_, d_ in zip(src, dst) if x[s_] @ x[d_] >= 0.95)
pt = sum(1 for s_, d_ in zip(src, dst) if x[s_] @ x[d_] >= 0.95)
print(f"planted >= 0.95: {pf}/{pt}")

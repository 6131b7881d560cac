"""Every dedup run measures its own recall (issue 19 item 2).

A seeded random sample of the status-ok rows (dedup.recall_sample, default 1,000) is searched
EXACTLY against every row: one Ray task per batch of parts streams its embeddings past the sample
(bf16 matmul candidates within kernels.MARGIN of the threshold, verified in fp32 as the search does),
so the truth costs one more read of the embeddings and sample x rows dot products (1M rows x 1,000:
~10 CPU-s). A last task reads the stored pairs and counts which true pairs the approximate search
stored, per cosine band, with Wilson intervals. The driver sees those counts only.

Truth pairs: (sample row, any other row) at cosine >= candidate_threshold, rows with the same sha256
excluded (exact copies: the sha group-by finds those). Both ends are mapped onto their sha group's
head (the `a` of the stored exact star edges; the near search searches heads only), and a pair
sampled from both ends counts once. Pairs of one sample row are not independent (a row with many
near copies weighs more), so the interval is a guide, not an exact confidence statement.
"""
from __future__ import annotations

import math

import numpy as np

from _sigma import fs
from curation.dedup import kernels, search
from curation.dedup.pairs import key_ids, pair_files

BANDS = ((0.90, 0.95), (0.95, 0.99), (0.99, 1.01))  # reported cosine bands (the last includes 1.0)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (0, 1 when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def choose_sample(ok_rows: list[int], size: int, seed: int) -> list[np.ndarray]:
    """Per part, the sorted positions among its status-ok rows of a uniform sample of `size` rows
    (without replacement, seeded) over all parts."""
    total = int(sum(ok_rows))
    size = min(int(size), total)
    pick = np.sort(np.random.default_rng([seed, 2019]).choice(total, size, replace=False)) if size else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(ok_rows)])
    return [pick[(pick >= starts[p]) & (pick < starts[p + 1])] - starts[p] for p in range(len(ok_rows))]


def sample_rows(parts: list[int], picks: list[np.ndarray], out: str) -> dict:
    """The sampled rows of these parts that have an embedding: ids, sha words, emb fp16 (S, D).
    `picks[i]` are positions among part i's status-ok rows (the order of manifest.read_part)."""
    got = {"ids": [], "hi": [], "lo": [], "valid": [], "emb": [], "drawn": 0}
    for p, pick in zip(parts, picks):
        if not len(pick):
            continue
        got["drawn"] += int(len(pick))
        ids_all, *_ = search._part_rows(out, p, False)  # every ok row, in order: what `pick` indexes
        ids, hi, lo, valid, emb = search._part_rows(out, p, True)  # those with an embedding
        if emb is None or not len(ids):
            continue
        want = ids_all[pick[pick < len(ids_all)]]
        m = np.isin(ids, want)
        for k, v in (("ids", ids), ("hi", hi), ("lo", lo), ("valid", valid), ("emb", emb)):
            got[k].append(v[m])
    for k, dtype in (("ids", np.int64), ("hi", np.uint64), ("lo", np.uint64), ("valid", bool), ("emb", np.float16)):
        got[k] = np.concatenate(got[k]) if got[k] else np.zeros((0,) if k != "emb" else (0, 0), dtype)
    return got


def merge_samples(*samples: dict) -> dict:
    keep = [s for s in samples if len(s["ids"])]
    out = {k: np.concatenate([s[k] for s in keep]) if keep else samples[0][k]
           for k in ("ids", "hi", "lo", "valid", "emb")}
    out["drawn"] = int(sum(s["drawn"] for s in samples))
    return out


def exact_neighbours(parts: list[int], sample: dict, *, out: str, threshold: float, chunk: int = 2048) -> dict:
    """(sample id, other id, fp32 cosine) of every pair of a sample row and a row of these parts at
    cosine >= threshold, other than itself and its exact copies (same sha256)."""
    import torch

    s32 = torch.from_numpy(np.ascontiguousarray(sample["emb"], np.float32))
    sb = s32.to(torch.bfloat16)
    res_a, res_b, res_s = [], [], []
    for p in parts:
        ids, hi, lo, valid, emb = search._part_rows(out, p, True)
        if emb is None or not len(ids) or not len(s32):
            continue
        e32 = torch.from_numpy(np.ascontiguousarray(emb)).float()
        eb = e32.to(torch.bfloat16)
        for s in range(0, len(eb), chunk):
            sims = sb @ eb[s:s + chunk].T  # (S, chunk) bf16 candidates
            qi, rj = kernels.hits(sims, threshold - kernels.MARGIN)
            rj = rj + s
            sim = (s32[qi] * e32[rj]).sum(1).numpy()  # fp32, as the search stores it
            qi, rj = qi.numpy(), rj.numpy()
            same = (sample["ids"][qi] == ids[rj]) | (sample["valid"][qi] & valid[rj] & (sample["hi"][qi] == hi[rj])
                                                     & (sample["lo"][qi] == lo[rj]))
            ok = (sim >= threshold) & ~same
            res_a.append(sample["ids"][qi[ok]]), res_b.append(ids[rj[ok]]), res_s.append(sim[ok])
    cat = lambda xs, t: np.concatenate(xs).astype(t) if xs else np.zeros(0, t)  # noqa: E731
    return {"a": cat(res_a, np.int64), "b": cat(res_b, np.int64), "sim": cat(res_s, np.float32)}


def measure(*truths: dict, out: str, sample_size: int, drawn: int, cosine: float) -> dict:
    """Recall of the stored near pairs on the sampled truth: per band and at >= `cosine`."""
    import pyarrow.compute as pc

    a = np.concatenate([t["a"] for t in truths]) if truths else np.zeros(0, np.int64)
    b = np.concatenate([t["b"] for t in truths]) if truths else np.zeros(0, np.int64)
    s = np.concatenate([t["sim"] for t in truths]) if truths else np.zeros(0, np.float32)
    involved = np.unique(np.concatenate([a, b]))
    heads = {}  # row id -> head of its sha group (exact star edges a -> b)
    near = set()
    for uri in pair_files(out):
        t = fs.read_parquet(uri)
        ex = pc.equal(t.column("kind"), "exact")
        te = t.filter(ex)
        if te.num_rows:
            ea, eb = key_ids(te.column("a")), key_ids(te.column("b"))
            m = np.isin(eb, involved)
            heads.update(zip(eb[m].tolist(), ea[m].tolist()))
        tn = t.filter(pc.invert(ex))
        if tn.num_rows:
            na, nb = key_ids(tn.column("a")), key_ids(tn.column("b"))
            near.update(zip(na.tolist(), nb.tolist()))
    truth: dict = {}
    for x, y, v in zip(a.tolist(), b.tolist(), s.tolist()):
        hx, hy = heads.get(x, x), heads.get(y, y)
        if hx != hy:
            truth[(min(hx, hy), max(hx, hy))] = v
    pairs = np.array(list(truth), np.int64).reshape(-1, 2)
    sims = np.array(list(truth.values()), np.float32)
    found = np.array([(int(p[0]), int(p[1])) in near for p in pairs], bool)
    res = {"sample_rows": int(sample_size), "drawn": int(drawn), "cosine": cosine, "bands": {}}
    for lo, hi in BANDS:
        m = (sims >= lo) & (sims < hi)
        res["bands"][f"{lo:.2f}-{min(hi, 1.0):.2f}"] = _entry(int(found[m].sum()), int(m.sum()))
    m = sims >= cosine
    res.update(_entry(int(found[m].sum()), int(m.sum())))
    return res


def _entry(hits: int, n: int) -> dict:
    lo, hi = wilson(hits, n)
    return {"pairs": n, "found": hits, "recall": round(hits / n, 5) if n else None,
            "interval": [round(lo, 5), round(hi, 5)]}

"""Preference numbers (Fig. 9): votes of people and verdicts of the AI judge -> pairwise comparisons
-> per criterion: preference shares with bootstrap CIs, the win-rate matrix, Bradley-Terry strengths;
Cohen's kappa between the two sources on the comparisons both made.

A comparison is (criterion, prompt, rater, x, y, s): x before y in the study's run order, s = 1 if x
won, 0 if y won, 0.5 for a tie. People: choosing image c of K as best gives K - 1 comparisons (c beat
each other image); a full ranking gives all K(K-1)/2. AI: each pair is asked in both orders; the two
verdicts (the winner or a tie each) give one comparison, a tie when they disagree; a pair with an
invalid or missing verdict gives none (counted).

Preference share of model m = m's points / all points (a win 1, a tie 1/2 to each), pooled over the
prompts: for best-of-K votes exactly the share of votes naming m best (the paper's human bars), for
an all-pairs AI study its round-robin score share. CI: percentile bootstrap over prompts (a prompt's
comparisons move together). Bradley-Terry: maximum likelihood of P(i beats j) = p_i / (p_i + p_j),
ties as half a win each way, by Hunter's MM iteration; when the win graph is not strongly connected
(some model never beats or never loses to the rest: no finite MLE) one virtual tie per pair of
models is added first, and the result says so. Strengths are reported normalised to sum 1 (the
Luce probability of being picked best of all K) and as centred log-strengths.
"""
from __future__ import annotations

import numpy as np

from eval.judge import CRITERIA


def human_comparisons(study: dict, key: dict, docs: list[dict]) -> list[tuple]:
    order = {it["i"]: it["order"] for it in key["items"]}
    pos = {r: n for n, r in enumerate(study["runs"])}
    out = []
    for doc in docs:
        if doc.get("study") != study["id"]:
            raise ValueError(f"votes of study {doc.get('study')!r} given for study {study['id']!r}")
        for a in doc["answers"].values():
            shown = order[a["item"]]
            ranked = a.get("ranking") or [a["choice"]] + [j for j in range(len(shown)) if j != a["choice"]]
            top = len(ranked) if a.get("ranking") else 1  # best-of-K: only the chosen image's pairs are known
            for p in range(top):
                for q in range(p + 1, len(ranked)):
                    w, l = shown[ranked[p]], shown[ranked[q]]
                    x, y = (w, l) if pos[w] < pos[l] else (l, w)
                    out.append((a["question"], a["item"], doc["annotator"], x, y, 1.0 if w == x else 0.0))
    return out


def ai_comparisons(records: dict[str, dict]) -> tuple[list[tuple], dict]:
    """records: request id -> record (eval.judge.load_records). -> (comparisons, verdict stats)."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in records.values():
        groups.setdefault((r["criterion"], r["item"], *r["pair"]), {})[r["order"]] = r
    out = []
    st = {"requests": len(records), "invalid": 0, "errors": 0, "pairs": len(groups), "pairs_judged": 0,
          "pairs_incomplete": 0, "disagree": 0, "same_position": 0, "first_position": 0, "decisive": 0}
    for r in records.values():
        st["invalid"] += r.get("verdict") == "invalid"
        st["errors"] += "error" in r
        if r.get("verdict") in ("A", "B"):
            st["decisive"] += 1
            st["first_position"] += r["verdict"] == "A"
    for (crit, item, x, y), by in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1], g[0][2], g[0][3])):
        v = [by.get(o, {}).get("verdict") for o in (0, 1)]
        if not all(s in ("A", "B", "tie") for s in v):
            st["pairs_incomplete"] += 1
            continue
        s = []
        for o in (0, 1):
            winner = {"A": by[o]["a"], "B": by[o]["b"]}.get(v[o])
            s.append(0.5 if winner is None else float(winner == x))
        st["pairs_judged"] += 1
        st["disagree"] += s[0] != s[1]
        st["same_position"] += v[0] == v[1] and v[0] in ("A", "B")  # the slot won, not the image
        out.append((crit, item, "ai", x, y, s[0] if s[0] == s[1] else 0.5))
    n = st["pairs_judged"]
    st["disagree_rate"] = st["disagree"] / n if n else None
    st["position_bias_rate"] = st["same_position"] / n if n else None
    st["first_position_share"] = st["first_position"] / st["decisive"] if st["decisive"] else None
    return out, st


def bradley_terry(wins: np.ndarray, tol: float = 1e-12, iters: int = 100000, prior: float = 0.5) -> dict:
    """wins: (K, K) points of i against j (ties as 0.5 each way). -> {strength (sum 1), log_strength
    (centred), regularised}; a model in no comparison gets NaN."""
    from scipy.sparse.csgraph import connected_components

    w = np.asarray(wins, float)
    k = len(w)
    seen = (w + w.T).sum(1) > 0
    res = {"strength": [float("nan")] * k, "log_strength": [float("nan")] * k, "regularised": False}
    idx = np.flatnonzero(seen)
    if len(idx) < 2:
        return res
    w = w[np.ix_(idx, idx)]
    n_comp, _ = connected_components(w > 0, directed=True, connection="strong")
    if n_comp > 1:  # no finite MLE: one virtual tie per pair
        w = w + prior * (1 - np.eye(len(w)))
        res["regularised"] = True
    n = w + w.T
    p = np.full(len(w), 1.0 / len(w))
    for _ in range(iters):
        new = w.sum(1) / (n / (p[:, None] + p[None, :])).sum(1)
        new /= new.sum()
        done = np.abs(new - p).max() < tol
        p = new
        if done:
            break
    logp = np.log(p) - np.log(p).mean()
    for j, i in enumerate(idx):
        res["strength"][i], res["log_strength"][i] = float(p[j]), float(logp[j])
    return res


def summarise(comps: list[tuple], runs: list[str], b: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """One criterion's comparisons -> shares (+ bootstrap CI over prompts), win rates, Bradley-Terry."""
    k, pos = len(runs), {r: n for n, r in enumerate(runs)}
    items = sorted({c[1] for c in comps})
    row = {it: n for n, it in enumerate(items)}
    pts = np.zeros((len(items), k))  # points of each model per prompt
    wins, count = np.zeros((k, k)), np.zeros((k, k))
    for _, it, _, x, y, s in comps:
        i, j = pos[x], pos[y]
        pts[row[it], i] += s
        pts[row[it], j] += 1 - s
        wins[i, j] += s
        wins[j, i] += 1 - s
        count[i, j] += 1
        count[j, i] += 1
    res = {"prompts": len(items), "comparisons": len(comps), "raters": len({c[2] for c in comps}),
           "share": None, "share_ci": None, "ci_level": ci, "bootstrap": b,
           "win_rate": np.where(count > 0, wins / np.maximum(count, 1), np.nan).tolist(),
           "wins": wins.tolist(), "count": count.tolist(), "bt": bradley_terry(wins)}
    if not comps:
        return res
    tot = pts.sum(1)  # (prompts,) = comparisons per prompt
    res["share"] = (pts.sum(0) / tot.sum()).tolist()
    if b > 0:
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(items), size=(b, len(items)))  # (b, prompts) resampled prompt rows
        boot = pts[idx].sum(1) / tot[idx].sum(1)[:, None]  # (b, K)
        lo = (1 - ci) / 2
        res["share_ci"] = np.stack([np.quantile(boot, lo, axis=0), np.quantile(boot, 1 - lo, axis=0)], 1).tolist()
    return res


def _labels(comps: list[tuple]) -> dict[tuple, str]:
    """(criterion, prompt, x, y) -> 'x' / 'y' / 'tie': the raters' mean outcome (people: majority)."""
    acc: dict[tuple, list[float]] = {}
    for crit, it, _, x, y, s in comps:
        acc.setdefault((crit, it, x, y), []).append(s)
    return {u: ("x" if m > 0.5 else "y" if m < 0.5 else "tie") for u, m in ((u, float(np.mean(v))) for u, v in acc.items())}


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    cats = sorted(set(a) | set(b))
    n = len(a)
    if n == 0:
        return None
    po = sum(x == y for x, y in zip(a, b)) / n
    pe = sum((a.count(c) / n) * (b.count(c) / n) for c in cats)
    return None if pe == 1 else (po - pe) / (1 - pe)


def agreement(human: list[tuple], ai: list[tuple]) -> dict:
    """Per criterion: Cohen's kappa between the people's majority and the AI on the (prompt, pair)
    units both judged; None where there are none (or chance agreement is total)."""
    h, a = _labels(human), _labels(ai)
    res = {}
    for crit in CRITERIA:
        units = sorted(u for u in h.keys() & a.keys() if u[0] == crit)
        hx, ax = [h[u] for u in units], [a[u] for u in units]
        res[crit] = {"units": len(units), "kappa": cohen_kappa(hx, ax),
                     "agreement": (sum(x == y for x, y in zip(hx, ax)) / len(units)) if units else None}
    return res


def by_criterion(comps: list[tuple], runs: list[str], **kw) -> dict:
    return {c: summarise([x for x in comps if x[0] == c], runs, **kw) for c in CRITERIA}

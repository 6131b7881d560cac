"""Weights that make a real open_clip ViT compute a GIST-like image descriptor (curation/tiny.py
fits the projection and builds the tiny models; this module only sets the vision tower).

Input 64x64 (open_clip's preprocessing), 8x8-pixel patches, an 8x8 token grid, width 256. The
descriptor, read from the CLS token after ln_post (50 values):
  - mean colour (L, R-G, B-Y) over five soft regions (four overlapping quadrants, the centre);
  - a 15-bin triangular colour histogram of the patches' mean colours (whole image);
  - log(energy + 0.003) of 4 edge orientations per region. A patch's energy is the mean over
    four 8x8 windows offset by 0 / 4 px of the squared odd + even period-8 filter responses:
    with the half-offset windows the sum no longer depends on where an edge sits in the patch
    grid, so a crop or resize that moves the grid by a few pixels barely changes it.

How the forward computes it. Every quantity lives in named dims of the residual stream. The
position constants (row / column one-hot, a CLS flag) are +-M pairs; every feature dim has a
shared "sink" dim as its negative (each writer also writes -value there), so each token's mean
over the width is exactly 0 and its rms is dominated by the constants: every LayerNorm is then a
fixed rescale, undone by gamma = rms0.
  conv1 (no bias)     per patch: colour means; for each filter and window, the part of the
                      window that lies in this patch (the neighbours' parts are fetched)
  block 0 attention   3 heads: query = one-hot of (row + dy, col + dx), key = own one-hot, value =
                      the neighbour's parts; past the border the CLS token (no features) answers
  block 0 MLP         GELU(a r) + GELU(-a r) = sqrt(2/pi) (a r)^2 (1 + O(a r)^2) for each window
                      response r, summed per orientation; ReLU-like GELU(h z) / h hinges make
                      the triangular histogram bins
  block 1 attention   6 heads, CLS query 1, key log w(row) + log w(col): softmax weights are the
                      region weights, so CLS receives each region's weighted mean (last head:
                      the histogram over all patches)
  block 1 MLP         log(E + floor) as a sum of hinges at geometric knots (piecewise linear)
The other tokens compute by-products nobody reads (pool_type 'tok' keeps only CLS).
tests/curation/test_tiny_clip.py checks these numbers against a numpy implementation.
"""
from __future__ import annotations

import math

import numpy as np
import torch

IMAGE, PATCH = 64, 8
G = IMAGE // PATCH  # 8x8 token grid
# Soft regions of the token grid (separable row x column weights): four overlapping quadrants
# and the centre. Tapered edges: content moving a few pixels changes the means only a little.
_LO, _MID = (1, 1, 0.9, 0.7, 0.3, 0.1, 0, 0), (0, 0.3, 0.7, 1, 1, 0.7, 0.3, 0)
REGIONS = [(_LO, _LO), (_LO, _LO[::-1]), (_LO[::-1], _LO), (_LO[::-1], _LO[::-1]), (_MID, _MID)]
WIDTH, HEAD, EMBED = 256, 32, 64
# The open_clip custom-model config these weights are made for (real classes, real loader).
TINY_CLIP = {
    "embed_dim": EMBED,
    "vision_cfg": {"image_size": IMAGE, "layers": 2, "width": WIDTH, "head_width": HEAD, "patch_size": PATCH,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
M = 400.0        # constant position dims: dominate every token's rms (LayerNorm ~ fixed rescale)
SQ_A = 0.3       # |a r| <= 0.3 keeps GELU(z) + GELU(-z) within 1.5 % of sqrt(2/pi) z^2
GATE = 12.0      # pushes the squares of windows that leave the image to ~0
HINGE = 200.0    # GELU(HINGE z) / HINGE ~ relu(z) for the histogram bins
LOG_HINGE = 2e4  # same for the log knots (finest knot gap 1.2e-3)
LOG_FLOOR, LOG_RATIO, LOG_KNOTS = 3e-3, math.sqrt(2), 19  # log(E + floor), knots floor * ratio^k
LOG_SHIFT = 3.0  # stored log energies are log(E + floor) + LOG_SHIFT (near 0: small vs M)
LOGIT = 30.0     # attention logit margin that keeps a token out of a head's average (e^-30)
HIST_BINS = [(np.linspace(0, 1, 5), 0.25), (np.linspace(-0.8, 0.8, 5), 0.4), (np.linspace(-0.8, 0.8, 5), 0.4)]
N_OR = 4         # edge orientations 0, 45, 90, 135 degrees
OPP = (np.full(3, 1 / 3), np.array([1.0, -1.0, 0.0]), np.array([0.5, 0.5, -1.0]))  # L, R-G, B-Y


def _gabors() -> np.ndarray:
    """(2 * N_OR, 8, 8): odd / even period-8 filters, zero-sum, sum |k| = 2 (unit response)."""
    c = np.arange(PATCH) - (PATCH - 1) / 2
    v, u = np.meshgrid(c, c, indexing="ij")  # v: row, u: column offset from the window centre
    out = []
    for th in np.pi * np.arange(N_OR) / N_OR:
        t = u * math.cos(th) + v * math.sin(th)
        for f in (np.sin, np.cos):
            k = f(2 * np.pi * t / PATCH)
            k = k - k.mean()
            out.append(k * 2 / np.abs(k).sum())
    return np.stack(out)


# The window offset by (dy, dx) * 4 px is split into parts: (token offset, window rows, window
# cols, patch rows, patch cols). Token offset (0, 0) is the patch itself; others are fetched.
H0, H1, ALL = slice(0, 4), slice(4, 8), slice(0, 8)
PHASES = {
    (0, 0): [((0, 0), ALL, ALL, ALL, ALL)],
    (0, 1): [((0, 0), ALL, H0, ALL, H1), ((0, 1), ALL, H1, ALL, H0)],
    (1, 0): [((0, 0), H0, ALL, H1, ALL), ((1, 0), H1, ALL, H0, ALL)],
    (1, 1): [((0, 0), H0, H0, H1, H1), ((0, 1), H0, H1, H1, H0), ((1, 0), H1, H0, H0, H1), ((1, 1), H1, H1, H0, H0)],
}
FETCH = [(0, 1), (1, 0), (1, 1)]  # one block-0 head per neighbour: right, below, below-right


def _kernels():
    """Pixel-space conv kernels (F, 3, 8, 8) and their roles: 3 colour means, then one kernel
    per (filter, phase, part); every patch computes all parts, its neighbours fetch theirs."""
    ks = [np.einsum("c,hw->chw", col, np.full((PATCH, PATCH), 1 / PATCH ** 2)) for col in OPP]
    roles = [("colour", i, None, None) for i in range(3)]
    for f, g in enumerate(_gabors()):
        for phase, parts in PHASES.items():
            for off, wr, wc, pr, pc in parts:
                k = np.zeros((PATCH, PATCH))
                k[pr, pc] = g[wr, wc]
                ks.append(np.einsum("c,hw->chw", OPP[0], k))
                roles.append(("part", f, phase, off))
    return np.stack(ks), roles


class _Layout:
    """Named dims of the residual stream. Constants are +-M pairs; every feature dim has the
    shared SINK dim as its negative (writers add -value there), so each token's mean over the
    width stays exactly 0 and LayerNorm only divides by the (constant-dominated) rms."""

    def __init__(self, pairs: dict, singles: dict):
        nxt = 0
        self.neg = {}
        for name, n in pairs.items():
            setattr(self, name, np.arange(nxt, nxt + n))
            self.neg[name] = np.arange(nxt + n, nxt + 2 * n)
            nxt += 2 * n
        for name, n in singles.items():
            setattr(self, name, np.arange(nxt, nxt + n))
            nxt += n
        self.sink = nxt
        for name in singles:
            self.neg[name] = np.full(singles[name], self.sink)
        assert nxt < WIDTH, nxt

    def put(self, t, group: str, i: int, value, *idx):
        """t[dim, *idx] += value and t[its negative, *idx] -= value."""
        t[(int(getattr(self, group)[i]), *idx)] += value
        t[(int(self.neg[group][i]), *idx)] -= value

    def dim(self, group: str, i: int) -> int:
        return int(getattr(self, group)[i])


def layout():
    kern, roles = _kernels()
    n_hist = sum(len(c) for c, _ in HIST_BINS)
    n_fetch = sum(1 for r in roles if r[0] == "part" and r[3] != (0, 0))
    lay = _Layout(dict(row=G + 1, col=G + 1, cls=1),
                  dict(lin=len(kern), fetch=n_fetch, nrg=N_OR, hist=n_hist, pcol=3 * len(REGIONS),
                       pnrg=N_OR * len(REGIONS), phist=n_hist, loge=N_OR * len(REGIONS)))
    return lay, kern, roles


def design_vision(visual, mean, std):
    """Set every vision weight (module docstring); returns the layout (where the descriptor is)."""
    lay, kern, roles = layout()
    rms0 = math.sqrt(6 * M ** 2 / WIDTH)  # 3 constant +-M pairs per token (see below)
    P = {n: np.zeros(tuple(p.shape)) for n, p in visual.named_parameters()}
    kx = kern * np.asarray(std)[None, :, None, None]  # the input is x = (pixel - mean) / std
    for i in range(len(kern)):
        lay.put(P["conv1.weight"], "lin", i, kx[i])
    # Constants: row / column one-hot (index G = "none": the CLS token) and a CLS flag. Every
    # token holds exactly 3 pairs of +-M, so its rms is rms0 up to the small features.
    for t in range(G * G):
        r, c = divmod(t, G)
        for grp, i, v in (("row", r, M), ("col", c, M), ("cls", 0, -M)):
            lay.put(P["positional_embedding"][t + 1], grp, i, v)
    for grp, i, v in (("row", G, M), ("col", G, M), ("cls", 0, M)):
        lay.put(P["class_embedding"], grp, i, v)
    for n in P:
        if n.endswith(("ln_pre.weight", "ln_post.weight", "ln_1.weight", "ln_2.weight")):
            P[n][:] = rms0  # LN(x) = x / rms0 * gamma ~ x
    _fetch_heads(P, "transformer.resblocks.0.attn.", lay, roles)
    _energy_and_hist_mlp(P, "transformer.resblocks.0.mlp.", lay, roles, mean)
    _region_heads(P, "transformer.resblocks.1.attn.", lay)
    _log_mlp(P, "transformer.resblocks.1.mlp.", lay)
    with torch.no_grad():
        for n, p in visual.named_parameters():
            p.copy_(torch.as_tensor(P[n], dtype=p.dtype))
    return lay


def _fetch_heads(P, pre, lay, roles):
    """Block 0, head h: every token fetches the parts that token (r + dy, c + dx) computed for
    it. Query = one-hot of the target row / column (none past the border), key = own one-hot;
    the CLS token (no features) answers the queries that point outside the image."""
    W, U = WIDTH, 24.0  # U: logit per matching coordinate: target 2U, CLS 0.6U (1.6U for a
    # query past the border, where no token matches both coordinates), any other token <= U
    w, b, out = P[pre + "in_proj_weight"], P[pre + "in_proj_bias"], P[pre + "out_proj.weight"]
    s, extra = math.sqrt(U * math.sqrt(HEAD)) / M, math.sqrt(0.6 * U * math.sqrt(HEAD))
    slot = 0
    for h, (dy, dx) in enumerate(FETCH):
        h0 = h * HEAD
        for grp, d, base in (("row", dy, 0), ("col", dx, G + 1)):
            for j in range(G + 1):
                w[h0 + base + (j + d if j + d < G else G), lay.dim(grp, j)] = s  # query
                w[W + h0 + base + j, lay.dim(grp, j)] = s                      # key
        b[h0 + 2 * G + 2] = extra                                 # query: a constant ...
        w[W + h0 + 2 * G + 2, lay.dim("cls", 0)] = extra / (2 * M)  # ... that only CLS's key meets
        b[W + h0 + 2 * G + 2] = extra / 2
        j = 0
        for k, role in enumerate(roles):
            if role[0] == "part" and role[3] == (dy, dx):
                w[2 * W + h0 + j, lay.dim("lin", k)] = 1.0
                lay.put(out, "fetch", slot, 1.0, h0 + j)
                j, slot = j + 1, slot + 1


def _fetched(roles) -> dict:
    """kernel index -> fetch slot (same order as _fetch_heads)."""
    parts = [k for o in FETCH for k, r in enumerate(roles) if r[0] == "part" and r[3] == o]
    return {k: i for i, k in enumerate(parts)}


def _energy_and_hist_mlp(P, pre, lay, roles, mean):
    fc, fb, pw = P[pre + "c_fc.weight"], P[pre + "c_fc.bias"], P[pre + "c_proj.weight"]
    fetched, u = _fetched(roles), 0
    for f in range(2 * N_OR):
        for phase in PHASES:
            # window response r = sum of its parts (own lin dims + fetched dims); energy ~ r^2
            srcs = [lay.dim("lin", k) if r[3] == (0, 0) else lay.dim("fetch", fetched[k])
                    for k, r in enumerate(roles) if r[0] == "part" and r[1] == f and r[2] == phase]
            gates = [lay.dim("col", G - 1)] * phase[1] + [lay.dim("row", G - 1)] * phase[0]
            for sign in (1.0, -1.0):  # GELU(a r) + GELU(-a r) = sqrt(2/pi) (a r)^2 (1 + O(a r)^2)
                fc[u, srcs] = sign * SQ_A
                for g in gates:  # window past the right / bottom border: -GATE, output ~0
                    fc[u, g] = -GATE / M
                lay.put(pw, "nrg", f // 2, 1 / (math.sqrt(2 / math.pi) * SQ_A ** 2 * len(PHASES)), u)
                u += 1
    # Triangular histogram bins of each patch's mean colour (+ the offset the conv lacks):
    # tri(m) = (relu(m - c + w) - 2 relu(m - c) + relu(m - c - w)) / w.
    i = 0
    for ch, ((centres, width), coef) in enumerate(zip(HIST_BINS, OPP)):
        offset = float(coef @ np.asarray(mean))
        for cb in centres:
            for shift, wgt in ((width, 1.0), (0.0, -2.0), (-width, 1.0)):
                fc[u, lay.dim("lin", ch)] = HINGE
                fb[u] = HINGE * (offset - cb + shift)
                lay.put(pw, "hist", i, wgt / (width * HINGE), u)
                u += 1
            i += 1
    assert u <= fc.shape[0], u


def _region_heads(P, pre, lay):
    """Block 1: head r < 5 takes the region-r weighted mean of colour and energies into CLS:
    query 1 on CLS, key log(w_row) + log(w_col) from the one-hots, so softmax weights = w. Head 5
    averages the histogram over all patches. Only the CLS query matters (pool_type 'tok')."""
    W, k = WIDTH, math.sqrt(HEAD) / M  # key weight k * logit: x_onehot = M, q = 1
    w, out = P[pre + "in_proj_weight"], P[pre + "out_proj.weight"]
    cls = lay.dim("cls", 0)
    log_w = lambda p: [math.log(v) if v > 0 else -LOGIT for v in p] + [-LOGIT]  # noqa: E731 (+ "none")
    for h in range(len(REGIONS) + 1):
        h0 = h * HEAD
        w[h0, cls] = 1 / M  # query: CLS +1 (patch tokens -1: they pool something unused)
        if h < len(REGIONS):
            for grp, prof in zip(("row", "col"), REGIONS[h]):
                for j, lw in enumerate(log_w(prof)):
                    w[W + h0, lay.dim(grp, j)] = k * lw
            srcs = [("lin", c, "pcol", 3 * h + c) for c in range(3)] + \
                   [("nrg", o, "pnrg", N_OR * h + o) for o in range(N_OR)]
        else:
            w[W + h0, cls] = -k * LOGIT  # key: every patch token alike, CLS far below
            srcs = [("hist", i, "phist", i) for i in range(len(lay.hist))]
        for j, (g_in, i_in, g_out, i_out) in enumerate(srcs):
            w[2 * W + h0 + j, lay.dim(g_in, i_in)] = 1.0
            lay.put(out, g_out, i_out, 1.0, h0 + j)


def _log_knots() -> tuple[np.ndarray, np.ndarray]:
    """Knots x_j and slope changes of the piecewise-linear log(x + LOG_FLOOR)."""
    x = np.concatenate([[0.0], LOG_FLOOR * LOG_RATIO ** np.arange(LOG_KNOTS)])
    slopes = np.diff(np.log(x + LOG_FLOOR)) / np.diff(x)
    return x[:-1], np.diff(np.concatenate([[0.0], slopes]))


def _log_mlp(P, pre, lay):
    """Block 1 MLP: loge = log(pooled energy + floor) + LOG_SHIFT, as a sum of hinges."""
    fc, fb, pw, pb = P[pre + "c_fc.weight"], P[pre + "c_fc.bias"], P[pre + "c_proj.weight"], P[pre + "c_proj.bias"]
    knots, dslope = _log_knots()
    u = 0
    for i in range(len(lay.pnrg)):
        lay.put(pb, "loge", i, math.log(LOG_FLOOR) + LOG_SHIFT)
        for xk, ds in zip(knots, dslope):
            fc[u, lay.dim("pnrg", i)] = LOG_HINGE
            fb[u] = -LOG_HINGE * xk
            lay.put(pw, "loge", i, ds / LOG_HINGE, u)
            u += 1
    assert u <= fc.shape[0], u


def descriptor_dims(lay) -> dict:
    """Stream dims (CLS after ln_post) of each descriptor part."""
    return {"colour": [int(d) for d in lay.pcol], "hist": [int(d) for d in lay.phist],
            "logenergy": [int(d) for d in lay.loge]}

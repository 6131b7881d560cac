"""Figures of the stats stage (matplotlib, Agg): caption-length histograms (paper Figure 6),
aesthetic-score histogram, filter-score histograms (nsfw, watermark, clip_similarity), status /
reject-reason breakdown. Each takes the pyarrow result of its
SQL file (curation/sql/*.sql: already aggregated, so plotting cost does not grow with the data)
and writes one PNG atomically (_sigma.fs: local or object store).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa

KIND_STYLE = {  # caption kind -> (label, colour)
    "raw": ("raw (alt text)", "#4C72B0"),
    "long": ("long (captioner)", "#DD8452"),
    "derived_short": ("short derived from long", "#55A868"),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, target: str) -> str:
    """PNG bytes -> one atomic write through _sigma.fs (local file or object)."""
    import io

    from _sigma import fs

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    fs.write_bytes(target, buf.getvalue())
    return target


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def caption_length_hist(lengths: pa.Table, target: str) -> str:
    """Overlaid histograms of caption length in words per caption kind, one panel per pipeline.

    `lengths`: pipeline, kind, words, captions (caption_lengths.sql). Y is the share of the kind's
    captions per bin, so kinds of very different counts compare (as in the paper's Figure 6).
    """
    plt = _plt()
    data: dict[str, dict[str, tuple[list, list]]] = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for r in lengths.to_pylist():
        w, c = data[r["pipeline"]][r["kind"]]
        w.append(r["words"])
        c.append(r["captions"])
    pipelines = list(data) or ["(no captions)"]
    fig, axes = plt.subplots(1, len(pipelines), figsize=(7.5 * len(pipelines), 4.5), squeeze=False)
    all_words = np.concatenate([np.repeat(w, c) for d in data.values() for w, c in d.values()] or [np.zeros(0)])
    # Cut the long tail at the 99.5th percentile so the bulk stays readable; the legend keeps exact means.
    hi = max(10, int(np.percentile(all_words, 99.5)) + 1) if all_words.size else 10
    width = max(1, int(np.ceil(hi / 60)))
    bins = np.arange(0, hi + width, width)
    for ax, name in zip(axes[0], pipelines):
        kinds = data.get(name, {})
        if not kinds:
            _empty(ax, "no captions")
            continue
        for kind in sorted(kinds, key=lambda k: list(KIND_STYLE).index(k) if k in KIND_STYLE else 99):
            w, c = (np.asarray(x) for x in kinds[kind])
            hist, _ = np.histogram(np.minimum(w, hi), bins=bins, weights=c)
            label, colour = KIND_STYLE.get(kind, (kind, None))
            mean = float((w * c).sum() / c.sum())
            ax.stairs(hist / c.sum(), bins, fill=True, alpha=0.35, color=colour)
            ax.stairs(hist / c.sum(), bins, color=colour, linewidth=1.5,
                      label=f"{label}: n={c.sum():,}, mean {mean:.1f} words")
        ax.set_xlim(0, bins[-1])
        ax.set_xlabel(f"caption length (words; bins of {width}, last bin holds longer captions)")
        ax.set_ylabel("share of captions")
        ax.set_title(f"Caption length: {name}")
        ax.legend(frameon=False, fontsize=9)
        ax.grid(alpha=0.25)
    fig.tight_layout()
    out = _save(fig, target)
    plt.close(fig)
    return out


def aesthetic_hist(bins: pa.Table, target: str, threshold: float | None = None) -> str:
    """Rows per 0.1-wide aesthetic-score bin, selected rows stacked on the rest (aesthetic_hist.sql)."""
    plt = _plt()
    rows = bins.to_pylist()
    pipelines = list(dict.fromkeys(r["pipeline"] for r in rows)) or ["(no scores)"]
    fig, axes = plt.subplots(1, len(pipelines), figsize=(7.5 * len(pipelines), 4.2), squeeze=False)
    for ax, name in zip(axes[0], pipelines):
        mine = [r for r in rows if r["pipeline"] == name]
        if not mine:
            _empty(ax, "no aesthetic scores (score stage not run)")
            continue
        x = np.array([r["bin"] for r in mine], float)
        sel = np.array([r["selected"] for r in mine], float)
        rest = np.array([r["rows"] for r in mine], float) - sel
        ax.bar(x, rest, width=0.1, align="edge", color="#8C8C8C", label=f"not selected ({int(rest.sum()):,})")
        ax.bar(x, sel, width=0.1, align="edge", bottom=rest, color="#4C72B0", label=f"selected ({int(sel.sum()):,})")
        if threshold is not None:
            ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"aesthetic_min = {threshold:g}")
        ax.set_xlabel("aesthetic score (bins of 0.1)")
        ax.set_ylabel("images")
        ax.set_title(f"Aesthetic scores: {name}")
        ax.legend(frameon=False, fontsize=9)
        ax.grid(alpha=0.25, axis="y")
    fig.tight_layout()
    out = _save(fig, target)
    plt.close(fig)
    return out


FILTERS = (("nsfw", "NSFW probability (LAION CLIP-based detector)", "nsfw_max"),
           ("watermark", "watermark probability (LAION-5B detector)", "watermark_max"),
           ("clip_similarity", "CLIP image-alt text cosine", "clip_similarity_min"))


def filter_hist(bins: pa.Table, target: str, thresholds: dict | None = None) -> str:
    """One panel per (pipeline, filter): rows per bin, selected stacked on the rest, the select
    threshold as a line (filter_hist.sql). Filters no row has a score for get an 'off' panel."""
    plt = _plt()
    rows = bins.to_pylist()
    thresholds = thresholds or {}
    pipelines = list(dict.fromkeys(r["pipeline"] for r in rows)) or ["(no filter scores)"]
    fig, axes = plt.subplots(len(pipelines), len(FILTERS), figsize=(5.2 * len(FILTERS), 3.6 * len(pipelines)),
                             squeeze=False)
    for ax_row, name in zip(axes, pipelines):
        for ax, (col, label, rule) in zip(ax_row, FILTERS):
            mine = [r for r in rows if r["pipeline"] == name and r["filter"] == col]
            if not mine:
                _empty(ax, f"no {col} scores (score.{col if col == 'clip_similarity' else col + '_weights'} off)")
                continue
            x = np.array([r["bin"] for r in mine], float)
            w = float(mine[0]["width"])
            sel = np.array([r["selected"] for r in mine], float)
            rest = np.array([r["rows"] for r in mine], float) - sel
            ax.bar(x, rest, width=w, align="edge", color="#8C8C8C", label=f"not selected ({int(rest.sum()):,})")
            ax.bar(x, sel, width=w, align="edge", bottom=rest, color="#4C72B0", label=f"selected ({int(sel.sum()):,})")
            if thresholds.get(rule) is not None:
                ax.axvline(thresholds[rule], color="#C44E52", linestyle="--", label=f"{rule} = {thresholds[rule]:g}")
            ax.set_xlim(-1 if col == "clip_similarity" else 0, 1)
            ax.set_xlabel(label)
            ax.set_ylabel("images")
            ax.set_title(f"{col}: {name}", fontsize=10)
            ax.legend(frameon=False, fontsize=8)
            ax.grid(alpha=0.25, axis="y")
    fig.tight_layout()
    out = _save(fig, target)
    plt.close(fig)
    return out


def status_breakdown(counts: pa.Table, target: str) -> str:
    """Horizontal bars: rows per status (left), rows per reject reason (right) (status_breakdown.sql)."""
    plt = _plt()
    rows = counts.to_pylist()
    pipelines = list(dict.fromkeys(r["pipeline"] for r in rows)) or ["(empty manifest)"]
    n_bars = max([sum(1 for r in rows if r["pipeline"] == p and r["facet"] == f)
                  for p in pipelines for f in ("status", "reject_reason")] + [1])
    fig, axes = plt.subplots(len(pipelines), 2, figsize=(12, (1.2 + 0.35 * n_bars) * len(pipelines) + 0.6),
                             squeeze=False)
    for (ax_s, ax_r), name in zip(axes, pipelines):
        for ax, facet, title, colour in ((ax_s, "status", "rows per status", "#DD8452"),
                                         (ax_r, "reject_reason", "rows per reject reason (a row may have several)",
                                          "#C44E52")):
            mine = sorted((r for r in rows if r["pipeline"] == name and r["facet"] == facet), key=lambda r: r["rows"])
            if not mine:
                _empty(ax, "none")
                continue
            labels = [r["value"] for r in mine]
            vals = [r["rows"] for r in mine]
            colours = ["#55A868" if v in ("ok", "(selected)") else "#8C8C8C" if v.startswith("(") else colour
                       for v in labels]
            bars = ax.barh(labels, vals, color=colours)
            ax.bar_label(bars, labels=[f"{v:,}" for v in vals], padding=3, fontsize=9)
            ax.set_xlim(0, max(vals) * 1.18)
            ax.set_title(f"{name}: {title}", fontsize=10)
            ax.set_xlabel("rows")
            ax.grid(alpha=0.25, axis="x")
    fig.tight_layout()
    out = _save(fig, target)
    plt.close(fig)
    return out

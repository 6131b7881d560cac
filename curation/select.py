"""Select stage: thresholds only. Adds `selected` and `reject_reason`; never recomputes scores.

`select_batch` is a plain function over a pyarrow batch, so changing a threshold and rerunning
`--stages select` costs a scan of the manifest, nothing more.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from common import manifest
from common.config import fingerprint


def _col(batch: pa.Table, name: str):
    return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows


def select_batch(batch: pa.Table, cfg) -> pa.Table:
    """Return key, selected, reject_reason. All failing reasons are listed, ';'-separated."""
    status, w, h = _col(batch, "status"), _col(batch, "width"), _col(batch, "height")
    aes, dup = _col(batch, "aesthetic"), _col(batch, "duplicate_of")
    selected, reasons = [], []
    for st, wi, hi, a, d in zip(status, w, h, aes, dup):
        r = []
        if st != "ok":
            r.append(st or "no_status")
        else:
            if wi is None or hi is None:
                r.append("not_scored")
            else:
                if min(wi, hi) < cfg.min_side:
                    r.append("too_small")
                ratio = hi / wi
                if ratio > cfg.max_aspect_ratio or ratio < cfg.min_aspect_ratio:
                    r.append("aspect_ratio")
            if cfg.aesthetic_min is not None and (a is None or a < cfg.aesthetic_min):
                r.append("low_aesthetic")
            if cfg.drop_duplicates and d is not None:
                r.append("duplicate")
        selected.append(not r)
        reasons.append(";".join(r) or None)
    return pa.table({"key": batch.column("key"), "selected": pa.array(selected, pa.bool_()),
                     "reject_reason": pa.array(reasons, pa.string())})


def run_select(cfg, out: Path, progress: bool = True) -> dict:
    out = Path(out)
    n_sel = n = 0
    reasons: dict[str, int] = {}
    for p in manifest.list_parts(out):
        fps = manifest.part_fingerprints(out, p)
        fp = fingerprint({"select": cfg.select, "up": [fps.get(s) for s in ("download", "score", "dedup")]})
        if fps.get("select") == fp:
            t = manifest.read_part(out, p, ["selected", "reject_reason"])
        else:
            t = manifest.update_part(out, p, select_batch(manifest.read_part(out, p), cfg.select), "select", fp)
        sel = t.column("selected").to_pylist()
        n += len(sel)
        n_sel += sum(bool(s) for s in sel)
        for r in t.column("reject_reason").to_pylist():
            for x in (r or "").split(";"):
                if x:
                    reasons[x] = reasons.get(x, 0) + 1
    return {"rows": n, "selected": n_sel, "reject_reasons": dict(sorted(reasons.items()))}

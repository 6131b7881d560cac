"""Training curves and a one-line summary from a stage's logs (`<output>/logs/rank-*.jsonl`).

`python -m training.launch` calls `write_report(output_dir)` when a stage ends; it can also be run
alone: `python -m training.report runs/demo/train/demo-256`. Writes `<output>/training_curves.png`
(loss and its running average, lr, grad norm, samples/s per step; rank 0, plus the mean loss over
ranks when several logged) and returns the summary it prints.
"""
from __future__ import annotations

import io
import json
import sys

from _sigma import fs


def read_logs(output_dir) -> dict[int, list[dict]]:
    """rank -> its `step` events in order (a resumed run appends; later lines win per step)."""
    runs: dict[int, list[dict]] = {}
    logs = fs.join(fs.normalize(output_dir), "logs")
    for name in fs.listdir(logs):
        if not (name.startswith("rank-") and name.endswith(".jsonl")):
            continue
        by_step: dict[int, dict] = {}
        for line in fs.read_text(fs.join(logs, name)).splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: skip it
                continue
            if ev.get("event") == "step":
                by_step[int(ev["step"])] = ev
        runs[int(name[len("rank-"):-len(".jsonl")])] = [by_step[s] for s in sorted(by_step)]
    return runs


def summary(runs: dict[int, list[dict]]) -> dict:
    r0 = runs.get(0) or []
    if not r0:
        return {"steps_logged": 0}
    first, last = r0[0], r0[-1]
    sps = [e["samples_per_s"] for e in r0 if e.get("samples_per_s")]
    return {"ranks": len(runs), "steps_logged": len(r0), "first_step": first["step"], "last_step": last["step"],
            "loss_first": round(first["loss_avg"], 5), "loss_last": round(last["loss_avg"], 5),
            "samples_per_s_rank0_median": round(sorted(sps)[len(sps) // 2], 2) if sps else None}


def plot(runs: dict[int, list[dict]], target: str) -> str | None:
    r0 = runs.get(0) or []
    if not r0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in r0]
    fig, ax = plt.subplots(2, 2, figsize=(10, 6.5))
    ax[0, 0].plot(steps, [e["loss"] for e in r0], ".", alpha=0.4, label="loss (rank 0, logged step)")
    ax[0, 0].plot(steps, [e["loss_avg"] for e in r0], "-", label="mean over the log interval")
    if len(runs) > 1:  # every rank logs the same steps: their mean is the global loss
        common = set.intersection(*({e["step"] for e in evs} for evs in runs.values()))
        mean = {s: sum(e["loss_avg"] for evs in runs.values() for e in evs if e["step"] == s) / len(runs)
                for s in common}
        ax[0, 0].plot(sorted(mean), [mean[s] for s in sorted(mean)], "-", label=f"mean of {len(runs)} ranks")
    ax[0, 0].set_yscale("log")
    ax[0, 0].legend(fontsize=8)
    for a, k, title in ((ax[0, 1], "lr", "learning rate"), (ax[1, 0], "grad_norm", "grad norm (before clipping)"),
                        (ax[1, 1], "samples_per_s", "samples/s (rank 0)")):
        a.plot(steps, [e.get(k) for e in r0], "-")
        a.set_title(title, fontsize=9)
    for a in ax.flat:
        a.set_xlabel("step", fontsize=8)
    ax[0, 0].set_title("diffusion loss (eps MSE + VB)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    fs.write_bytes(target, buf.getvalue())  # atomic, local or object store
    return target


def write_report(output_dir) -> dict:
    runs = read_logs(output_dir)
    png = plot(runs, fs.join(fs.normalize(output_dir), "training_curves.png"))
    return {**summary(runs), "curves": str(png) if png else None}


if __name__ == "__main__":
    print(json.dumps(write_report(sys.argv[1]), indent=1))

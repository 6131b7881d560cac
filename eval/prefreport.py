"""Results of a preference study in Fig. 9's form: `<study>/results.json`, `<study>/fig9.png` and the
markdown section of the eval report (eval.report calls `section`).

Sources: `human` (every annotator's votes in votes/) and one `ai:<judge id>` per judge folder in ai/.
Per criterion and source: preference share of each model with its bootstrap CI, the win-rate matrix
(row beats column), Bradley-Terry strengths; per judge the position-bias figures; per criterion
Cohen's kappa between the people and each judge on the (prompt, pair) units both judged.
The chart: one panel per criterion, per model a human bar and a bar per AI judge, CI whiskers.
"""
from __future__ import annotations

import io

from _sigma import fs
from eval.judge import CRITERIA, list_judges, load_records
from eval.prefstats import agreement, ai_comparisons, by_criterion, human_comparisons
from eval.prefstudy import list_studies, load

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")  # human blue, AI orange / green (Fig. 9)


def results(d: str, b: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    study, key = load(d)
    runs = study["runs"]
    vdir = fs.join(d, "votes")
    docs, skipped = [], []
    for n in fs.listdir(vdir):
        if not n.endswith(".json") or n.startswith("."):
            continue
        try:  # a stray or damaged file is named in the results, never fatal to the report
            doc = fs.read_json(fs.join(vdir, n))
            human_comparisons(study, key, [doc])
            docs.append(doc)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            skipped.append(f"{n}: {type(e).__name__}: {str(e)[:200]}")
    human = human_comparisons(study, key, docs)
    res = {"study": study["id"], "dir": d, "runs": runs, "prompts": study["n"], "questions": study["questions"],
           "sources": {"human": {"annotators": len(docs), "answers": sum(len(x["answers"]) for x in docs),
                                 "skipped_files": skipped,
                                 **by_criterion(human, runs, b=b, ci=ci, seed=seed)}},
           "kappa": {}}
    for jd in list_judges(d):
        meta = fs.read_json(fs.join(jd, "judge.json"))
        comps, st = ai_comparisons(load_records(jd))
        name = f"ai:{meta['judge_id']}"
        res["sources"][name] = {"model": meta["model"], "engine": meta["engine"], "answer": meta["answer"],
                                "verdicts": st, **by_criterion(comps, runs, b=b, ci=ci, seed=seed)}
        res["kappa"][name] = agreement(human, comps)
    return res


def chart(res: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs, sources = res["runs"], list(res["sources"])
    fig, axes = plt.subplots(1, len(CRITERIA), figsize=(max(7.0, 1.6 * len(runs) * len(CRITERIA)), 4.2), sharey=True)
    width = 0.8 / len(sources)
    x = np.arange(len(runs))
    for ax, crit in zip(axes, CRITERIA):
        for s, name in enumerate(sources):
            r = res["sources"][name][crit]
            label = "Human" if name == "human" else f"AI ({res['sources'][name]['model'].rstrip('/').split('/')[-1]})"
            if r["share"] is None:
                ax.bar(x + (s - (len(sources) - 1) / 2) * width, np.zeros(len(runs)), width, color=COLOURS[s % 5],
                       label=f"{label}: no votes yet")
                continue
            share = np.array(r["share"]) * 100
            err = None
            if r["share_ci"]:
                lo, hi = np.array(r["share_ci"]).T * 100
                err = np.stack([share - lo, hi - share])
            bars = ax.bar(x + (s - (len(sources) - 1) / 2) * width, share, width, yerr=err, capsize=3,
                          color=COLOURS[s % 5], label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_title({"quality": "Image quality", "alignment": "Image-text alignment"}[crit])
        ax.set_xticks(x, runs, rotation=20, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("preference share (%)")
    axes[0].set_ylim(0, max(10.0, axes[0].get_ylim()[1] * 1.12))  # room for the bar labels
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(sources), fontsize=8, frameon=False)
    fig.suptitle(f"Preference study ({res['prompts']} prompts; {int(100 * _level(res))} % bootstrap CIs over prompts)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # the legend sits under the panels, never on a bar
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    fs.write_bytes(path, buf.getvalue())
    return path


def _level(res: dict) -> float:
    return res["sources"]["human"][CRITERIA[0]]["ci_level"]


def write(d: str, **kw) -> dict:
    """results.json + fig9.png in study folder d; returns the results."""
    res = results(d, **kw)
    res["chart"] = chart(res, fs.join(d, "fig9.png"))
    fs.write_json(fs.join(d, "results.json"), res)
    return res


def _pct(v, ci=None) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def markdown(res: dict, rel_chart: str | None) -> list[str]:
    runs = res["runs"]
    lines = [f"### Study `{fs.basename(res['dir'])}`: {len(runs)} runs, {res['prompts']} prompts", ""]
    if rel_chart:
        lines += [f"![preference shares]({rel_chart})", ""]
    for name, src in res["sources"].items():
        if name == "human":
            lines.append(f"- Human: {src['annotators']} annotators, {src['answers']} answers "
                         "(page: `site/index.html`, `python -m eval.preference serve`)"
                         + (f"; vote files skipped: {'; '.join(src['skipped_files'])}" if src["skipped_files"] else ""))
        else:
            v = src["verdicts"]
            lines.append(f"- {name} (`{src['model']}`, engine {src['engine']}, answer {src['answer']}): "
                         f"{v['requests']} requests, {v['invalid']} invalid, {v['errors']} failed; "
                         f"{v['pairs_judged']} pairs judged in both orders ({v['pairs_incomplete']} incomplete); "
                         f"verdicts disagree across orders (-> tie) {_pct(v['disagree_rate'])} %, position bias "
                         f"(same slot won both orders) {_pct(v['position_bias_rate'])} %, first slot chosen "
                         f"{_pct(v['first_position_share'])} % of decisive verdicts")
    for crit in CRITERIA:
        lines += ["", f"#### {crit}: preference share % [CI] / Bradley-Terry strength", "",
                  "| run | " + " | ".join(res["sources"]) + " |", "|---|" + "---|" * len(res["sources"])]
        for i, r in enumerate(runs):
            cells = []
            for src in res["sources"].values():
                c = src[crit]
                share = None if c["share"] is None else c["share"][i]
                bt = c["bt"]["strength"][i]
                cells.append(_pct(share, c["share_ci"][i] if c["share_ci"] else None)
                             + ("" if bt != bt else f" / {bt:.3f}"))  # NaN: in no comparison
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        for name, src in res["sources"].items():
            c = src[crit]
            if not c["comparisons"]:
                continue
            lines += ["", f"Win rate, {name} ({c['comparisons']} comparisons; row beats column, ties count 1/2):", "",
                      "| | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
            for i, r in enumerate(runs):
                lines.append(f"| {r} | " + " | ".join("–" if v != v else f"{v:.2f}" for v in c["win_rate"][i]) + " |")
    for name, kap in res["kappa"].items():
        lines.append("")
        lines.append(f"Agreement human vs {name} (Cohen's kappa on the (prompt, pair) units both judged): "
                     + "; ".join(f"{c}: " + ("no common units" if not k["units"] else
                                             f"kappa {'n/a' if k['kappa'] is None else format(k['kappa'], '.3f')}, "
                                             f"raw agreement {k['agreement']:.3f}, {k['units']} units")
                                 for c, k in kap.items()))
    return lines


def section(out: str) -> list[str]:
    """The eval report's preference section: every study under <out>/eval/preference/."""
    studies = list_studies(out)
    if not studies:
        return []
    lines = ["", "## Preference studies (eval.preference; PixArt-Sigma Fig. 9)", "",
             "Share = a model's share of all pairwise wins (ties 1/2); for best-of-K human votes the share of "
             "votes naming it best. AI pairs are judged in both orders, disagreeing verdicts count as a tie."]
    for d in studies:
        try:
            res = write(d)
        except (OSError, ValueError, KeyError) as e:  # one broken study must not take the report down
            lines += ["", f"### Study `{fs.basename(d)}`: could not be summarised ({type(e).__name__}: {str(e)[:300]})"]
            continue
        rel = fs.join("preference", fs.basename(d), "fig9.png")
        lines += [""] + markdown(res, rel)
    return lines


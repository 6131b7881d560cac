"""`python -m curation.stats --config pipelines.yaml --pipeline NAME [--pipeline OTHER ...] [--output DIR]
[--set section.key=value] [--paper] [--no-progress]`

Extracts caption nouns for each named pipeline's output (resumable, same folders as curation.run),
then prints Table 1 over all of them and writes the report into the FIRST pipeline's
`<output>/report/`. `--output` and `--set` apply to the first pipeline only, and so do its
`stats.slices` / `stats.vn_min_count` (the same slices are cut from every output). With several
pipelines, Table 1 also has rows for their union (pipeline `a+b`).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
if not os.environ.get("RAY_ADDRESS"):  # embedded Ray on the loopback address; never for a cluster's job
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from _sigma.config import ConfigError, save_resolved  # noqa: E402
from _sigma.runlock import run_lock  # noqa: E402
from curation.config import add_pipeline_args, load_pipeline, pipeline_from_args  # noqa: E402


def parse_args(argv=None):
    from _sigma.cli import make_parser

    ap = make_parser("sigma-stats", "Caption statistics (PixArt-Sigma Table 1, Figure 6) of pipeline outputs.\n"
                     "Reads <output>/manifest of each --pipeline (run sigma-curate first).")
    add_pipeline_args(ap, output=True, many=True)  # the report goes to the first pipeline
    ap.add_argument("--paper", action="store_true", help="print the paper's Table 1 rows beside ours")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from _sigma import fs, manifest
    from curation.stats import build_report, extract_nouns

    args = parse_args(argv)
    try:
        # --set / --output apply to the first pipeline; stats needs no model files; saved once locked
        cfgs = [pipeline_from_args(args, name=args.pipeline[0], save=False)]
        cfgs += [load_pipeline(args.config, name, check=False) for name in args.pipeline[1:]]
        for cfg in cfgs:
            if not manifest.list_parts(cfg.out):
                raise ConfigError(f"{cfg.out} has no manifest: run `sigma-curate --pipeline {cfg.name}` first")
        primary = cfgs[0]
        with contextlib.ExitStack() as locks:  # one writer per output: it writes nouns into each
            for out in dict.fromkeys(c.out for c in cfgs):
                locks.enter_context(run_lock(out))
            from _sigma.cli import route_logs

            route_logs(primary.out, False, "stats")  # Ray Data's logs; our bars and Table 1 stay here
            rep = _run(args, cfgs, primary, extract_nouns, build_report)
    except ConfigError as e:
        from _sigma.cli import user_error

        return user_error("sigma-stats", str(e))
    print("\n=== Table 1 (caption statistics) ===")
    print(rep["text"])
    print("written:\n  " + "\n  ".join(rep["files"]))
    return 0


def _run(args, cfgs, primary, extract_nouns, build_report) -> dict:
    from _sigma import fs

    save_resolved(primary, primary.out, extra={"entry_point": "curation.stats",
                                               "compared_with": [c.name for c in cfgs[1:]]})
    for cfg in cfgs:
        print(f"--- caption nouns: {cfg.name} ({cfg.out})", flush=True)
        print(json.dumps(extract_nouns(cfg, cfg.out, progress=not args.no_progress)), flush=True)
    from curation.stats import filter_thresholds

    return build_report([c.out for c in cfgs], [c.name for c in cfgs], primary.stats, fs.join(primary.out, "report"),
                        primary.select.aesthetic_min, paper=args.paper, thresholds=filter_thresholds(primary.select))


if __name__ == "__main__":
    sys.exit(main())

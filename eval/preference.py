"""Human and AI preference studies across 2..N generation runs (PixArt-Sigma's main evaluation, Fig. 9).

  python -m eval.preference build   --config pipelines.yaml --pipeline NAME --runs RUN1 RUN2 RUN3 ...
                                    [--n 300] [--seed 0] [--name STUDY] [--ranking]
  python -m eval.preference serve   --dir <output>/eval/preference/STUDY [--host 127.0.0.1] [--port 8765]
  python -m eval.preference judge   --config pipelines.yaml --pipeline NAME --study STUDY [--versus RUN]
                                    [--set eval.judge.model=...]            (the VLM judge; resumable)
  python -m eval.preference results --config pipelines.yaml --pipeline NAME --study STUDY

`build` draws the prompts from the pipeline's current benchmark and writes the study and its page
(eval.prefstudy); `serve` runs the allow-list server annotators open (eval.prefserver; `--host
0.0.0.0` lets remote annotators in); `judge` asks the configured VLM every pair of runs in both
orders on both criteria (eval.judge, eval.judge_engines); `results` writes results.json and the
Fig. 9-style chart fig9.png into the study folder (eval.prefreport); the eval report (eval.score)
shows every study.
"""
from __future__ import annotations

import json

from _sigma import fs
from _sigma.config import ConfigError


def main(argv=None):
    from curation.config import add_pipeline_args, pipeline_from_args

    from _sigma.cli import make_parser

    ap = make_parser("sigma-eval-preference", "Human and AI preference studies (PixArt-Sigma Fig. 9).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = add_pipeline_args(sub.add_parser("build", help="draw the prompts, write the study and its page"))
    b.add_argument("--runs", nargs="+", required=True, help="2..N generation runs (eval.generate --name)")
    b.add_argument("--n", type=int, default=300, help="prompts (the paper: 300)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--name", help="study name (default: the run names joined)")
    b.add_argument("--ranking", action="store_true", help="annotators rank all images instead of picking the best")
    s = sub.add_parser("serve", help="serve the study page to annotators and record their answers")
    s.add_argument("--dir", required=True, help="the study folder (<output>/eval/preference/STUDY; local or URI)")
    s.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 for remote annotators")
    s.add_argument("--port", type=int, default=8765)
    j = add_pipeline_args(sub.add_parser("judge", help="the AI judge (eval.judge config) over the study"))
    j.add_argument("--study", required=True)
    j.add_argument("--versus", help="only pairs with this run (the paper's GPT-4V setting)")
    j.add_argument("--limit", type=int, help="ask at most this many requests now (the rest on the next run)")
    r = add_pipeline_args(sub.add_parser("results", help="results.json + fig9.png of the study"))
    r.add_argument("--study", required=True)
    r.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args(argv)

    from eval import prefstudy

    if args.cmd == "serve":
        from eval.prefserver import serve

        serve(fs.normalize(args.dir), args.host, args.port)
        return None
    cfg = pipeline_from_args(args, save=False)  # the study folder records its own inputs
    if args.cmd == "build":
        try:
            d = prefstudy.ensure_study(cfg, args.runs, args.n, args.seed, args.name, args.ranking)
        except (ValueError, FileNotFoundError) as e:  # the user's runs / names / benchmark: one line, exit 2
            raise ConfigError(str(e)) from None
        html = prefstudy.build_site(cfg, d)
        study, _ = prefstudy.load(d)
        note = "" if study["n"] == args.n else f" (only {study['n']} of the {args.n} asked have an image in every run)"
        print(f"[eval.preference] study {d}: {len(args.runs)} runs, {study['n']} prompts{note}\n  page: {html}\n"
              f"  serve it: python -m eval.preference serve --dir {d} [--host 0.0.0.0]", flush=True)
        return d
    try:
        d = prefstudy.study_dir(cfg.out, args.study)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not fs.isfile(fs.join(d, "study.json")):
        raise ConfigError(f"--study {args.study}: no study at {d} (run `eval.preference build` first)")
    if args.cmd == "judge":
        from eval.judge import run_judge

        res = run_judge(cfg, d, versus=args.versus, limit=args.limit)
        print(f"[eval.preference] judge {res['judge_id']}: asked {res['asked']} (already answered {res['already']}): "
              f"A {res['A']}, B {res['B']}, tie {res['tie']}, invalid {res['invalid']}, failed {res['error']}\n"
              f"  records: {res['dir']}", flush=True)
        return res
    from eval.prefreport import write

    res = write(d, b=args.bootstrap)
    print(json.dumps({k: res[k] for k in ("study", "runs", "prompts", "kappa", "chart")}, indent=2, default=str))
    return res


if __name__ == "__main__":
    main()

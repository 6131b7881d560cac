"""Console scripts of the eval commands ([project.scripts] in pyproject.toml), and their parsers.

The parsers live here, free of torch, so that `--help`, `--version` and mistakes in the arguments
(an unknown pipeline or stage, a missing checkpoint or model file) answer at once, before the
models load and before anything is written; each module's `main(argv)` parses with the same parser
and returns its results to a Python caller (tests, notebooks). A console script returns an exit
status instead: 0, or 2 for an error in the user's input.
"""
from __future__ import annotations

import importlib
import sys

from _sigma.cli import add_verbose, make_parser, route_logs, user_error
from _sigma.config import ConfigError


def _pipeline_parser(prog: str, doc: str):
    from _sigma.cli import pipelines_note
    from curation.config import add_pipeline_args

    ap = add_pipeline_args(make_parser(prog, doc, "pipelines: the names under `pipelines:` of --config"
                                                  + pipelines_note()))
    add_verbose(ap)
    return ap


def benchmark_parser():
    ap = _pipeline_parser("sigma-eval-benchmark", "Build the eval benchmark and its hold-out list (the eval_split "
                          "stage of sigma-curate, run alone).")
    ap.add_argument("--allow-smaller", action="store_true", help="build fewer than eval.n pairs instead of failing")
    return ap


def generate_parser():
    ap = _pipeline_parser("sigma-eval-generate", "Generate one image per benchmark prompt from a checkpoint.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint folder, stage output (its latest), diffusers folder or .pth")
    src.add_argument("--stage", help="a training stage of the config: its latest checkpoint")
    ap.add_argument("--name", default=None,
                    help="run name (default: <stage>-<step folder> with --stage, else the checkpoint's name)")
    ap.add_argument("--no-ray", action="store_true", help="generate in this process (debugging)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts of the plan (default: all)")
    return ap


def score_parser():
    ap = _pipeline_parser("sigma-eval-score", "Score generation runs (FID, KID, CLIP-Score, rewards) and write the report.")
    ap.add_argument("--run", action="append", default=[], help="generation run name (repeatable; default: all)")
    ap.add_argument("--stage", action="append", default=[],
                    help="runs of a training stage (<stage>-step-*, as sigma-eval-generate --stage names them)")
    ap.add_argument("--device", default=None, help="cuda / mps / cpu (default: the best available)")
    return ap


def table3_parser():
    ap = _pipeline_parser("sigma-eval-table3", "PixArt-Sigma Table 3 for a list of checkpoints (KV-compression "
                          "variants): FID, CMMD, CLIP-Score on the benchmark prompts, train and test latency "
                          "measured interleaved in one process; markdown + CSV under <output>/eval/table3/.")
    ap.add_argument("--checkpoint", dest="checkpoints", action="append", default=[],
                    help="LABEL=PATH: a checkpoint folder, stage output (its latest), diffusers folder or .pth "
                         "(repeatable; default: none)")
    ap.add_argument("--stage", action="append", default=[],
                    help="a training stage of the config: its latest checkpoint, labelled with the stage name "
                         "(repeatable; default: none)")
    ap.add_argument("--name", default="table3", help="output name: <output>/eval/table3/<name>.md|.csv|.json")
    ap.add_argument("--train-batch", type=int, default=384, help="batch of the timed training iteration (paper: 384)")
    ap.add_argument("--train-resolution", type=int, default=None, help="pixels of the training iteration "
                    "(default: eval.resolution)")
    ap.add_argument("--test-resolution", type=int, default=None, help="pixels of the timed image "
                    "(default: eval.resolution)")
    ap.add_argument("--test-steps", type=int, default=None, help="sampler steps of the timed image (default: eval.steps)")
    ap.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds over all checkpoints")
    ap.add_argument("--warmup", type=int, default=1, help="discarded rounds before the timed ones")
    ap.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing in the training iteration")
    ap.add_argument("--no-latency", action="store_true", help="only the FID / CMMD / CLIP-Score columns")
    ap.add_argument("--rescore", action="store_true", help="score again even when a run has a current score")
    ap.add_argument("--device", default=None, help="cuda / mps / cpu (default: the best available)")
    return ap


def _check(args, models: tuple[str, ...]) -> str:
    """Config, pipeline, model files of `models` sections, --checkpoint / --stage: ConfigError.
    Returns the pipeline's output."""
    from _sigma import fs
    from curation.config import load_pipeline

    overrides = list(getattr(args, "overrides", ()))
    if getattr(args, "output", None):
        overrides.append(f"output={args.output}")
    cfg = load_pipeline(args.config, args.pipeline, overrides, check=list(models))
    ckpt = getattr(args, "checkpoint", None)
    if ckpt and not fs.exists(ckpt) and not (fs.is_remote(ckpt) and fs.isdir(ckpt)):
        raise ConfigError(f"--checkpoint {ckpt}: no such file or folder")
    for spec in getattr(args, "checkpoints", None) or []:  # sigma-eval-table3: LABEL=PATH
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise ConfigError(f"--checkpoint {spec}: expected LABEL=PATH")
        if not fs.exists(path) and not (fs.is_remote(path) and fs.isdir(path)):
            raise ConfigError(f"--checkpoint {path}: no such file or folder")
    stage = getattr(args, "stage", None)
    for st in [stage] if isinstance(stage, str) else (stage or []):
        from _sigma.config import load_yaml

        stages = (load_yaml(args.config).get("training") or {})
        if st not in stages:
            raise ConfigError(f"--stage {st}: no such training stage; stages: {', '.join(sorted(stages))}")
    return cfg.out


def _script(module: str, parser, models: tuple[str, ...], prog: str):
    def run(argv=None) -> int:
        argv = sys.argv[1:] if argv is None else argv
        if parser is not None:
            args = parser().parse_args(argv)
            try:
                out = _check(args, models)
            except ConfigError as e:
                return user_error(prog, str(e))
            try:  # Ray Data's logs: <output>/logs/eval-<command>.log (--verbose: here too)
                route_logs(out, args.verbose, f"eval-{module}")
            except OSError as e:
                return user_error(prog, f"{out}: cannot write <output>/logs ({e.strerror or e})")
        try:
            importlib.import_module(f"eval.{module}").main(argv)
        except ConfigError as e:  # found once running (a benchmark too small, a run without images, ...)
            return user_error(prog, str(e))
        return 0

    run.__name__ = module
    return run


build_benchmark = _script("build_benchmark", benchmark_parser, (), "sigma-eval-benchmark")
generate = _script("generate", generate_parser, ("features", "eval"), "sigma-eval-generate")
score = _script("score", score_parser, ("score", "eval"), "sigma-eval-score")
preference = _script("preference", None, (), "sigma-eval-preference")  # its parser is light (eval.preference)
table3 = _script("table3", table3_parser, ("features", "score", "eval"), "sigma-eval-table3")

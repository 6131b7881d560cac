"""`sigma-train --config pipelines.yaml --stage NAME [--set k=v ...]` (= python -m training.launch)

Runs one training stage:
- on Ray Train (default): `TorchTrainer` with `ScalingConfig(num_workers, use_gpu)` from the stage
  config, gloo backend on CPU (nccl on GPU), RunConfig storage under <stage output>/ray. Each worker
  calls training.train.train(cfg, rank, world_size) in the process group Ray set up.
- under torchrun: `torchrun --nproc-per-node N -m training.launch --torchrun --config ... --stage ...`
  (also picked automatically when WORLD_SIZE/RANK are in the environment).
- `--local`: one plain process, no Ray (handy for debugging).
Overrides are relative to the stage (`--set steps=10 --set model.kv_compress_ratio=2`).
`--trust-pickle` allows an `init_from` .pth that needs a full pickle load (it can run code).
Data and output are local paths or URIs (s3://, gs://); Ray Train's storage_path is <output>/ray.
The resolved config is saved as <stage output>/config.resolved.yaml before any work starts.
"""
from __future__ import annotations

import os
import sys

from _sigma import fs
from _sigma.config import ConfigError, add_config_args, check_paths, save_resolved, to_dict
from training.config import TrainStageConfig, load_stage, stage_from_dict


def _check(cfg: TrainStageConfig) -> None:
    """Fail before starting Ray when the inputs of the stage are missing or do not fit."""
    from _sigma.shards import read_index
    from training.checkpoint import latest, resolve

    try:
        index = read_index(cfg.shards_dir)
    except FileNotFoundError:
        raise ConfigError(f"training.{cfg.name}.data: {fs.join(cfg.shards_dir, 'index.json')} does not exist "
                          "(run the features stage for this resolution first)") from None
    if index.get("resolution") is not None and int(index["resolution"]) != cfg.resolution:
        raise ConfigError(f"training.{cfg.name} has resolution {cfg.resolution} but its shards {cfg.shards_dir} "
                          f"were written at {index['resolution']}")
    check_paths(cfg)
    if cfg.init_from and latest(cfg.output_dir) is None:  # (a resumed stage does not need it)
        src = cfg.init_from
        if not fs.isfile(src) and resolve(src) is None:
            raise ConfigError(f"training.{cfg.name}.init_from: no checkpoint in {src} "
                              "(run the previous stage first, or give an official .pth)")


def _ray_worker(config: dict) -> None:
    """Body of every Ray Train worker (the process group is already initialised by Ray)."""
    import ray.train

    from training.train import train

    ctx = ray.train.get_context()
    cfg = stage_from_dict(config["stage"], config["stage"]["name"])
    train(cfg, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())


def run_ray(cfg: TrainStageConfig, log: str | None = None):
    """Ray Train. `log`: the file for Ray's own output (the console keeps our progress and summary)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        if log:
            from _sigma.cli import reroute_logs

            reroute_logs()  # `import ray` set its loggers up afresh
        if os.environ.get("RAY_ADDRESS"):
            ray.init(configure_logging=not log)
        else:
            ray.init(include_dashboard=False, configure_logging=False)
        if log:
            from _sigma.raystage import route_worker_output

            # rank 0's bar ("train NAME: ...") and summary ("[train NAME] ...") stay on the console
            route_worker_output(r"^\[train |^\s*train \S+:", log)
    out = cfg.output_dir
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"stage": to_dict(cfg)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=f"train-{cfg.name}", storage_path=fs.join(out, "ray")),
    )
    return trainer.fit()


def run_torchrun(cfg: TrainStageConfig) -> dict:
    import torch.distributed as dist

    from training.train import train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cfg.use_gpu else "gloo")
    try:
        return train(cfg, rank, world, local)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stage_names(config: str) -> list[str]:
    import yaml

    try:
        with open(config) as f:
            return sorted((yaml.safe_load(f) or {}).get("training") or {})
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def main(argv=None) -> int:
    from _sigma.cli import add_verbose, make_parser, route_logs, user_error

    stages = _stage_names("pipelines.yaml")
    ap = make_parser("sigma-train", __doc__, "training stages of pipelines.yaml here: " + (", ".join(stages) or "none")
                     + "\n(each stage's `resources` sets workers, GPUs and batch size; see docs/guide.md)")
    add_config_args(ap, "override a key of the stage, relative to it (steps=10, model.kv_compress_ratio=2)")
    ap.add_argument("--stage", required=True, help="a training stage of the config")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--torchrun", action="store_true",
                      help="run under torchrun (env WORLD_SIZE/RANK): torchrun --nproc-per-node N -m training.launch ...")
    mode.add_argument("--local", action="store_true", help="one process, no Ray")
    ap.add_argument("--trust-pickle", action="store_true",
                    help="allow an init_from .pth that needs a full pickle load (it can run code)")
    add_verbose(ap)
    args = ap.parse_args(argv)
    try:
        cfg = load_stage(args.config, args.stage, args.overrides + (["trust_pickle=true"] if args.trust_pickle else []))
        _check(cfg)
    except ConfigError as e:
        return user_error("sigma-train", str(e))
    under_torchrun = args.torchrun or ("WORLD_SIZE" in os.environ and "RANK" in os.environ)
    if not under_torchrun or int(os.environ.get("RANK", "0")) == 0:
        derived = {"base_size": cfg.base_size, "pe_interpolation": cfg.pe_interpolation,
                   "model_kwargs": cfg.model_kwargs(), "lr_scaled": cfg.scaled_lr(cfg.num_workers)}
        save_resolved(cfg, cfg.output_dir, extra={"stage": cfg.name, "derived": derived,
                                                  "config_file": fs.normalize(args.config)})
    if under_torchrun:
        run_torchrun(cfg)
    elif args.local:
        from training.train import train

        train(cfg, 0, 1)
    else:
        log = route_logs(cfg.output_dir, args.verbose, f"train-{cfg.name}")
        if not args.verbose:
            print(f"(Ray Train logs: {log}; --verbose shows them here)", flush=True)
        result = run_ray(cfg, None if args.verbose else log)
        if getattr(result, "error", None):
            print(f"training failed: {result.error}", file=sys.stderr)
            return 1
    from training.checkpoint import latest

    if int(os.environ.get("RANK", "0")) == 0:
        from training.report import write_report

        rep = write_report(cfg.output_dir)
        print(f"[launch] stage {cfg.name}: latest checkpoint {latest(cfg.output_dir)}; "
              f"logs {fs.join(cfg.output_dir, 'logs')}; curves {rep.pop('curves')}\n[launch] {rep}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

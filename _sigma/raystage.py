"""The one adapter between stages and Ray Data.

Stages are plain functions over a pyarrow batch, or model-backed classes (load in `__init__`, run in
`__call__`); neither imports Ray. Here they become `map_batches` steps with the resources their
config names. How results are committed (by workers, never by the driver) is _sigma.partstage.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable



def init_ray(ray_cfg=None, quiet: bool = True):
    """Embedded local Ray, or the cluster named by ray_cfg.address / $RAY_ADDRESS (`ray job submit`)."""
    address = getattr(ray_cfg, "address", None) or os.environ.get("RAY_ADDRESS")
    if not address:  # "0" pins an embedded Ray to the loopback address; it would refuse a cluster
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return ray
    routed = bool(os.environ.get("SIGMA_LOG_DIR"))  # _sigma.cli.route_logs: library logs go to <output>/logs
    if routed:  # `import ray` set up its loggers afresh: attach the log file again
        from _sigma.cli import reroute_logs

        reroute_logs()
    kwargs: dict[str, Any] = {"configure_logging": not routed, "logging_level": "WARNING", "log_to_driver": not quiet}
    if address:
        ray.init(address=address, **kwargs)
    else:
        num_cpus = getattr(ray_cfg, "num_cpus", None)
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # Ray Data's per-operator bars: off when its logs are routed (our stage bars and summaries stay)
    ctx.enable_progress_bars = bool(getattr(ray_cfg, "progress_bars", True)) and not routed
    if routed:  # importing ray.data installed its console handler again
        from _sigma.cli import reroute_logs

        reroute_logs()
    ctx.execution_options.preserve_order = False
    return ray


def map_stage(ds, stage: Callable | type, res, constructor_kwargs: dict | None = None,
              batch_format: str = "pyarrow", runtime_env: dict | None = None):
    """Turn a stage into a Ray Data step with the resources `res` (a _sigma.config.Resources)."""
    from ray.data import ActorPoolStrategy

    common = dict(batch_size=res.batch_size, batch_format=batch_format, num_cpus=res.num_cpus,
                  runtime_env=runtime_env or None)
    if inspect.isclass(stage):
        return ds.map_batches(stage, fn_constructor_kwargs=constructor_kwargs or {},
                              compute=ActorPoolStrategy(size=res.actors), num_gpus=res.num_gpus or None, **common)
    return ds.map_batches(stage, **common)


def route_worker_output(keep: str, log_path: str) -> bool:
    """Print only the worker lines matching the regex `keep` (our progress bars and summaries,
    without Ray's `(Actor pid=...)` prefix); every other line of every Ray worker (Ray Train's
    controller, Ray Data inside training workers) goes to `log_path`, prefixed with its source.
    Replaces the driver's standard handler of forwarded worker output (Ray 2.60's dispatcher);
    returns False, changing nothing, where that dispatcher is not there."""
    import re
    import sys
    import threading

    from ray._private import worker as ray_worker

    disp = getattr(ray_worker, "global_worker_stdstream_dispatcher", None)
    if disp is None or not hasattr(disp, "remove_handler"):
        return False
    pattern, lock = re.compile(keep), threading.Lock()

    def handle(data: dict) -> None:
        src = data.get("actor_name") or data.get("task_name") or "worker"
        shown, logged = [], []
        for line in data.get("lines", ()):
            (shown if src.startswith("RayTrainWorker") and pattern.search(line) else logged).append(line)
        if shown:
            sink = sys.stderr if data.get("is_err") else sys.stdout
            sink.write("".join(ln.rstrip("\n") + "\n" for ln in shown))
            sink.flush()
        if logged:
            with lock, open(log_path, "a") as f:
                f.writelines(f"({src} pid={data.get('pid')}) {ln.rstrip()}\n" for ln in logged)

    disp.remove_handler("ray_print_logs")
    disp.add_handler("ray_print_logs", handle)
    return True

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
    kwargs: dict[str, Any] = {"configure_logging": True, "logging_level": "WARNING", "log_to_driver": not quiet}
    if address:
        ray.init(address=address, **kwargs)
    else:
        num_cpus = getattr(ray_cfg, "num_cpus", None)
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bool(getattr(ray_cfg, "progress_bars", True))
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

"""The one adapter between stages and Ray Data.

Stages are plain functions over a pyarrow batch, or model-backed classes (load in `__init__`, run in
`__call__`); neither imports Ray. Here they become `map_batches` steps with the resources their
config names, and results stream back to the driver, which commits each part atomically as soon as
all of its rows have arrived (that is what makes every stage resumable).
"""
from __future__ import annotations

import inspect
import os
from collections import defaultdict
from typing import Any, Callable

import pyarrow as pa

PART_COL = "_part"  # carried through a stage so results can be regrouped per manifest part


def init_ray(ray_cfg=None, quiet: bool = True):
    """Embedded local Ray, or the cluster named by ray_cfg.address / $RAY_ADDRESS (`ray job submit`)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return ray
    address = getattr(ray_cfg, "address", None) or os.environ.get("RAY_ADDRESS")
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
    """Turn a stage into a Ray Data step with the resources `res` (a common.config.Resources)."""
    from ray.data import ActorPoolStrategy

    common = dict(batch_size=res.batch_size, batch_format=batch_format, num_cpus=res.num_cpus,
                  runtime_env=runtime_env or None)
    if inspect.isclass(stage):
        return ds.map_batches(stage, fn_constructor_kwargs=constructor_kwargs or {},
                              compute=ActorPoolStrategy(size=res.actors), num_gpus=res.num_gpus or None, **common)
    return ds.map_batches(stage, **common)


def collect_by_part(ds, expected: dict[int, int], on_part: Callable[[int, pa.Table], None],
                    desc: str = "rows", progress: bool = True) -> dict[int, int]:
    """Stream a stage's output to the driver; call `on_part(part, table)` once per complete part.

    `expected[part]` is how many rows that part sends. Raises if a part comes back incomplete,
    since committing it would silently lose rows.
    """
    from tqdm import tqdm

    buffers: dict[int, list[pa.Table]] = defaultdict(list)
    counts: dict[int, int] = defaultdict(int)
    done: dict[int, int] = {}
    total = sum(expected.values())
    bar = tqdm(total=total, desc=desc, unit="row", disable=not progress or total == 0, mininterval=1.0)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if batch.num_rows == 0:
            continue
        parts = batch.column(PART_COL).to_pylist()
        for part in sorted(set(parts)):
            mask = pa.array([p == part for p in parts])
            piece = batch.filter(mask).drop_columns([PART_COL])
            buffers[part].append(piece)
            counts[part] += piece.num_rows
            bar.update(piece.num_rows)
            if counts[part] == expected.get(part, -1):
                on_part(part, pa.concat_tables(buffers.pop(part), promote_options="permissive"))
                done[part] = counts[part]
    bar.close()
    missing = {p: (counts.get(p, 0), n) for p, n in expected.items() if p not in done and n > 0}
    if missing:
        raise RuntimeError(f"{desc}: parts came back incomplete (got, expected): {missing}")
    return done

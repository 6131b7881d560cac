"""Part stages on Ray: workers write what they compute, the driver only coordinates.

A stage over the manifest is four steps, each here once:
1. plan: which parts are pending (`pending_parts`, from the fingerprints in the part footers) and
   how many rows each will send (`run_tasks` over a small per-part counting function);
2. read: `read_images` (a `flat_map` step) yields a part's rows with their downloaded image bytes;
3. run: the stage's own batch function or model-backed class (`_sigma.raystage.map_stage`);
4. commit: `commit_groups` appends a step that writes each output block as per-part *pieces*
   under `<output>/_work/<stage>/<run>/` (on the worker that computed them) and sends the driver
   one small row per piece (part, rows, path). Once a part's pieces hold all its rows, a commit
   task on some worker merges them and writes the part (manifest part, shard, ...) with one atomic
   commit, then deletes the pieces. The driver never sees row data or embeddings, only counts,
   piece names and the per-part summaries that commit functions return.

A group need not be a manifest part: the features stage groups rows by output shard. Commit
tasks are spread over the nodes (`SPREAD`) and report the node they ran on, so a run's summary
shows where work happened. Pieces of a killed run are deleted when the stage starts again
(one writer per output is assumed: the run lock).
"""
from __future__ import annotations

import io
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from _sigma import faults, fs, manifest

PART_COL = "_part"  # carried through a stage so results can be regrouped per part (or shard)
WORK = "_work"


def pending_parts(out: str, stage: str, fp: str, parts: Iterable[int] | None = None) -> list[int]:
    """Parts whose `stage` fingerprint differs from `fp` (footer reads, in parallel threads)."""
    parts = manifest.list_parts(out) if parts is None else list(parts)
    with ThreadPoolExecutor(16) as ex:
        done = list(ex.map(lambda p: manifest.stage_done(out, p, stage, fp), parts))
    return [p for p, d in zip(parts, done) if not d]


def _node_id() -> str | None:
    try:
        import ray

        if not ray.is_initialized():  # get_runtime_context() would start a local Ray
            return None
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (tests calling a commit directly)
        return None


def _call(fn: Callable, item: Any, kwargs: dict, gate: tuple | None = None) -> dict:
    faults.before_commit(gate, repr(item)[:300])  # kill tests: at most n commits of the stage (_sigma.faults)
    result = fn(item, **kwargs) or {}
    result.setdefault("node", _node_id())
    return result


def run_tasks(fn: Callable[..., dict | None], items: list, *, kwargs: dict | None = None, desc: str = "tasks",
              progress: bool = True, stage: str | None = None, max_in_flight: int = 64) -> list[dict]:
    """fn(item, **kwargs) -> small dict, one Ray task per item, spread over the nodes; results in
    item order, each with the `node` it ran on. `stage` names commits for fault injection.
    Outside Ray (unit tests, one-off tools) the same calls run in this process."""
    import ray
    from tqdm import tqdm

    if not items:
        return []
    if not ray.is_initialized():
        out = []
        for item in items:
            out.append(_call(fn, item, kwargs or {}))
            if stage:
                faults.after_commit(stage)
        return out
    remote = ray.remote(num_cpus=0.25, max_retries=2)(_call).options(scheduling_strategy="SPREAD")
    fn_ref, kw_ref = ray.put(fn), ray.put(kwargs or {})
    gate = faults.gate(stage) if stage else None
    results: list[dict | None] = [None] * len(items)
    pending: dict = {}
    queue = list(enumerate(items))[::-1]
    bar = tqdm(total=len(items), desc=desc, unit="task", disable=not progress, mininterval=1.0)
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            i, item = queue.pop()
            pending[remote.remote(fn_ref, item, kw_ref, gate)] = i
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            results[pending.pop(ref)] = ray.get(ref)
            bar.update(1)
            if stage:
                faults.after_commit(stage)
    bar.close()
    return results  # type: ignore[return-value]


def read_images(item: dict, rows_fn: Callable[[str, int], list[dict]] | None = None) -> Iterator[dict]:
    """flat_map step: item {"out", "part"}; the part's rows are `rows_fn(out, part)` (the same
    function the stage's plan counted with), else every downloaded image of the part.

    Yields each row (which may carry its own `_part`, e.g. a shard id) plus `image`: the original
    bytes, or None when the key is not in the part's download tar (the stage records why)."""
    from _sigma.images import iter_download_images

    out, part = item["out"], int(item["part"])
    rows = rows_fn(out, part) if rows_fn is not None else None
    if rows is None:
        for key, data in iter_download_images(out, part):
            yield {PART_COL: part, "key": key, "image": data}
        return
    wanted = {r["key"]: r for r in rows}
    for key, data in iter_download_images(out, part, set(wanted)):
        r = wanted.pop(key, None)
        if r is not None:
            yield {PART_COL: part, **r, "image": data}
    for r in wanted.values():
        yield {PART_COL: part, **r, "image": None}


def _write_pieces(batch: pa.Table, work: str) -> pa.Table:
    """Write one output block as one parquet piece per group; return (group, rows, piece) rows."""
    import pyarrow.compute as pc

    groups, rows, names = [], [], []
    if batch.num_rows:
        col = batch.column(PART_COL)
        for g in pc.unique(col).to_pylist():
            piece = batch.filter(pc.equal(col, g)).drop_columns([PART_COL])
            uri = fs.join(work, f"g-{g}", f"{uuid.uuid4().hex}.parquet")
            buf = io.BytesIO()
            import pyarrow.parquet as pq

            pq.write_table(piece, buf, compression="lz4")
            fs.write_bytes(uri, buf.getvalue())
            groups.append(int(g)), rows.append(piece.num_rows), names.append(uri)
    return pa.table({"group": pa.array(groups, pa.int64()), "rows": pa.array(rows, pa.int64()),
                     "piece": pa.array(names, pa.string())})


def _commit(commit: Callable, group: int, pieces: list[str], expected: int, kwargs: dict,
            gate: tuple | None = None) -> dict:
    """On a worker: the group's rows from its pieces -> commit(group, table, **kwargs)."""
    tables = [fs.read_parquet(p) for p in pieces]
    table = pa.concat_tables(tables, promote_options="permissive") if tables else None
    got = table.num_rows if table is not None else 0
    if got != expected:
        raise RuntimeError(f"group {group}: {got} rows in its pieces, expected {expected}")
    faults.before_commit(gate, group)  # kill tests: at most n commits of the stage (_sigma.faults)
    summary = commit(group, table, **kwargs) or {}
    for p in pieces:
        fs.delete(p)
    summary = dict(summary, group=group)
    summary.setdefault("node", _node_id())
    return summary


def commit_groups(ds, expected: dict[int, int], commit: Callable[..., dict | None], *, out: str, stage: str,
                  kwargs: dict | None = None, desc: str | None = None, progress: bool = True,
                  max_in_flight: int = 8) -> dict[int, dict]:
    """Drive `ds` (rows with PART_COL) to the end; commit each group once all its rows are written.

    `commit(group, table | None, **kwargs) -> summary` runs in a Ray task; `table` holds the
    group's rows (None for a group that expects 0 rows). `ds` may be None when every group
    expects 0 rows. Raises naming the groups that came back incomplete: committing them would
    silently lose rows."""
    import ray
    from tqdm import tqdm

    work_root = fs.join(fs.normalize(out), WORK, stage)
    fs.delete_dir(work_root)  # pieces of a killed run: never committed, never reused
    work = fs.join(work_root, uuid.uuid4().hex[:12])
    remote = ray.remote(num_cpus=0, max_retries=2)(_commit).options(scheduling_strategy="SPREAD")
    commit_ref, kw_ref = ray.put(commit), ray.put(kwargs or {})
    gate = faults.gate(stage)
    counts: Counter = Counter()
    pieces: dict[int, list[str]] = defaultdict(list)
    in_flight: dict = {}
    done: dict[int, dict] = {}

    def submit(g: int) -> None:
        while len(in_flight) >= max_in_flight:
            drain(1)
        in_flight[remote.remote(commit_ref, g, pieces.pop(g, []), expected[g], kw_ref, gate)] = g

    def drain(n: int, timeout: float | None = None) -> None:
        ready, _ = ray.wait(list(in_flight), num_returns=min(n, len(in_flight)), timeout=timeout)
        for ref in ready:
            g = in_flight.pop(ref)
            done[g] = ray.get(ref)
            faults.after_commit(stage)

    for g, n in expected.items():
        if n == 0:
            submit(g)
    total = sum(expected.values())
    bar = tqdm(total=total, desc=desc or stage, unit="row", disable=not progress or total == 0, mininterval=1.0)
    batches = []
    if ds is not None and total:
        ds = ds.map_batches(_write_pieces, fn_kwargs={"work": work}, batch_format="pyarrow", batch_size=None,
                            num_cpus=0.25)
        batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
    for batch in batches:
        for g, n, uri in zip(*(batch.column(c).to_pylist() for c in ("group", "rows", "piece"))):
            counts[g] += n
            pieces[g].append(uri)
            bar.update(n)
            if counts[g] == expected.get(g, -1):
                submit(g)
        if in_flight:  # learn about finished commits as they happen (reports, fault injection)
            drain(len(in_flight), timeout=0)
    bar.close()
    # One at a time, so each finished commit is reported at once: under a kill test's gate
    # (_sigma.faults) the other commits may never finish, and waiting for all of them would hang.
    while in_flight:
        drain(1)
    missing = {g: (counts.get(g, 0), n) for g, n in expected.items() if g not in done}
    fs.delete_dir(work_root)
    if missing:
        raise RuntimeError(f"{stage}: groups came back incomplete (rows got, expected): {missing}")
    return done


def nodes_of(summaries: Iterable[dict]) -> dict[str, int]:
    """{node id: commits} over task / commit summaries (where the work ran)."""
    return dict(Counter(s.get("node") for s in summaries if s and s.get("node")))

"""Download stage: img2dataset as a library, then one manifest part per img2dataset shard.

Only module that reads img2dataset's per-shard parquet under `<output>/download/` (the image tars
are read through _sigma.images, the shard records through curation.integrity). Input part i has
at most part_size rows and img2dataset shards each input file separately with
number_sample_per_shard = part_size, so shard i == part i; our key rides along as `sigma_key`.
img2dataset writes straight to the output filesystem (fsspec: local or s3://); its `_stats.json`
is written last per shard: it is the "shard done" marker, and incremental mode skips such shards.
Each request goes through curation.crawl's policy (installed in img2dataset's workers by
curation.i2d). A run first checks every part (Ray task per part: shard fingerprint, sizes and
sha256, manifest part checksum), deletes what must be fetched again, runs img2dataset for the
missing shards, then builds the manifest parts that need it (Ray task per part).
"""
from __future__ import annotations

import contextlib
import io
import os
import sys

import pyarrow as pa

from _sigma import fs, manifest
from _sigma.config import fingerprint, to_dict
from curation import crawl, integrity
from curation.inputs import KEY_COL, input_info, input_rows, read_input_part


_SHOW = 20  # reasons printed / returned (a settings change redoes every part)
download_dir = integrity.download_dir
shard_done = integrity.shard_done


def img2dataset_kwargs(cfg, out: str) -> dict:
    """The img2dataset.download() arguments for this pipeline (also used by the benchmark)."""
    d = cfg.download
    keep_original = d.max_side is None and not d.reencode
    return dict(
        url_list=fs.fsspec_url(fs.join(fs.normalize(out), "input")),
        output_folder=fs.fsspec_url(download_dir(out)),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=[KEY_COL],
        output_format="webdataset",
        number_sample_per_shard=cfg.input.part_size,
        processes_count=d.processes,
        thread_count=d.threads,
        timeout=d.timeout,
        retries=d.retries,
        # Originals are kept byte-for-byte (no decode, no upscaling); width/height, EXIF orientation
        # and every decode problem are handled per row by the score stage.
        disable_all_reencoding=keep_original,
        image_size=d.max_side or 256,
        resize_mode="keep_ratio_largest" if d.max_side else "no",  # caps the LONG side
        resize_only_if_bigger=True,
        encode_format=d.encode_format,
        encode_quality=d.encode_quality,
        skip_reencode=not d.reencode,
        min_image_size=0,
        max_aspect_ratio=float("inf"),
        compute_hash="sha256",
        distributor=d.distributor,
        incremental_mode="incremental",
        user_agent_token=d.user_agent_token,
        disallowed_header_directives=list(d.disallowed_header_directives),
        enable_wandb=False,
    )


def policy_of(d) -> crawl.Policy:
    return crawl.Policy(timeout=d.timeout, deadline=d.deadline, max_bytes=d.max_bytes, max_redirects=d.max_redirects,
                        allow_private=d.allow_private_addresses, allowed_networks=tuple(d.allowed_networks))


def run_img2dataset(cfg, out: str) -> None:
    import img2dataset

    from curation.i2d import patched

    logs = os.environ.get("SIGMA_LOG_DIR")  # set by _sigma.cli.route_logs unless --verbose
    with contextlib.ExitStack() as stack:
        if logs:  # img2dataset and its worker processes print their progress: into the log
            from _sigma.cli import stdout_to

            stack.enter_context(stdout_to(os.path.join(logs, "img2dataset.log")))
        elif os.environ.get("SIGMA_QUIET"):
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        stack.enter_context(patched(policy_of(cfg.download)))
        img2dataset.download(**img2dataset_kwargs(cfg, out))


def build_manifest_part(out: str, part: int) -> pa.Table:
    """Input part (every row) left-joined with img2dataset's per-row status for that shard."""
    base = read_input_part(out, part)
    shard = fs.join(download_dir(out), f"{part:05d}.parquet")
    got = fs.read_parquet(shard) if fs.exists(shard) else pa.table({KEY_COL: pa.array([], pa.string())})
    cols = {"key": got.column(KEY_COL)}
    for src, dst in (("status", "download_status"), ("error_message", "download_error"), ("sha256", "sha256")):
        cols[dst] = got.column(src) if src in got.column_names else pa.nulls(got.num_rows, pa.string())
    table = manifest.merge_columns(base, pa.table(cols))
    status, error = [], []
    for url, dst, derr in zip(table.column("url").to_pylist(), table.column("download_status").to_pylist(),
                              table.column("download_error").to_pylist()):
        problem = crawl.url_problem(url)
        if problem:
            status.append("invalid_input"), error.append(problem)
        elif dst == "success":
            status.append("ok"), error.append(None)
        elif dst is None:
            status.append("failed_download"), error.append("no result from img2dataset for this row")
        else:
            status.append("failed_download" if dst == "failed_to_download" else "failed_decode")
            error.append(derr or dst)
    table = table.append_column("status", pa.array(status, pa.string()))
    return table.append_column("error", pa.array(error, pa.string()))


def commit_part(part: int, out: str, fp: str) -> dict:
    """On a worker: record the shard's sizes and checksums, then build and write one manifest
    part. A fresh download invalidates every later stage of the part, so its metadata starts anew."""
    if not shard_done(out, part):
        raise RuntimeError(f"img2dataset did not finish shard {part}; rerun the same command to resume")
    integrity.record(out, part, fp)
    return manifest.write_part(out, part, build_manifest_part(out, part), "download", fp, keep={},
                               expected_rows=input_rows(out, part))


def download_fingerprint(cfg, info: dict) -> str:
    """What decides the downloaded bytes: every download setting except how the work is spread."""
    d = {k: v for k, v in to_dict(cfg.download).items() if k not in ("processes", "threads", "distributor", "verify")}
    return fingerprint({"download": d, "input": info.get("hash"), "part_size": cfg.input.part_size})


def run_download(cfg, out: str, progress: bool = True) -> dict:
    """Check every part (img2dataset shard and manifest part: fingerprint, size, sha256), fetch the
    shards that are missing, stale or corrupt, then (re)build the manifest parts that need it."""
    from _sigma.partstage import nodes_of, run_tasks

    out = fs.normalize(out)
    info = input_info(out)
    fp = download_fingerprint(cfg, info)
    parts = list(range(info["parts"]))
    checks = run_tasks(integrity.check_part, parts, kwargs={"out": out, "fp": fp, "verify": cfg.download.verify},
                       desc="download check", progress=progress)
    redone = {c["part"]: c["reason"] for c in checks if c["reason"]}
    for i, (p, reason) in enumerate(sorted(redone.items())):
        if i == _SHOW:
            print(f"download: ... and {len(redone) - _SHOW} more parts redone", file=sys.stderr, flush=True)
            break
        print(f"download: part {p} is redone: {reason}", file=sys.stderr, flush=True)
    if any(c["fetch"] for c in checks):
        run_img2dataset(cfg, out)
    todo = [c["part"] for c in checks if c["commit"]]
    done = run_tasks(commit_part, todo, kwargs={"out": out, "fp": fp}, desc="download manifest",
                     progress=progress, stage="download")
    s = manifest.run_summary(out)
    return {"parts": len(parts), "parts_written": len(done), "parts_fetched": sum(c["fetch"] for c in checks),
            "parts_redone": len(redone), "redone": dict(sorted(redone.items())[:_SHOW]), "rows": s["rows"],
            "status": s["status"], "nodes": nodes_of(done)}

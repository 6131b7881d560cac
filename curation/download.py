"""Download stage: img2dataset as a library, then one manifest part per img2dataset shard.

Only module that reads `<output>/download/` (img2dataset's webdataset tars + per-shard parquet).
Input part i has at most part_size rows and img2dataset shards each input file separately with
number_sample_per_shard = part_size, so shard i == part i; our key rides along as `sigma_key`.
img2dataset's `_stats.json` is written last per shard: it is the "shard done" marker, and
incremental mode skips such shards on rerun.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import manifest
from common.config import fingerprint
from curation.inputs import KEY_COL, input_info, read_input_part

DOWNLOAD = "download"
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"}


def shard_done(out: Path, part: int) -> bool:
    return (Path(out) / DOWNLOAD / f"{part:05d}_stats.json").exists()


def img2dataset_kwargs(cfg, out: Path) -> dict:
    """The img2dataset.download() arguments for this pipeline (also used by the benchmark)."""
    d = cfg.download
    keep_original = d.max_side is None and not d.reencode
    return dict(
        url_list=str(Path(out) / "input"),
        output_folder=str(Path(out) / DOWNLOAD),
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


def run_img2dataset(cfg, out: Path) -> None:
    import img2dataset

    with contextlib.redirect_stdout(io.StringIO()) if os.environ.get("SIGMA_QUIET") else contextlib.nullcontext():
        img2dataset.download(**img2dataset_kwargs(cfg, out))


def _url_problem(url: str | None) -> str | None:
    if url is None or not url.strip():
        return "empty URL"
    if not url.strip().lower().startswith(("http://", "https://")):
        return f"not an http(s) URL: {url[:80]!r}"
    return None


def build_manifest_part(out: Path, part: int) -> pa.Table:
    """Input part (every row) left-joined with img2dataset's per-row status for that shard."""
    base = read_input_part(out, part)
    shard = Path(out) / DOWNLOAD / f"{part:05d}.parquet"
    got = pq.read_table(shard) if shard.exists() else pa.table({KEY_COL: pa.array([], pa.string())})
    cols = {"key": got.column(KEY_COL)}
    for src, dst in (("status", "download_status"), ("error_message", "download_error"), ("sha256", "sha256")):
        cols[dst] = got.column(src) if src in got.column_names else pa.nulls(got.num_rows, pa.string())
    table = manifest.merge_columns(base, pa.table(cols))
    status, error = [], []
    for url, dst, derr in zip(table.column("url").to_pylist(), table.column("download_status").to_pylist(),
                              table.column("download_error").to_pylist()):
        problem = _url_problem(url)
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


def run_download(cfg, out: Path, progress: bool = True) -> dict:
    out = Path(out)
    info = input_info(out)
    fp = fingerprint({"download": cfg.download, "input": info.get("hash"), "part_size": cfg.input.part_size})
    parts = range(info["parts"])
    todo = [p for p in parts if not manifest.stage_done(out, p, "download", fp)]
    if any(not shard_done(out, p) for p in todo):
        run_img2dataset(cfg, out)
    written = 0
    for p in todo:
        if not shard_done(out, p):
            raise RuntimeError(f"img2dataset did not finish shard {p}; rerun the same command to resume")
        # A fresh download invalidates every later stage of the part: start its metadata anew.
        manifest.write_part(out, p, build_manifest_part(out, p), "download", fp, keep={})
        written += 1
    t = manifest.read_manifest(out, ["status"])
    counts = pc.value_counts(t.column("status")).to_pylist() if t.num_rows else []
    return {"parts": len(parts), "parts_written": written, "rows": t.num_rows,
            "status": {c["values"]: c["counts"] for c in counts}}


def iter_images(out: Path, part: int) -> Iterator[tuple[str, bytes]]:
    """(key, original image bytes) of every downloaded image in shard `part`, in tar order."""
    path = Path(out) / DOWNLOAD / f"{part:05d}.tar"
    if not path.exists():
        return
    pending: dict[str, dict] = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base, _, ext = member.name.rpartition(".")
            data = tar.extractfile(member).read()
            entry = pending.setdefault(base, {})
            if ext == "json":
                entry["key"] = json.loads(data).get(KEY_COL)
            elif ext.lower() in IMAGE_EXTS:
                entry["image"] = data
            if "key" in entry and "image" in entry:
                yield entry["key"], entry["image"]
                del pending[base]


def read_image(out: Path, key: str) -> bytes | None:
    """Bytes of one key's image (its part is the key's prefix)."""
    part = int(key.split("_", 1)[0])
    for k, data in iter_images(out, part):
        if k == key:
            return data
    return None

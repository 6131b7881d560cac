"""`sigma-upload-models --pipeline NAME --to s3://bucket/models`: stage a pipeline's models in a bucket.

Every model field of the pipeline (pipelines.yaml fields marked as paths: score.clip_model /
clip_pretrained / aesthetic_weights, caption.model / t5_tokenizer, features.t5 / vae, eval.t5 / vae /
fid_weights / rewards) that is a local file or folder is uploaded under `--to`, keeping its path below
`models/` (`models/tiny/t5` -> `<to>/tiny/t5`), with a `_sigma_sums.json` (size + sha256 of each file)
that the nodes' cache (_sigma.fetch) checks every download against. Files already there with the same
size and sha256 are not uploaded again. Hub names and URIs are left as they are (say so).

Then it prints the `--set section.key=URI` overrides that point the pipeline there, and with
`--write-config FILE` writes a copy of the config whose pipeline reads them: the file to submit with
`ray job submit --working-dir .` to nodes that share nothing but the bucket.
"""
from __future__ import annotations

import os
import sys

import yaml

from _sigma import fs
from _sigma.cli import make_parser, user_error
from _sigma.config import ConfigError, iter_path_fields, load_yaml, looks_local, resolve_path

PROG = "sigma-upload-models"


def remote_name(local: str) -> str:
    """Where a local model goes below --to: its path below a `models` folder, else its name."""
    parts = os.path.normpath(os.path.abspath(local)).split(os.sep)
    if "models" in parts:
        i = len(parts) - 1 - parts[::-1].index("models")
        if parts[i + 1:]:
            return "/".join(parts[i + 1:])
    return parts[-1]


def _local_files(path: str) -> list[tuple[str, str]]:
    """(relative path, absolute path) of a file ('' relative) or every file under a folder."""
    if os.path.isfile(path):
        return [("", path)]
    out = []
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out.append((os.path.relpath(p, path).replace(os.sep, "/"), p))
    return sorted(out)


def upload(local: str, dest: str) -> dict:
    """Upload a file or folder to `dest` with its sums; returns {"files", "uploaded", "bytes"}."""
    from _sigma.fetch import SUMS_NAME, sha256_file

    files = _local_files(local)
    is_file = files == [("", local)]
    sums_uri = fs.join(fs.parent(dest) if is_file else dest, SUMS_NAME)
    try:
        sums = fs.read_json(sums_uri)
    except (FileNotFoundError, OSError, ValueError):
        sums = {}
    uploaded = nbytes = 0
    for rel, path in files:
        name = rel or fs.basename(dest)
        target = dest if is_file else fs.join(dest, rel)
        digest, size = sha256_file(path), os.path.getsize(path)
        if sums.get(name) == {"size": size, "sha256": digest} and fs.size(target) == size:
            continue  # already there: an unchanged model is not sent twice
        with open(path, "rb") as src, fs.atomic_output(target) as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)
        sums[name] = {"size": size, "sha256": digest}
        uploaded += 1
        nbytes += size
    fs.write_json(sums_uri, dict(sorted(sums.items())))  # after the data it describes
    return {"files": len(files), "uploaded": uploaded, "bytes": nbytes}


def plan(cfg, to: str, base=None) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(config key, local path, destination URI)], [notes on fields left as they are])."""
    todo, notes, taken = [], [], {}
    for key, value in iter_path_fields(cfg):
        v = str(value)
        if fs.is_remote(v):
            notes.append(f"{key}: {v} is already a URI")
            continue
        local = resolve_path(v, base)
        if not local.exists():
            if looks_local(v):
                raise ConfigError(f"{key}: {v} does not exist")
            notes.append(f"{key}: {v} is a hub name / open_clip tag: left as is (nodes download it from the hub; "
                         f"for an air-gapped cluster give a local folder of it and run this again)")
            continue
        dest = fs.join(to, remote_name(str(local)))
        if taken.setdefault(dest, str(local)) != str(local):
            raise ConfigError(f"{key}: {local} and {taken[dest]} would both go to {dest}; rename one")
        todo.append((key, str(local), dest))
    return todo, notes


def main(argv=None) -> int:
    from curation.config import add_pipeline_args, load_pipeline

    ap = make_parser(PROG, __doc__)
    add_pipeline_args(ap)
    ap.add_argument("--to", required=True, metavar="URI", help="bucket folder for the models, e.g. s3://bucket/models")
    ap.add_argument("--write-config", metavar="FILE", default=None,
                    help="also write a copy of --config whose pipeline reads the uploaded models")
    ap.add_argument("--dry-run", action="store_true", help="print what would be uploaded and the overrides, upload nothing")
    args = ap.parse_args(argv)
    if not fs.is_remote(args.to):
        return user_error(PROG, f"--to {args.to}: give an s3:// or gs:// folder")
    try:
        cfg = load_pipeline(args.config, args.pipeline, args.overrides, check=False)
        todo, notes = plan(cfg, fs.normalize(args.to))
    except ConfigError as e:
        return user_error(PROG, str(e))
    for n in notes:
        print(f"# {n}", file=sys.stderr)
    done = set()
    for key, local, dest in todo:
        if args.dry_run or dest in done:
            continue
        r = upload(local, dest)
        done.add(dest)
        print(f"# {key}: {local} -> {dest} ({r['uploaded']}/{r['files']} files sent, {r['bytes']} bytes)", file=sys.stderr)
    sets = [f"{key}={dest}" for key, _, dest in todo]
    for s in sets:
        print(f"--set {s}")
    if args.write_config:
        _write_config(args.config, args.pipeline, args.overrides + sets, args.write_config)
        print(f"# wrote {args.write_config}: --config {args.write_config} --pipeline {args.pipeline}", file=sys.stderr)
    return 0


def _write_config(config: str, name: str, overrides: list[str], target: str) -> None:
    """The config document with pipeline `name` overridden (anchors expanded, comments not kept)."""
    from _sigma.config import apply_overrides

    doc = load_yaml(config)
    doc["pipelines"][name] = apply_overrides(dict(doc["pipelines"][name] or {}), overrides)
    fs.write_text(fs.normalize(target), yaml.safe_dump(doc, sort_keys=False))


if __name__ == "__main__":
    sys.exit(main())

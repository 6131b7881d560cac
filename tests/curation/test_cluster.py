"""A real multi-node run: a head and a worker node (`ray start` on 127.0.0.1), an S3 server (moto's
server mode), the demo pipeline submitted with `ray job submit ... --output s3://...`.

Checks that every part stage's tasks ran on both nodes (the run's report/summary.json records
them per stage) and that the result equals a single-node run of the same URL list on local disk:
manifest rows and statuses, selected keys, the keys of every resolution's shards.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from _sigma import fs, holdout, manifest
from curation import demo_data as dd
from curation import run as run_mod
from _sigma import shards
from raycluster import Cluster, cluster_env

REPO = Path(__file__).resolve().parents[2]
PART_STAGES = ("download", "score", "caption", "features", "stats")  # stages on _sigma.partstage


def _args(tiny: Path, urls: str, out: str) -> list[str]:
    sets = {"input.part_size": 4, "score.clip_model": f"{tiny}/clip/model_config.json",
            "score.clip_pretrained": f"{tiny}/clip/open_clip_model.safetensors",
            "score.aesthetic_weights": f"{tiny}/aesthetic.pth", "score.nsfw_weights": f"{tiny}/nsfw.zip",
            "score.watermark_weights": f"{tiny}/watermark.pt", "caption.model": f"{tiny}/captioner",
            "caption.t5_tokenizer": f"{tiny}/t5", "caption.generation.max_new_tokens": 8,
            "features.vae": f"{tiny}/vae", "features.t5": f"{tiny}/t5", "stats.workers": 1,
            "eval.n": 2}  # eval_split holds 2 rows out (and their copies): the rest go to the shards
    args = ["--config", "pipelines.yaml", "--pipeline", "demo", "--input", urls, "--output", out, "--no-progress"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def _result(out: str) -> dict:
    """What must not depend on where the run happened. The eval_split hold-out is drawn by caption
    length, and sampled captions depend on how Ray batched the rows, so the shards are compared
    together with the hold-out: shard keys + held-out keys, which never overlap."""
    rows = manifest.read_manifest(out, ["key", "url", "status", "selected", "caption_status"]).to_pylist()
    held = holdout.excluded_keys(out)
    res = {"rows": [(r["key"], r["url"], r["status"]) for r in rows],
           "selected": sorted(r["key"] for r in rows if r["selected"]),
           "captioned": sorted(r["key"] for r in rows if r["caption_status"]), "held_out": len(held)}
    for r in (256, 512):
        keys = [s["key"] for s in shards.iter_samples(shards.shards_dir(out, r))]
        assert len(keys) == len(set(keys)) > 0 and not set(keys) & held
        res[r] = sorted(set(keys) | held)
    return res


@pytest.mark.slow
def test_two_node_cluster_on_s3_equals_single_node_on_local_disk(s3_bucket, tmp_path, tiny_models, ray_local):
    items = dd.demo_items(n_synthetic=8, near_duplicates=False)[-8:]  # 8 distinct generated images
    env = cluster_env()  # carries AWS_ENDPOINT_URL + credentials (s3_server fixture): raylets pass them on
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    with dd.DemoServer(items) as srv, Cluster(env, workers=1, cpus=2) as cluster:
        local_urls = tmp_path / "urls.parquet"
        dd.write_url_list(srv, items, local_urls, with_edge_rows=False)
        urls = s3_bucket + "/lists/urls.parquet"
        fs.write_bytes(urls, local_urls.read_bytes())
        out = s3_bucket + "/run"
        r = cluster.submit(REPO, ["python", "-m", "curation.run", *_args(tiny_models, urls, out)],
                           runtime_env_json=json.dumps({"env_vars": aws}))
        assert r.returncode == 0 and "succeeded" in (r.stdout + r.stderr), (r.stdout + r.stderr)[-5000:]
        # The same URL list, one node (this session's embedded Ray), local disk.
        local = tmp_path / "local"
        assert run_mod.main(_args(tiny_models, str(local_urls), str(local))) == 0
    summary = fs.read_json(fs.join(out, "report", "summary.json"))
    nodes = {st["stage"]: set(st["nodes"]) for st in summary["stages"]}
    everywhere = set().union(*nodes.values())
    assert len(everywhere) == 2, nodes  # head and worker
    for stage in PART_STAGES:
        assert nodes[stage] == everywhere, (stage, nodes)  # each part stage ran tasks on both nodes
    got, want = _result(out), _result(str(local))
    assert len(got["rows"]) == len(items) and got["selected"] and got["captioned"] and got["held_out"]
    assert got == want

"""The main job end to end on the local server: statuses of every bad input, invariants, resume."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from _sigma import manifest
from curation import demo_data as dd
from curation import run as run_mod

REPO = Path(__file__).resolve().parents[2]
STAGES = "download,score,dedup,select"


def _args(tiny, urls, out, stages=STAGES):
    return ["--config", str(REPO / "pipelines.yaml"), "--pipeline", "demo", "--input", str(urls), "--output", str(out),
            "--stages", stages, "--no-progress",
            "--set", f"score.clip_model={tiny}/clip/model_config.json",
            "--set", f"score.clip_pretrained={tiny}/clip/open_clip_model.safetensors",
            "--set", f"score.aesthetic_weights={tiny}/aesthetic.pth",
            "--set", f"score.nsfw_weights={tiny}/nsfw.zip", "--set", f"score.watermark_weights={tiny}/watermark.pt"]


@pytest.fixture(scope="module")
def finished_run(demo_server, tiny_models, tmp_path_factory, ray_local):
    d = tmp_path_factory.mktemp("run")
    expect = dd.write_url_list(demo_server, demo_server.items, d / "urls.parquet")
    assert run_mod.main(_args(tiny_models, d / "urls.parquet", d / "out")) == 0
    return d / "out", expect, demo_server.items


def test_every_input_row_has_its_status(finished_run):
    out, expect, items = finished_run
    t = manifest.read_manifest(out).to_pylist()
    assert len(t) == len(expect)  # exactly one manifest row per input row
    assert len({r["key"] for r in t}) == len(t) and all("." not in r["key"] for r in t)
    assert [r["status"] for r in t] == expect
    assert all(r["error"] for r in t if r["status"] != "ok")
    by_url = {}
    for r in t:
        by_url.setdefault((r["url"] or "").rsplit("/", 1)[-1], r)
    assert "decompression bomb" in by_url["bomb.png"]["error"]
    assert "404" in by_url["missing.jpg"]["error"]
    assert "timed out" in by_url["slow.jpg"]["error"]
    assert "refused" in by_url["refused.jpg"]["error"].lower()
    assert "HTML" in by_url["html.jpg"]["error"] and "0 bytes" in by_url["empty.jpg"]["error"]
    assert "truncated" in by_url["truncated.jpg"]["error"]
    rot = by_url["exif_rotated.jpg"]
    assert (rot["width"], rot["height"]) == (400, 300)  # orientation applied before recording
    assert "too_small" in by_url["tiny1x1.png"]["reject_reason"]
    assert "aspect_ratio" in by_url["banner.jpg"]["reject_reason"]
    for name in ("cmyk.jpg", "gray16.png", "palette.png"):
        assert by_url[name]["status"] == "ok" and by_url[name]["aesthetic"] is not None


def test_same_url_twice_and_same_bytes_are_exact_duplicates(finished_run):
    out, _, items = finished_run
    t = manifest.read_manifest(out).to_pylist()
    first = items[0].name
    copies = [r for r in t if r["url"] and r["url"].endswith(first)]
    assert len(copies) == 3  # original, same URL again, same bytes at another URL
    kept = [r for r in copies if r["duplicate_of"] is None]
    if kept:  # the image is kept once, its copies name it
        assert len(kept) == 1 and kept[0]["selected"]
        for r in copies:
            if r is not kept[0]:
                assert (r["duplicate_of"], r["dup_kind"], r["dup_similarity"]) == (kept[0]["key"], "exact", 1.0)
                assert not r["selected"]
    else:  # the image is itself a near duplicate of a kept row (depends on the CLIP): all copies name that row
        assert len({r["duplicate_of"] for r in copies}) == 1 and {r["dup_kind"] for r in copies} == {"near"}
        assert not any(r["selected"] for r in copies)
    by_key = {r["key"]: r for r in t}
    assert all(by_key[r["duplicate_of"]]["selected"] for r in t if r["duplicate_of"])  # never a rejected row


def test_outputs_config_summary_and_duckdb(finished_run):
    out, expect, _ = finished_run
    assert (out / "config.resolved.yaml").exists()
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["rows"] == len(expect) and sum(summary["status"].values()) == len(expect)
    q = f"select status, count(*) from read_parquet('{manifest.manifest_glob(out)}', union_by_name=true) group by 1"
    assert dict(duckdb.sql(q).fetchall()) == summary["status"]
    keys, emb = manifest.read_embeddings(out)
    assert len(keys) == expect.count("ok") and emb.shape[1] == 64


def test_whatif_at_the_run_settings_is_the_demo_selection(finished_run):
    """Issue 22 item 11: the browser's what-if, opened untouched on the demo, is select's result row
    for row (it used to follow direct pairs only and say 38 where select kept 36)."""
    from curation.browse import whatif
    from curation.browse.store import Run

    out, _, _ = finished_run
    w = whatif.whatif(Run(str(out)), {})
    selected = sum(manifest.read_manifest(out, ["selected"]).column("selected").to_pylist())
    assert (w["would"], w["gained"], w["lost"]) == (selected, 0, 0) and w["dedup"]["source"] == "pairs"


def test_filter_columns_and_their_reject_reasons(finished_run):
    """The demo config turns the three filters on: every scored row has them, and select's filter
    reasons are exactly the rows past the demo thresholds (a plain recount)."""
    from curation.config import load_pipeline

    out, _, _ = finished_run
    sel = load_pipeline(str(REPO / "pipelines.yaml"), "demo", check=False).select
    rows = [r for r in manifest.read_manifest(out).to_pylist() if r["status"] == "ok"]
    assert rows and all(r[c] is not None for r in rows for c in ("nsfw", "watermark"))
    assert all(r["clip_similarity"] is not None for r in rows if r["caption"] is not None)
    assert all(r["text_truncated"] is False for r in rows if r["caption"] is not None)  # short demo alt texts
    for r in rows:
        why = (r["reject_reason"] or "").split(";")
        assert ("nsfw" in why) == (r["nsfw"] > sel.nsfw_max), r["key"]
        assert ("watermark" in why) == (r["watermark"] > sel.watermark_max), r["key"]
        low = r["clip_similarity"] is None or r["clip_similarity"] < sel.clip_similarity_min
        assert ("low_clip_similarity" in why) == low, r["key"]
    assert any("nsfw" in (r["reject_reason"] or "") for r in rows)  # the demo thresholds bite
    assert any("watermark" in (r["reject_reason"] or "") for r in rows)


def test_the_report_keeps_every_stage_latest_timing(finished_run, tiny_models):
    """A second command (--stages select) replaces select's row of the report's stage table and keeps
    the rows of the stages it did not run (today summary.json holds only the last command's stages:
    after `make demo` only `features`)."""
    out, _, _ = finished_run
    before = {s["stage"]: s for s in json.loads((out / "report" / "summary.json").read_text())["stages"]}
    assert list(before) == STAGES.split(",")
    assert run_mod.main(_args(tiny_models, out / ".." / "urls.parquet", out, stages="select")) == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    after = {s["stage"]: s for s in summary["stages"]}
    assert list(after) == STAGES.split(",")  # pipeline order, each stage once
    for st in ("download", "score", "dedup"):
        assert after[st] == before[st]  # the earlier command's timing, untouched
    assert after["select"]["finished_at"] > before["select"]["finished_at"]
    assert summary["stages_run"] == ["select"]


def test_changing_a_threshold_reruns_select_only(finished_run, tiny_models):
    out, _, _ = finished_run
    emb_mtimes = {p: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    before = manifest.read_manifest(out).to_pylist()
    args = _args(tiny_models, out / ".." / "urls.parquet", out, stages="score,select") + ["--set", "select.min_side=1"]
    assert run_mod.main(args) == 0
    after = manifest.read_manifest(out).to_pylist()
    assert {p: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()} == emb_mtimes  # nothing rescored
    assert [r["aesthetic"] for r in after] == [r["aesthetic"] for r in before]
    tiny = next(r for r in after if r["url"] and r["url"].endswith("tiny1x1.png"))
    assert "too_small" not in (tiny["reject_reason"] or "")


def test_select_refuses_when_dedup_is_stale(finished_run, tiny_models, capsys):
    """Scores changed after dedup ran: `--stages select` must not select from stale duplicates."""
    out, _, _ = finished_run
    urls = out / ".." / "urls.parquet"
    rescore = ["--set", "score.max_pixels=100000000"]  # another score fingerprint: every part is rescored
    assert run_mod.main(_args(tiny_models, urls, out, stages="score") + rescore) == 0
    capsys.readouterr()
    assert run_mod.main(_args(tiny_models, urls, out, stages="select") + rescore) == 2
    err = capsys.readouterr().err
    assert "dedup" in err and "--stages dedup,select" in err
    assert run_mod.main(_args(tiny_models, urls, out, stages="dedup,select") + rescore) == 0
    t = manifest.read_manifest(out, ["selected"]).column("selected").to_pylist()
    assert t.count(True) >= 1


@pytest.mark.parametrize("content, needle", [
    ("", "empty"), ("url,caption\n", "empty"), ("caption\nhello\n", "'url' is not a column"),
])
def test_bad_url_lists_are_clear_errors(tmp_path, capsys, tiny_models, content, needle):
    p = tmp_path / "urls.csv"
    p.write_text(content)
    rc = run_mod.main(_args(tiny_models, p, tmp_path / "out"))
    assert rc == 2 and needle in capsys.readouterr().err


def _run_cli(args, kill_at=None, marker: Path | None = None):
    """The job as a user runs it; with `kill_at` it must die by SIGKILL at that commit, proven by
    the marker file faults.after_commit writes just before the kill."""
    env = dict(os.environ, SIGMA_QUIET="1")
    env.pop("SIGMA_KILL_AT", None)
    env.pop("SIGMA_KILL_MARKER", None)
    if kill_at:
        env.update(SIGMA_KILL_AT=kill_at, SIGMA_KILL_MARKER=str(marker))
        if marker.exists():
            marker.unlink()
    r = subprocess.run([sys.executable, "-m", "curation.run", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    if kill_at:
        assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
        assert marker.exists() and marker.read_text().split() == [kill_at], "the run was not killed where asked"
    return r


def _mtimes(paths) -> dict:
    return {str(p): os.stat(p).st_mtime_ns for p in paths}


STAGES_ALL = "download,score,dedup,select,caption,eval_split,features,stats"
# The stages whose commits the driver reports to _sigma.faults.
# stats is killed on an s3 output in tests/curation/test_stats_stage.py.
KILL_STAGES = ("download", "score", "dedup", "select", "caption", "features")


@pytest.mark.slow
def test_sigkill_in_every_stage_then_rerun_resumes(demo_server, tiny_models, tmp_path):
    """SIGKILL right after the first commit of each stage, rerun the same command each time: no
    duplicates or gaps, and what was committed before a kill is never redone."""
    from _sigma import shards

    expect = dd.write_url_list(demo_server, demo_server.items, tmp_path / "urls.parquet")
    out = tmp_path / "out"
    args = _args(tiny_models, tmp_path / "urls.parquet", out, stages=STAGES_ALL) + [
        "--set", f"caption.model={tiny_models}/captioner", "--set", f"caption.t5_tokenizer={tiny_models}/t5",
        "--set", f"features.vae={tiny_models}/vae", "--set", f"features.t5={tiny_models}/t5"]
    marker = tmp_path / "killed"
    committed = {}
    for stage in KILL_STAGES:
        _run_cli(args, kill_at=f"{stage}:1", marker=marker)
        parts = manifest.list_parts(out)
        t = manifest.read_manifest(out, ["key"])
        assert len(set(t.column("key").to_pylist())) == t.num_rows  # never a duplicate, even mid-run
        # A commit task killed with the driver may leave its temp file (`.part-N.parquet.tmp-*`)
        # beside the parts; it is never a part: list_parts only sees committed names.
        names = {p.name for p in (out / "manifest").iterdir() if p.is_file()}
        assert {manifest.part_uri(out, p).rsplit("/", 1)[-1] for p in parts} == {n for n in names if "tmp" not in n}
        if stage == "dedup":  # dedup commits pair files (select resolves them), its marker comes last
            assert list((out / "dedup" / "pairs").glob("part-*.parquet")), "nothing committed before the kill in dedup"
            assert not (out / "dedup" / "_done.json").exists()
            committed[stage] = _mtimes((out / "dedup" / "pairs").glob("part-*.parquet"))
            continue
        if stage in ("download", "score", "select", "caption"):
            done = [p for p in parts if stage in manifest.part_fingerprints(out, p)]
            assert done, f"nothing committed before the kill in {stage}"
        if stage == "download":
            committed[stage] = _mtimes(out / "download" / f"{p:05d}.tar" for p in done)
        elif stage == "score":
            committed[stage] = _mtimes(manifest.embeddings_uri(out, p) for p in done)
        elif stage == "caption":  # later stages never rewrite manifest parts
            committed[stage] = _mtimes(manifest.part_uri(out, p) for p in done)
        elif stage == "features":
            sides = list(out.glob("shards/*/.shard-*.json"))
            assert sides and not list(out.glob("shards/*/index.json"))
            committed[stage] = _mtimes(p.with_name(p.name[1:-5] + ".tar") for p in sides)
    r = _run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest.check_invariants(out, len(expect))
    rows = manifest.read_manifest(out).to_pylist()
    assert [x["status"] for x in rows] == expect
    for stage, before in committed.items():  # finished parts / shards were not redone
        assert _mtimes(before) == before, stage
    # Every selected row has exactly one caption status; shards hold each featurised key once.
    assert all(x["caption_status"] for x in rows if x["selected"])
    for res in (256, 512):
        keys = [s["key"] for s in shards.iter_samples(shards.shards_dir(out, res))]
        assert len(keys) == len(set(keys)) and set(keys) <= {x["key"] for x in rows if x["selected"]}

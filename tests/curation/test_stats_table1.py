"""Table 1 SQL (curation/sql/*.sql) on a small hand-counted corpus: every column, every slice.

The caption-noun table is written directly here (no spaCy), so the numbers below are counted by
hand from the corpus definition, independent of the SQL.
"""
import csv
import io
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.stats import table1
from curation.stats.nouns import NOUN_SCHEMA

KEYS = [f"{i // 6:05d}_{i % 6:06d}" for i in range(13)]  # k0..k12; parts 0, 1, 2


def _noun_rows():
    """The hand-counted corpus (k = KEYS index):

    raw:  k0..k10 contain "dog" once (dog: 11 occurrences -> valid), k0..k9 contain "cat" once
          (cat: exactly 10 -> NOT valid), k11 = tree, tree, sky; k0 also has "sky" (sky: 2).
          words of k_i = i + 1. k12 has no caption at all.
    long: k0 = "man" x 12 (12 occurrences in ONE caption -> valid), k1..k5 = "hat" (5); words 100.
    derived_short: k6 = "boat"; words 3.
    """
    rows = []
    for i in range(12):
        nouns = (["dog"] if i <= 10 else []) + (["cat"] if i <= 9 else [])
        if i == 11:
            nouns = ["tree", "tree", "sky"]
        if i == 0:
            nouns.append("sky")
        rows.append((KEYS[i], "raw", i + 1, nouns))
    rows.append((KEYS[0], "long", 100, ["man"] * 12))
    rows += [(KEYS[i], "long", 100, ["hat"]) for i in range(1, 6)]
    rows.append((KEYS[6], "derived_short", 3, ["boat"]))
    return rows


def _manifest_rows():
    sizes = {0: (3840, 2160), 1: (2160, 3840), 2: (3839, 2160), 3: (4000, 3000)}  # 4k: k0, k1, k3
    out = []
    for i, k in enumerate(KEYS):
        w, h = sizes.get(i, (1024, 1024))
        out.append({"key": k, "url": f"http://x/{i}.jpg", "caption": "c" if i < 12 else None,
                    "status": "ok" if i < 12 else "failed_download", "error": None,
                    "width": w if i < 12 else None, "height": h if i < 12 else None,
                    "aspect_ratio": h / w, "aesthetic": 6.5 if 6 <= i <= 11 else 5.0, "duplicate_of": None,
                    "selected": i <= 5, "reject_reason": None if i <= 5 else "too_small"})
    return out


def write_output(out: Path, manifest_rows=None, noun_rows=None, drop_columns=()):
    """A pipeline output with manifest/part-*.parquet and stats/nouns/part-*.parquet (the noun
    rows of each manifest part in that part's file, as the stats stage writes them)."""
    manifest_rows = _manifest_rows() if manifest_rows is None else manifest_rows
    noun_rows = _noun_rows() if noun_rows is None else noun_rows
    (out / "manifest").mkdir(parents=True)
    by_part = {}
    for r in manifest_rows:
        by_part.setdefault(int(r["key"][:5]), []).append({k: v for k, v in r.items() if k not in drop_columns})
    for p, rows in by_part.items():
        pq.write_table(pa.Table.from_pylist(rows), out / "manifest" / f"part-{p:05d}.parquet")
    (out / "stats" / "nouns").mkdir(parents=True)
    for p in by_part:
        mine = [r for r in noun_rows if int(r[0][:5]) == p]
        t = pa.table({"key": [r[0] for r in mine], "kind": [r[1] for r in mine],
                      "words": [r[2] for r in mine], "n_nouns": [len(r[3]) for r in mine],
                      "nouns": [r[3] for r in mine], "error": [None] * len(mine)}, schema=NOUN_SCHEMA)
        pq.write_table(t, out / "stats" / "nouns" / f"part-{p:05d}.parquet")
    return out


def run_table1(outs, names=None, slices=None, vn_min_count=10):
    con = table1.connect(outs, names, slices, vn_min_count)
    try:
        rows = table1.query(con, "table1").to_pylist()
    finally:
        con.close()
    return {(r["pipeline"], r["dataset"], r["caption"]): r for r in rows}


# (volume, vn, dn, total_noun, sum of words) per (dataset, kind), counted by hand from the docstring.
EXPECTED = {
    ("all", "raw"): (12, 1, 4, 25, 78),  # dog 11 (valid), cat 10 (not), tree 2, sky 2
    ("all", "long"): (6, 1, 2, 17, 600),  # man 12 (valid), hat 5
    ("all", "derived_short"): (1, 0, 1, 1, 3),
    ("selected", "raw"): (6, 0, 3, 13, 21),  # k0..k5: dog 6, cat 6, sky 1
    ("selected", "long"): (6, 1, 2, 17, 600),
    ("4k", "raw"): (3, 0, 3, 7, 1 + 2 + 4),  # k0, k1 (portrait), k3; k2 is one pixel short
    ("4k", "long"): (3, 1, 2, 14, 300),  # man 12, hat 2
    ("calm", "raw"): (6, 0, 4, 12, 57),  # k6..k11: dog 5, cat 4, tree 2, sky 1
    ("calm", "derived_short"): (1, 0, 1, 1, 3),
}


def test_table1_every_column_hand_counted(tmp_path):
    out = write_output(tmp_path / "run")
    got = run_table1([out], ["demo"], {"calm": "aesthetic >= 6"})
    assert set(got) == {("demo", d, k) for d, k in EXPECTED}
    for (d, k), (volume, vn, dn, total, words) in EXPECTED.items():
        r = got[("demo", d, k)]
        assert (r["volume"], r["vn"], r["dn"], r["total_noun"]) == (volume, vn, dn, total), (d, k, r)
        assert r["acl"] == pytest.approx(words / volume)
        assert r["avg_nouns"] == pytest.approx(total / volume)


def test_vn_boundary_exactly_ten_is_not_valid(tmp_path):
    out = write_output(tmp_path / "run")
    assert run_table1([out])[(str(out), "all", "raw")]["vn"] == 1  # dog (11) yes, cat (10) no
    assert run_table1([out], vn_min_count=9)[(str(out), "all", "raw")]["vn"] == 2  # now cat (10 > 9) too
    assert run_table1([out], vn_min_count=11)[(str(out), "all", "raw")]["vn"] == 0  # 11 is not > 11


def test_manifest_without_later_stage_columns(tmp_path):
    """No select/score/caption columns yet: only 'all' rows, from raw captions; nothing crashes."""
    out = write_output(tmp_path / "run", noun_rows=[r for r in _noun_rows() if r[1] == "raw"],
                       drop_columns=("width", "height", "aspect_ratio", "aesthetic", "duplicate_of",
                                     "selected", "reject_reason"))
    got = run_table1([out], ["p"])
    assert set(got) == {("p", "all", "raw")}
    assert (got[("p", "all", "raw")]["volume"], got[("p", "all", "raw")]["total_noun"]) == (12, 25)
    con = table1.connect([out], ["p"])
    assert table1.query(con, "aesthetic_hist").num_rows == 0
    status = {(r["facet"], r["value"]): r["rows"] for r in table1.query(con, "status_breakdown").to_pylist()}
    assert status == {("status", "ok"): 12, ("status", "failed_download"): 1, ("reject_reason", "(not decided)"): 13}


def test_several_pipelines_and_their_union(tmp_path):
    """Same keys in two outputs must not be confused; the union row recounts nouns across both."""
    a = write_output(tmp_path / "a")
    b = write_output(tmp_path / "b")
    got = run_table1([a, b], ["a", "b"])
    assert got[("a", "all", "raw")]["total_noun"] == got[("b", "all", "raw")]["total_noun"] == 25
    u = got[("a+b", "all", "raw")]
    # dog 22, cat 20 -> both valid in the union; tree 4, sky 4 are not.
    assert (u["volume"], u["vn"], u["dn"], u["total_noun"]) == (24, 2, 4, 50)
    assert u["acl"] == pytest.approx(78 / 12)


def test_other_queries_and_report_formats(tmp_path):
    out = write_output(tmp_path / "run")
    con = table1.connect([out], ["demo"])
    lengths = table1.query(con, "caption_lengths").to_pylist()
    assert sum(r["captions"] for r in lengths) == 12 + 6 + 1
    assert {r["words"] for r in lengths if r["kind"] == "long"} == {100}
    aes = {r["bin"]: (r["rows"], r["selected"]) for r in table1.query(con, "aesthetic_hist").to_pylist()}
    assert aes == {5.0: (7, 6), 6.5: (6, 0)}
    status = {(r["facet"], r["value"]): r["rows"] for r in table1.query(con, "status_breakdown").to_pylist()}
    assert status[("reject_reason", "(selected)")] == 6 and status[("reject_reason", "too_small")] == 7
    t = table1.query(con, "table1")
    parsed = list(csv.DictReader(io.StringIO(table1.to_csv(t))))
    assert len(parsed) == t.num_rows and parsed[0]["dataset"] == "all" and parsed[0]["caption"] == "raw"
    md = table1.to_markdown(table1.display_rows(t, paper=True))
    assert "| ours | all | 12 | raw | 1/4 | 25 | 6.5 | 2.1/Img |" in md
    assert "| paper | Internal-Σ | 33M | Raw | 294K/1512K | 485M | 35 | 14.4/Img |" in md


def _duckdb_cli():
    return os.environ.get("DUCKDB_CLI") or shutil.which("duckdb") or (
        str(Path(os.sys.executable).parent / "duckdb") if (Path(os.sys.executable).parent / "duckdb").exists() else None)


@pytest.mark.skipif(_duckdb_cli() is None, reason="no duckdb CLI (pip install duckdb-cli)")
def test_same_sql_files_run_unchanged_in_the_duckdb_cli(tmp_path):
    out = write_output(tmp_path / "run")
    slices = {"calm": "aesthetic >= 6"}
    (tmp_path / "setup.sql").write_text(table1.setup_sql([out], ["demo"]))
    (tmp_path / "slices.sql").write_text(table1.slices_sql(slices))
    proc = subprocess.run(
        [_duckdb_cli(), "-csv", "-c", f".read {tmp_path / 'setup.sql'}", "-c", f".read {table1.SQL_DIR / 'files.sql'}",
         "-c", f".read {table1.SQL_DIR / 'views.sql'}",
         "-c", f".read {tmp_path / 'slices.sql'}", "-c", f".read {table1.SQL_DIR / 'table1.sql'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cli = {(r["pipeline"], r["dataset"], r["caption"]): r for r in csv.DictReader(io.StringIO(proc.stdout))}
    py = run_table1([out], ["demo"], slices)
    assert set(cli) == set(py)
    for k, r in py.items():
        for col in ("volume", "vn", "dn", "total_noun"):
            assert int(cli[k][col]) == r[col], (k, col)
        assert float(cli[k]["acl"]) == pytest.approx(r["acl"]) and float(cli[k]["avg_nouns"]) == pytest.approx(r["avg_nouns"])


def test_same_numbers_from_an_object_store_output(tmp_path, s3_bucket):
    """Python reads the outputs through pyarrow datasets registered in DuckDB: an s3:// output (moto
    server) gives the numbers of the same files on local disk, also next to a local output."""
    from _sigma import fs

    local = write_output(tmp_path / "run")
    remote = s3_bucket + "/run"
    for p in sorted(local.rglob("*.parquet")):
        fs.write_bytes(fs.join(remote, str(p.relative_to(local))), p.read_bytes())
    want = run_table1([local], ["demo"], {"calm": "aesthetic >= 6"})
    assert run_table1([remote], ["demo"], {"calm": "aesthetic >= 6"}) == want
    both = run_table1([local, remote], ["a", "b"])
    assert both[("a+b", "all", "raw")]["total_noun"] == 2 * want[("demo", "all", "raw")]["total_noun"]
    assert table1.setup_sql([remote]).startswith(f"SET VARIABLE outs = ['{remote}'];")


def test_filter_histograms_and_slices_on_the_filter_columns(tmp_path):
    """filter_hist.sql against a plain recount; a Table 1 slice per filter column; an output scored
    without the filters (no such columns) gives no bins and empty slices, not an error."""
    import math

    import numpy as np

    from curation.stats import report

    rng = np.random.default_rng(24)
    rows = _manifest_rows()
    vals = {c: rng.uniform(lo, hi, len(rows)) for c, lo, hi in (("nsfw", 0, 1), ("watermark", 0, 1),
                                                                  ("clip_similarity", -1, 1))}
    for i, r in enumerate(rows):
        r.update({c: (None if i == 12 else float(v[i])) for c, v in vals.items()})
    out = write_output(tmp_path / "run", rows)
    con = table1.connect([out], ["demo"])
    bins = table1.query(con, "filter_hist").to_pylist()
    for col, (lo, width) in {"nsfw": (0, 0.02), "watermark": (0, 0.02), "clip_similarity": (-1, 0.04)}.items():
        want = {}
        for i, r in enumerate(rows[:12]):
            b = min(math.floor((r[col] - lo) / width + 1e-9), 49)
            n, s = want.get(b, (0, 0))
            want[b] = (n + 1, s + (i <= 5))
        got = {round((x["bin"] - lo) / width): (x["rows"], x["selected"]) for x in bins if x["filter"] == col}
        assert got == want, col
    assert report.filter_hist(table1.query(con, "filter_hist"), str(tmp_path / "f.png"), {"nsfw_max": 0.5})
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    got = run_table1([out], ["demo"], {"safe": "nsfw <= 0.5", "aligned": "clip_similarity >= 0.28"})
    assert got[("demo", "safe", "raw")]["volume"] == sum(r["nsfw"] <= 0.5 for r in rows[:12])
    assert got[("demo", "aligned", "raw")]["volume"] == sum(r["clip_similarity"] >= 0.28 for r in rows[:12])
    plain = write_output(tmp_path / "plain")  # no filter columns at all
    assert table1.query(table1.connect([plain], ["demo"]), "filter_hist").num_rows == 0
    got = run_table1([plain], ["demo"], {"safe": "nsfw <= 0.5"})
    assert all(v["volume"] == 0 for k, v in got.items() if k[1] == "safe")

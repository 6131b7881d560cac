"""Run the caption-statistics SQL (curation/sql/*.sql) with DuckDB and format paper Table 1.

The SQL files run unchanged in the duckdb CLI and here: they read the views of `views.sql`, which
take their parameters from DuckDB variables (`SET VARIABLE outs = [...]`) and read two source views.
Here the sources are pyarrow datasets registered in DuckDB (`_sigma.manifest.manifest_dataset`, the
per-part noun files), scanned lazily through _sigma.fs: local and object-store outputs alike. The
CLI defines them with `files.sql` (local globs: local outputs only). `setup_sql` writes the SET
statements, `slices_sql` the view of the configured slices; both are also saved under
`<output>/report/` so the same numbers can be reproduced in the CLI.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import pyarrow as pa

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
TABLE1_COLUMNS = ("pipeline", "dataset", "caption", "volume", "vn", "dn", "total_noun", "acl", "avg_nouns")

# The paper's Table 1 (PixArt-Sigma, arXiv 2403.04692): dataset, volume, caption, VN, DN, total nouns,
# ACL, average nouns per image. K = 1e3, M = 1e6 as printed in the paper.
PAPER_TABLE1 = (
    ("Internal-α", 14e6, "Raw", 187e3, 931e3, 175e6, 25, 11.7),
    ("Internal-α", 14e6, "LLaVA", 28e3, 215e3, 536e6, 98, 29.3),
    ("Internal-α", 14e6, "Share-Captioner", 51e3, 420e3, 815e6, 184, 54.4),
    ("Internal-Σ", 33e6, "Raw", 294e3, 1512e3, 485e6, 35, 14.4),
    ("Internal-Σ", 33e6, "Share-Captioner", 77e3, 714e3, 1804e6, 180, 53.6),
    ("4K-Σ", 2.3e6, "Share-Captioner", 24e3, 96e3, 115e6, 163, 49.5),
)


def sql_text(name: str) -> str:
    return (SQL_DIR / f"{name}.sql").read_text()


def _lit(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def setup_sql(outs: list[str | Path], pipelines: list[str] | None = None, vn_min_count: int = 10) -> str:
    """SET VARIABLE statements that parameterise views.sql (valid in the CLI and in Python)."""
    from _sigma import fs

    lines = [f"SET VARIABLE outs = [{', '.join(_lit(fs.normalize(o)) for o in outs)}];"]
    if pipelines:
        lines.append(f"SET VARIABLE pipelines = [{', '.join(_lit(p) for p in pipelines)}];")
    lines.append(f"SET VARIABLE vn_min_count = {int(vn_min_count)};")
    return "\n".join(lines) + "\n"


def slices_sql(slices: dict[str, str]) -> str:
    """The `extra_slices` view for configured slices (name -> SQL WHERE clause over `manifest`)."""
    if not slices:
        return "-- no configured slices: views.sql's empty extra_slices view stays\n"
    parts = [f"SELECT {_lit(name)} AS dataset, {i} AS ord, src, key FROM manifest WHERE ({where})"
             for i, (name, where) in enumerate(slices.items())]
    return "CREATE OR REPLACE TEMP VIEW extra_slices AS\n" + "\nUNION ALL\n".join(parts) + ";\n"


def register_sources(con, outs) -> None:
    """manifest_files / caption_nouns_files (see views.sql) over pyarrow datasets of each output."""
    from _sigma import manifest
    from curation.stats.extract import nouns_dataset

    views = {"manifest_files": [], "caption_nouns_files": []}
    for i, out in enumerate(outs, 1):
        con.register(f"_manifest_{i}", manifest.manifest_dataset(out))
        con.register(f"_nouns_{i}", nouns_dataset(out))
        views["manifest_files"].append(f"SELECT {i}::INTEGER AS src, * FROM _manifest_{i}")
        views["caption_nouns_files"].append(f"SELECT {i}::INTEGER AS src, * FROM _nouns_{i}")
    for name, selects in views.items():
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS " + "\nUNION ALL BY NAME\n".join(selects))


def connect(outs, pipelines=None, slices=None, vn_min_count: int = 10):
    """A DuckDB connection with the views of views.sql over `outs` (and the configured slices)."""
    import duckdb

    con = duckdb.connect()
    con.execute(setup_sql(outs, pipelines, vn_min_count))
    register_sources(con, outs)
    con.execute(sql_text("views"))
    for name, where in (slices or {}).items():  # check each clause alone so an error names its slice
        try:
            con.execute(f"SELECT count(*) FROM manifest WHERE ({where})").fetchall()
        except duckdb.Error as e:
            from _sigma.config import ConfigError

            raise ConfigError(f"stats.slices.{name}: {where!r} is not a valid WHERE clause over the manifest: "
                              f"{str(e).splitlines()[0]}") from None
    con.execute(slices_sql(slices or {}))
    return con


def cli_help(report_dir: str) -> str:
    """How to rerun the same SQL files in the duckdb CLI (written into table1.md)."""
    return ("Same numbers in the duckdb CLI (`pip install duckdb-cli`; local outputs only: files.sql globs "
            "local folders, so copy an object-store output locally first):\n\n```\n"
            f"duckdb -c \".read {report_dir}/stats_setup.sql\" -c \".read {SQL_DIR}/files.sql\" \\\n"
            f"       -c \".read {SQL_DIR}/views.sql\" \\\n"
            f"       -c \".read {report_dir}/stats_slices.sql\" -c \".read {SQL_DIR}/table1.sql\"\n```\n"
            "Other queries: caption_lengths.sql, aesthetic_hist.sql, status_breakdown.sql (same views).\n"
            "Volume = images with that caption kind; VN = distinct nouns occurring more than "
            "vn_min_count (10) times; DN = distinct nouns; ACL = mean words per caption; "
            "Average = nouns per image.\n")


def query(con, name: str) -> pa.Table:
    """Run curation/sql/<name>.sql on `con`; the result of its last statement as a pyarrow table."""
    rel = con.sql(sql_text(name))
    return rel.to_arrow_table() if rel is not None else pa.table({})


# --- presentation -------------------------------------------------------------------------------

def human(n: float, k_below: float = 1e6) -> str:
    """Paper-style counts: exact below 10,000, then 931K (below `k_below`), 2.3M, 175M."""
    n = float(n)
    if abs(n) < 10_000:
        return f"{n:.0f}"
    if abs(n) < k_below:
        return f"{n / 1e3:.0f}K"
    return f"{n / 1e6:.1f}M" if abs(n) < 1e7 else f"{n / 1e6:.0f}M"


def _vocab(vn: float, dn: float) -> str:
    return f"{human(vn, 1e7)}/{human(dn, 1e7)}"  # the paper writes vocabularies in K (1512K)


def display_rows(table: pa.Table, paper: bool = False) -> list[dict]:
    """Rows in the paper's layout: Dataset, Volume, Caption, VN/DN, Total Noun, ACL, Average.

    Dataset is the slice name, prefixed with `pipeline:` when the table covers several pipelines.
    """
    data = table.to_pylist()
    several = len({r["pipeline"] for r in data}) > 1
    rows = []
    for r in data:
        name = f"{r['pipeline']}:{r['dataset']}" if several else r["dataset"]
        rows.append({"Source": "ours", "Dataset": name, "Volume": human(r["volume"]), "Caption": r["caption"],
                     "VN/DN": _vocab(r["vn"], r["dn"]), "Total Noun": human(r["total_noun"]),
                     "ACL": f"{r['acl']:.1f}", "Average": f"{r['avg_nouns']:.1f}/Img"})
    if paper:
        for d, vol, cap, vn, dn, tot, acl, avg in PAPER_TABLE1:
            rows.append({"Source": "paper", "Dataset": d, "Volume": human(vol), "Caption": cap,
                         "VN/DN": _vocab(vn, dn), "Total Noun": human(tot), "ACL": f"{acl}",
                         "Average": f"{avg}/Img"})
    return rows


def to_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no captions)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_text(rows: list[dict]) -> str:
    """Aligned plain-text table for the terminal."""
    if not rows:
        return "(no captions)\n"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda vals: "  ".join(str(v).ljust(width[c]) for c, v in zip(cols, vals))  # noqa: E731
    return "\n".join([line(cols), line(["-" * width[c] for c in cols])] + [line([r[c] for c in cols]) for r in rows]) + "\n"


def to_csv(table: pa.Table) -> str:
    """Exact numbers (no rounding), one row per (pipeline, dataset, caption kind)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(TABLE1_COLUMNS)
    for r in table.to_pylist():
        w.writerow([r[c] for c in TABLE1_COLUMNS])
    return buf.getvalue()

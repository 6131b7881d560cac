"""URL lists in every supported format become keyed parts; a different list is refused."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _sigma.config import parse
from curation.config import InputConfig
from curation.inputs import InputError, make_key, prepare_inputs, read_input_part


def _write(tmp_path, fmt, urls, caps):
    p = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"link": urls, "alt": caps}), p)
    elif fmt == "csv":
        p.write_text("link,alt\n" + "".join(f"{u},{c}\n" for u, c in zip(urls, caps)))
    elif fmt == "jsonl":
        p.write_text("".join(json.dumps({"link": u, "alt": c}) + "\n" for u, c in zip(urls, caps)))
    else:
        p.write_text("\n".join(urls) + "\n")
    return p


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "txt"])
def test_formats_parts_and_stable_keys(tmp_path, fmt):
    urls = [f"http://127.0.0.1/{i}.jpg" for i in range(7)]
    caps = [f"cap {i}" for i in range(7)]
    path = _write(tmp_path, fmt, urls, caps)
    cfg = parse(InputConfig, {"path": str(path), "url_col": "link", "caption_col": "alt", "part_size": 3})
    info = prepare_inputs(cfg, tmp_path / "out")
    assert info["rows"] == 7 and info["parts"] == 3
    parts = [read_input_part(tmp_path / "out", p) for p in range(3)]
    assert [t.num_rows for t in parts] == [3, 3, 1]
    keys = [k for t in parts for k in t.column("key").to_pylist()]
    assert keys == [make_key(i // 3, i % 3) for i in range(7)] and all("." not in k for k in keys)
    assert [u for t in parts for u in t.column("url").to_pylist()] == urls
    if fmt != "txt":
        assert parts[0].column("caption").to_pylist() == caps[:3]
    assert prepare_inputs(cfg, tmp_path / "out") == info  # idempotent rerun


def test_a_different_list_into_the_same_output_is_refused(tmp_path):
    a = _write(tmp_path, "csv", ["http://a/1.jpg"], ["x"])
    cfg = parse(InputConfig, {"path": str(a), "url_col": "link", "caption_col": "alt"})
    prepare_inputs(cfg, tmp_path / "out")
    a.write_text("link,alt\nhttp://a/2.jpg,y\n")
    with pytest.raises(InputError, match="different URL list"):
        prepare_inputs(cfg, tmp_path / "out")


def test_malformed_lists(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="cannot read as parquet"):
        prepare_inputs(parse(InputConfig, {"path": str(bad)}), tmp_path / "o1")
    with pytest.raises(InputError, match="no such file"):
        prepare_inputs(parse(InputConfig, {"path": str(tmp_path / "missing.csv")}), tmp_path / "o2")
    odd = tmp_path / "urls.xyz"
    odd.write_text("x")
    with pytest.raises(InputError, match="cannot tell the format"):
        prepare_inputs(parse(InputConfig, {"path": str(odd)}), tmp_path / "o3")


@pytest.mark.parametrize("fmt, column, type_text", [
    ("parquet", pa.array([["http://a/1.jpg", "http://a/2.jpg"], ["http://a/3.jpg"]]), "list<"),
    ("parquet", pa.array([{"href": "http://a/1.jpg", "w": 1}, {"href": "http://a/3.jpg", "w": 2}]), "struct<"),
    ("parquet", pa.array([[("u", "http://a/1.jpg")], [("u", "http://a/3.jpg")]],
                         pa.map_(pa.string(), pa.string())), "map<"),
    ("jsonl", [{"href": "http://a/1.jpg"}, {"href": "http://a/3.jpg"}], "struct<"),
    ("jsonl", [["http://a/1.jpg"], ["http://a/3.jpg"]], "list<"),
])
def test_a_nested_url_column_is_a_one_line_error_naming_column_and_type(tmp_path, fmt, column, type_text):
    """A url column holding lists, structs or maps cannot be cast to a URL string (today:
    ArrowNotImplementedError from the cast, a traceback): one line naming the column and its type."""
    p = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"link": column, "alt": ["a", "b"]}), p)
    else:
        p.write_text("".join(json.dumps({"link": u, "alt": "x"}) + "\n" for u in column))
    cfg = parse(InputConfig, {"path": str(p), "url_col": "link", "caption_col": "alt"})
    with pytest.raises(InputError) as e:
        prepare_inputs(cfg, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and "'link'" in msg and type_text in msg and str(p) in msg, msg
    assert not (tmp_path / "out" / "input").exists() or not list((tmp_path / "out" / "input").glob("part-*"))


def test_a_nested_caption_column_is_refused_too(tmp_path):
    p = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://a/1.jpg"], "caption": [{"en": "a cat"}]}), p)
    with pytest.raises(InputError, match=r"input.caption_col 'caption' .*struct<"):
        prepare_inputs(parse(InputConfig, {"path": str(p)}), tmp_path / "out")


def test_the_command_exits_2_with_the_one_line_reason(tmp_path, capsys):
    from pathlib import Path

    from curation import run as run_mod

    p = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [["http://a/1.jpg"]]}), p)
    repo = Path(__file__).resolve().parents[2]
    rc = run_mod.main(["--config", str(repo / "pipelines.yaml"), "--pipeline", "demo", "--output",
                       str(tmp_path / "out"), "--input", str(p), "--stages", "download", "--no-progress"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]  # (Ray may log a notice too)
    assert rc == 2 and len(err) == 1 and "input.url_col 'url'" in err[0] and "list<" in err[0], err

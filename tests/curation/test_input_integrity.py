"""Input parts are verified like manifest parts (issue 22 item 3): each `<out>/input/part-*.parquet`
has a size/sha256 record; a truncated or corrupt part is rebuilt from the URL list by the next run,
and an unreadable `input/_inputs.json` is a clear error or a rebuild, never a traceback."""
from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _sigma.config import parse
from curation.config import InputConfig
from curation.inputs import InputError, input_rows, prepare_inputs, read_input_part


def _list(tmp_path, n=7, name="urls.parquet", host="a"):
    p = tmp_path / name
    urls, caps = [f"http://{host}/{i}.jpg" for i in range(n)], [f"c{i}" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": caps}), p)
    return parse(InputConfig, {"path": str(p), "part_size": 3})


def test_parts_have_size_and_sha256_records(tmp_path):
    cfg = _list(tmp_path)
    info = prepare_inputs(cfg, tmp_path / "out")
    for p in range(info["parts"]):
        data = (tmp_path / "out" / "input" / f"part-{p:05d}.parquet").read_bytes()
        rec = json.loads((tmp_path / "out" / "input" / "_sums" / f"part-{p:05d}.json").read_text())
        assert (rec["size"], rec["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        assert rec["list"] == info["hash"] and rec["part_size"] == 3


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_part_is_rebuilt_by_the_next_run(tmp_path, capsys, damage):
    cfg = _list(tmp_path)
    out = tmp_path / "out"
    info = prepare_inputs(cfg, out)
    want = [read_input_part(str(out), p) for p in range(info["parts"])]
    part = out / "input" / "part-00001.parquet"
    data = part.read_bytes()
    if damage == "truncate":
        part.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        part.write_bytes(data[:40] + bytes([data[40] ^ 1]) + data[41:])
    else:
        part.unlink()
    capsys.readouterr()
    assert prepare_inputs(cfg, out) == info
    assert "input: part 1 is rebuilt from the URL list" in capsys.readouterr().err
    assert part.read_bytes() == data  # the same bytes as first written
    assert [read_input_part(str(out), p) for p in range(info["parts"])] == want and input_rows(str(out), 1) == 3


def test_an_unreadable_inputs_json_is_rebuilt_or_refused_cleanly(tmp_path):
    cfg = _list(tmp_path)
    out = tmp_path / "out"
    info = prepare_inputs(cfg, out)
    done = out / "input" / "_inputs.json"
    done.write_text(done.read_text()[:25])  # truncated
    assert prepare_inputs(cfg, out) == info  # the parts' records name this list: rebuilt
    assert json.loads(done.read_text()) == info
    done.write_text("[]")
    other = _list(tmp_path, name="other.parquet", host="b")  # another list into the same output
    with pytest.raises(InputError, match=r"_inputs.json is unreadable .*different URL list"):
        prepare_inputs(other, out)
    # an output prepared before the records existed, with a corrupt _inputs.json: refused, clearly
    for rec in (out / "input" / "_sums").iterdir():
        rec.unlink()
    with pytest.raises(InputError, match=r"_inputs.json is unreadable .*no record of the URL list"):
        prepare_inputs(cfg, out)

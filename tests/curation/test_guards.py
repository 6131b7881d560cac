"""Config and input guards: bad values refused before anything is written, secrets redacted in the
saved config, decode errors without object reprs, part numbers past 99999 in img2dataset's order."""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from _sigma.config import ConfigError, parse
from _sigma.images import decode_image
from curation import run as run_mod
from curation.config import RESERVED_COLUMNS, RESERVED_PREFIXES, InputConfig

REPO = Path(__file__).resolve().parents[2]


def test_config_errors_are_refused_before_anything_is_written(tmp_path, capsys):
    base = ["--config", str(REPO / "pipelines.yaml"), "--pipeline", "demo", "--output", str(tmp_path / "out"),
            "--input", str(tmp_path / "u.csv"), "--no-progress"]
    for extra, needle in (
        (["--stages", ","], "--stages ','"),
        (["--stages", "download", "--set", "download.timeout=.inf"], "timeout: got inf"),
        (["--stages", "download", "--set", "download.deadline=0"], "deadline: got 0"),
        (["--stages", "download", "--set", "score.max_pixels=-1"], "max_pixels: got -1"),
        (["--stages", "download", "--set", "input.extra_cols=[status]"], "extra_cols: 'status'"),
        (["--stages", "download", "--set", "input.extra_cols=[key]"], "extra_cols: 'key'"),
        (["--stages", "download", "--set", "input.extra_cols=[aesthetic]"], "extra_cols: 'aesthetic'"),
        (["--stages", "download", "--set", "input.extra_cols=[caption_long]"], "extra_cols: 'caption_long'"),
        (["--stages", "download", "--set", "download.allowed_networks=[nonsense]"], "not a CIDR"),
    ):
        assert run_mod.main(base + extra) == 2
        assert needle in capsys.readouterr().err, extra
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="sigma_key"):  # the same through the config API
        parse(InputConfig, {"extra_cols": ["sigma_key"]})


def test_reserved_columns_cover_every_column_a_stage_writes():
    from captioning.worker import OUT_SCHEMA

    for name in OUT_SCHEMA.names:
        assert name in RESERVED_COLUMNS or name.startswith(RESERVED_PREFIXES), name


def test_a_refused_run_keeps_the_saved_config_and_secrets_are_redacted(tmp_path, capsys, ray_local):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.resolved.yaml").write_text("previous run\n")
    (tmp_path / "empty.csv").write_text("")
    args = ["--config", str(REPO / "pipelines.yaml"), "--pipeline", "demo", "--output", str(out),
            "--stages", "download", "--no-progress", "--set", "caption.runtime_env_vars={HF_TOKEN: hf_s3cr3t, A: b}"]
    assert run_mod.main(args + ["--input", str(tmp_path / "empty.csv")]) == 2
    assert "empty" in capsys.readouterr().err
    assert (out / "config.resolved.yaml").read_text() == "previous run\n"
    # An accepted run saves the config, without the secret.
    from _sigma.config import save_resolved
    from curation.run import resolve

    cfg, _ = resolve(run_mod.parse_args(args + ["--input", str(tmp_path / "empty.csv")]))
    save_resolved(cfg, str(out))
    text = (out / "config.resolved.yaml").read_text()
    assert "hf_s3cr3t" not in text
    assert yaml.safe_load(text)["resolved"]["caption"]["runtime_env_vars"] == {"HF_TOKEN": "<redacted>", "A": "<redacted>"}


def test_decode_errors_name_the_problem_not_a_bytesio():
    for data, needle in ((b"\x00garbage" * 20, "cannot identify image format"),
                         (b"\x1f\x8b\x08\x00" + b"\x00" * 40, "gzip-compressed")):
        img, info = decode_image(data)
        assert img is None and needle in info["error"] and "BytesIO" not in info["error"] and "0x" not in info["error"]


def test_img2dataset_reads_parts_in_number_order(tmp_path):
    """Sorted by name, part-100000 would come before part-10001 and shard i != part i."""
    from curation.i2d import _Reader

    for p in (99999, 100000, 10001, 10000, 2):
        pq.write_table(pa.table({"url": ["http://x/1.jpg"], "sigma_key": [f"{p:05d}_000000"]}),
                       tmp_path / f"part-{p:05d}.parquet")
    r = _Reader(str(tmp_path), "parquet", "url", None, None, None, ["sigma_key"], 1, set(), str(tmp_path / "_tmp"), 0)
    assert [Path(f).name for f in r.input_files] == [f"part-{p:05d}.parquet" for p in (2, 10000, 10001, 99999, 100000)]
    assert Path(r.tmp_path).parent == tmp_path / "_tmp" and Path(r.tmp_path).is_dir()  # private temp folder

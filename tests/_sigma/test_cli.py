"""Every console script of pyproject.toml, run the way the installed script runs it (its entry
function with sys.argv set): `--help` names the script, gives each option a help text and its
default and imports no heavy library; `--version` answers; an error in the user's input is one line
on stderr with exit status 2, and nothing is written."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
HEAVY = ("torch", "ray", "transformers", "diffusers", "open_clip", "pyarrow.dataset")

_RUN = """
import importlib, sys
mod, fn, heavy = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
sys.argv = [sys.argv[4]] + sys.argv[5:]
try:
    code = getattr(importlib.import_module(mod), fn)()
except SystemExit as e:
    code = e.code
print("HEAVY=" + ",".join(h for h in heavy if h in sys.modules), file=sys.stderr)
sys.exit(code if isinstance(code, int) else 0 if code is None else 1)
"""


def run_script(name: str, *args: str, cwd: Path = REPO) -> tuple[int, str, str, list[str]]:
    mod, fn = SCRIPTS[name].split(":")
    r = subprocess.run([sys.executable, "-c", _RUN, mod, fn, ",".join(HEAVY), name, *args], cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    err, _, heavy = r.stderr.rpartition("HEAVY=")
    return r.returncode, r.stdout, err, [h for h in heavy.strip().split(",") if h]


def _option_blocks(help_text: str) -> dict[str, str]:
    """{first option string: its help text} of the 'options:' section."""
    body = help_text.split("options:", 1)[1]
    blocks, cur = {}, None
    for line in body.splitlines():
        m = re.match(r"^  (-{1,2}[\w-]+)", line)
        if m:
            cur = m.group(1)
            blocks[cur] = line
        elif cur and line.startswith("   "):
            blocks[cur] += " " + line.strip()
        else:
            cur = None
    return blocks


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_and_version(name):
    rc, out, err, heavy = run_script(name, "--help")
    assert rc == 0, err[-2000:]
    assert out.startswith(f"usage: {name} "), out[:200]
    assert not heavy, f"{name} --help imported {heavy}"  # help must not wait for torch / Ray
    blocks = _option_blocks(out)
    assert "--version" in blocks
    for opt, text in blocks.items():
        if opt in ("-h", "--version"):
            continue
        assert re.search(r"default: |\(required\)", " ".join(text.split())), f"{name} {opt}: {text}"
        assert len(text.split()) > 2 + text.count("default"), f"{name} {opt} has no help text: {text}"
    rc, out, err, heavy = run_script(name, "--version")
    assert rc == 0 and out.strip() == f"{name} (sigma-pipeline {_version()})" and not heavy


def _version() -> str:
    from importlib.metadata import version

    return version("sigma-pipeline")


def test_curate_help_lists_pipelines_and_stages():
    rc, out, _, _ = run_script("sigma-curate", "--help")
    assert rc == 0 and "download -> score -> dedup -> select -> caption -> eval_split -> features -> stats" in out
    assert "demo, pixart-sigma" in out
    rc, out, _, _ = run_script("sigma-train", "--help")
    assert "demo-256, demo-512, demo-512-kv" in out


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    out = str(tmp / "out")
    (tmp / "a-file").write_text("x")
    return {
        "sigma-curate": (["--pipeline", "demo", "--input", str(tmp / "urls.parquet"), "--output", out],
                         "--input .*urls.parquet: no such file or folder"),
        "sigma-stats": (["--pipeline", "demo", "--output", out], "has no manifest"),
        "sigma-browse": (["--output", out], "no such folder"),
        "sigma-demo": (["--root", str(tmp)], "no such file"),
        "sigma-tiny-models": (["--only", "nope", "--out", out], "unknown package 'nope'"),
        "sigma-train": (["--stage", "demo-265"], "no such stage"),
        "sigma-sample": (["--checkpoint", str(tmp / "ckpt"), "--prompt", "a cat", "--t5", "models/tiny/t5",
                          "--vae", "models/tiny/vae", "--out", out], "--checkpoint .*: no such file or folder"),
        "sigma-convert": (["--to-diffusers", str(tmp / "x.pth"), out], "no such file or folder"),
        "sigma-eval-benchmark": (["--pipeline", "dmeo", "--set", f"output={out}"], "pipeline 'dmeo' not found"),
        "sigma-eval-generate": (["--pipeline", "demo", "--checkpoint", str(tmp / "ckpt"), "--set", f"output={out}"],
                                "--checkpoint .*: no such file or folder"),
        "sigma-eval-score": (["--pipeline", "demo", "--set", f"output={out}", "--set",
                              f"score.aesthetic_weights={tmp}/aes.pth"], "aes.pth does not exist"),
        "sigma-eval-preference": (["bogus"], "invalid choice"),
        "sigma-eval-table3": (["--pipeline", "demo", "--checkpoint", f"kv={tmp}/ckpt", "--set", f"output={out}"],
                              "--checkpoint .*ckpt: no such file or folder"),
        "sigma-fid-weights": (["--out", str(tmp / "a-file")], "is a file"),
        "sigma-upload-models": (["--pipeline", "demo", "--to", out], "give an s3:// or gs:// folder"),
    }


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_bad_input_is_one_line_exit_2_nothing_written(name, tmp_path):
    cases = _bad_inputs(tmp_path)
    assert set(cases) == set(SCRIPTS)  # a new console script needs its case here
    args, pattern = cases[name]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err, _ = run_script(name, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, out[-1000:], err[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error: ") and re.search(pattern, lines[0]), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --out, no _lock.json, nothing


def test_sample_mistyped_t5_fails_before_loading(tmp_path, tiny_models):
    rc, out, err, heavy = run_script("sigma-sample", "--checkpoint", str(tiny_models / "dit"), "--prompt", "x",
                                     "--t5", "DeepFloyd/t5-v1_1-xxx", "--vae", str(tiny_models / "vae"),
                                     "--out", str(tmp_path / "o"))
    assert rc == 2 and err.strip().startswith("sigma-sample: error: --t5 DeepFloyd/t5-v1_1-xxx: not a local path")
    assert "torch" not in heavy and not (tmp_path / "o").exists()

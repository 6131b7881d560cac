"""Config parsing: strict keys, types, values, model paths, overrides, the shipped pipelines.yaml."""
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from _sigma.config import ConfigError, apply_overrides, check_paths, parse, save_resolved
from curation.config import PipelineConfig, load_pipeline

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Inner:
    size: int = 3
    mode: str = "a"

    def __post_init__(self):
        if self.mode not in ("a", "b"):
            raise ConfigError(f"mode: got {self.mode!r}, allowed: a | b")


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = Inner()
    ratio: float = 0.5
    tags: tuple[str, ...] = ()
    weights: str = field(default="", metadata={"path": True})


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as e:
        parse(Outer, {"name": "x", "inner": {"sise": 4}}, "p")
    msg = str(e.value)
    assert "p.inner" in msg and "'sise'" in msg and "mode, size" in msg


def test_wrong_type_and_bad_value_and_missing_required():
    with pytest.raises(ConfigError, match=r"p\.inner\.size: got 'four', allowed: an integer"):
        parse(Outer, {"name": "x", "inner": {"size": "four"}}, "p")
    with pytest.raises(ConfigError, match=r"p\.inner.*mode: got 'c', allowed: a \| b"):
        parse(Outer, {"name": "x", "inner": {"mode": "c"}}, "p")
    with pytest.raises(ConfigError, match=r"p\.name: required key is missing"):
        parse(Outer, {}, "p")
    with pytest.raises(ConfigError, match="true | false"):
        parse(Inner, {"size": True}, "p") if False else parse(PipelineConfig, {"name": "n", "output": "o", "dedup": {"exact": "yes"}}, "p")


def test_values_are_typed_and_frozen():
    cfg = parse(Outer, {"name": "x", "ratio": 1, "tags": ["a", "b"]}, "p")
    assert cfg.ratio == 1.0 and isinstance(cfg.ratio, float) and cfg.tags == ("a", "b")
    with pytest.raises(Exception):
        cfg.ratio = 2.0  # frozen


def test_missing_local_model_path_reported(tmp_path):
    cfg = parse(Outer, {"name": "x", "weights": str(tmp_path / "nope.pth")}, "p")
    with pytest.raises(ConfigError, match=r"p\.weights: .*nope\.pth does not exist"):
        check_paths(cfg, "p")
    check_paths(parse(Outer, {"name": "x", "weights": "org/hub-model"}, "p"), "p")  # hub ids are not checked


def test_overrides_parse_yaml_values():
    d = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "x.y=true", "s=hello"])
    assert d == {"a": {"b": 2, "c": [1, 2]}, "x": {"y": True}, "s": "hello"}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])


def test_shipped_pipelines_parse_and_resolve(tmp_path, tiny_models):
    import os

    os.chdir(REPO)
    demo = load_pipeline(str(REPO / "pipelines.yaml"), "demo")
    assert demo.select.min_side == 256 and demo.name == "demo"
    sigma = load_pipeline(str(REPO / "pipelines.yaml"), "pixart-sigma", check=False)
    assert sigma.score.clip_model == "ViT-L-14" and sigma.score.clip_pretrained == "openai"
    assert sigma.select.min_side == 1024 and sigma.select.max_aspect_ratio == 4.5
    over = load_pipeline(str(REPO / "pipelines.yaml"), "demo", ["select.min_side=64", "score.resources.actors=2"])
    assert over.select.min_side == 64 and over.score.resources.actors == 2
    with pytest.raises(ConfigError, match="unknown key 'min_sid'"):
        load_pipeline(str(REPO / "pipelines.yaml"), "demo", ["select.min_sid=64"])
    with pytest.raises(ConfigError, match="pipeline 'nope' not found; available: "):
        load_pipeline(str(REPO / "pipelines.yaml"), "nope")
    path = save_resolved(over, tmp_path)
    saved = yaml.safe_load(open(path).read())["resolved"]
    assert saved["select"]["min_side"] == 64 and saved["score"]["resources"]["actors"] == 2


def test_cli_reports_config_errors_before_work(tmp_path, capsys):
    from curation import run

    rc = run.main(["--config", str(REPO / "pipelines.yaml"), "--pipeline", "demo", "--output", str(tmp_path / "o"),
                   "--set", "dedup.candidate_threshold=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "dedup" in err and "threshold" in err
    assert not (tmp_path / "o").exists()  # nothing was started


def test_duplicated_yaml_key_is_refused_naming_key_file_and_lines(tmp_path):
    """Issue 22 item 14: a key written twice in one mapping used to keep the last value silently."""
    from _sigma.config import load_yaml

    p = tmp_path / "pipelines.yaml"
    p.write_text("pipelines:\n  a:\n    output: x\n    select:\n      min_side: 512\n      aesthetic_min: 5\n"
                 "      min_side: 1024\n")
    with pytest.raises(ConfigError, match=rf"{p}:7: duplicate key 'min_side' \(first at line 5\)"):
        load_yaml(p)
    # merges (`<<:`) and a key overriding a merged one are not duplicates
    p.write_text("base: &b {min_side: 512, aesthetic_min: 5}\npipelines:\n  a:\n    select:\n      <<: *b\n"
                 "      min_side: 1024\n")
    assert load_yaml(p)["pipelines"]["a"]["select"] == {"min_side": 1024, "aesthetic_min": 5}
    with pytest.raises(ConfigError, match="duplicate key 'k'"):
        apply_overrides({}, ["a.b={k: 1, k: 2}"])

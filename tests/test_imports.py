"""The import direction of docs/ARCHITECTURE.md, checked on every module's AST (no import runs).

Layers, bottom up:
  base           _sigma.*  imports no other package of the repo.
  config layer   <stage>.config: the config dataclasses of pipelines.yaml (no stage code, no torch);
                 imports only the base and other config modules. Any module may import it.
  stages         curation, captioning, features, training, eval: import the base, the config layer,
                 their own package, and of another stage package only the top-level public names it
                 exports in `__all__` of its `__init__.py` (`from training import load_dit`), never
                 its submodules.
  orchestration  ORCHESTRATION below: run the stages in order, build the models; import anything.
Also: no module guards an in-repo import with `except ImportError` (a missing in-repo module is a
bug to see, not a fallback to take).
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASE = "_sigma"
STAGES = ("curation", "captioning", "features", "training", "eval")
PACKAGES = (BASE, *STAGES)
CONFIG = {f"{p}.config" for p in STAGES}
ORCHESTRATION = {
    "curation.run",  # runs every stage in pipeline order
    "curation.tiny_models",  # builds each package's tiny models (`<pkg>.tiny`)
    "curation.real_size",  # the real-size smoke: every stage's code on real-size random models
}
RENAMED = {"common": "_sigma"}  # an old checkout's editable install may still resolve the old name
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def in_repo(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _imports(module: str, tree: ast.AST, is_pkg: bool):
    """(line, imported module, names or None) of every import, relative ones resolved; also
    importlib.import_module / __import__ of a literal name."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                yield n.lineno, a.name, None
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = module.split(".")
                base = base[:len(base) - n.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([n.module] if n.module else []))
            else:
                target = n.module
            yield n.lineno, target, [a.name for a in n.names]
        elif (isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant)
              and isinstance(n.args[0].value, str)
              and ((isinstance(n.func, ast.Attribute) and n.func.attr == "import_module")
                   or (isinstance(n.func, ast.Name) and n.func.id in ("import_module", "__import__")))):
            yield n.lineno, n.args[0].value, None


def public_api(package: str) -> set[str]:
    return set(getattr(importlib.import_module(package), "__all__", ()))


def violations(module: str, source: str, is_pkg: bool = False, api=public_api) -> list[str]:
    """Every breach of the layer rules by one module (its dotted name and source text)."""
    tree = ast.parse(source)
    own = module.split(".")[0]
    out = []
    for line, target, names in _imports(module, tree, is_pkg):
        if target.split(".")[0] in RENAMED:
            out.append(f"{module}:{line} imports {target}: renamed to {RENAMED[target.split('.')[0]]}")
        if not in_repo(target) or target.split(".")[0] == own:
            continue
        top = target.split(".")[0]
        where = f"{module}:{line} imports {target}" + (f" ({', '.join(names)})" if names else "")
        if module in ORCHESTRATION or top == BASE:
            continue
        if own == BASE:
            out.append(f"{where}: the base layer imports nothing above it")
        elif target in CONFIG:
            continue
        elif module in CONFIG:
            out.append(f"{where}: a config module imports only the base and other config modules")
        elif target != top or names is None:
            out.append(f"{where}: another stage package is used only through its top-level public API")
        else:
            bad = [n for n in names if n not in api(top)]
            if bad:
                out.append(f"{where}: {', '.join(bad)} not in {top}.__all__")
    for n in ast.walk(tree):
        if not isinstance(n, ast.Try):
            continue
        caught = set()
        for h in n.handlers:
            types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
            caught |= {t.id for t in types if isinstance(t, ast.Name)}
        if caught & IMPORT_ERRORS:
            guarded = [t for stmt in n.body for _, t, _ in _imports(module, stmt, is_pkg) if in_repo(t)]
            if guarded:
                out.append(f"{module}:{n.lineno} guards the in-repo import of {guarded[0]} with except ImportError")
    return out


def repo_modules():
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            yield module_name(path), path
    for folder in ("tests", "benchmarks"):  # only the except-ImportError rule applies here
        for path in sorted((REPO / folder).rglob("*.py")):
            yield None, path


def test_every_module_follows_the_import_direction():
    found = []
    for module, path in repo_modules():
        if module is None:
            found += [v for v in violations("tests." + path.stem, path.read_text())
                      if "except ImportError" in v or "renamed to" in v]
        else:
            found += violations(module, path.read_text(), path.name == "__init__.py")
    assert not found, "\n".join(found)


def test_orchestration_and_config_modules_exist():
    for module in ORCHESTRATION | CONFIG:
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), module


@pytest.mark.parametrize("module, source, expect", [
    ("_sigma.fs", "from features import shards", "base layer"),
    ("_sigma.fs", "def f():\n    import training.model", "base layer"),
    ("eval.generate", "from training.sample import load_dit", "top-level public API"),
    ("eval.generate", "import training", "top-level public API"),
    ("eval.generate", "from training import train", "not in training.__all__"),
    ("eval.generate", "import importlib\nimportlib.import_module('features.t5')", "top-level public API"),
    ("features.config", "from curation.score import Scorer", "config module"),
    ("curation.score", "try:\n    from _sigma.models import load_clip\nexcept ImportError:\n    load_clip = None",
     "except ImportError"),
    ("curation.score", "try:\n    import features.t5\nexcept (ValueError, ModuleNotFoundError):\n    pass",
     "except ImportError"),
])
def test_the_check_finds_each_kind_of_violation(module, source, expect):
    found = violations(module, source, api=lambda pkg: {"load_dit"})
    assert any(expect in v for v in found), found


@pytest.mark.parametrize("module, source", [
    ("eval.generate", "from training import load_dit, sample_latents"),
    ("eval.score", "from curation.config import load_pipeline"),
    ("features.stage", "from _sigma import shards\nfrom features import plan\nfrom . import vae"),
    ("curation.run", "from features.stage import run_features"),
    ("curation.tiny", "try:\n    import skimage.data\nexcept ImportError:\n    pass"),
])
def test_the_check_allows_what_the_rules_allow(module, source):
    assert violations(module, source, api=lambda pkg: {"load_dit", "sample_latents"}) == []

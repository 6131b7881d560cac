"""Console scripts of the eval commands ([project.scripts] in pyproject.toml).

Each module's `main(argv)` returns its results to a Python caller (tests, notebooks); a console
script must return an exit status instead, so these run that main and return 0 (failures raise).
"""
from __future__ import annotations

import importlib


def _script(module: str):
    def run() -> int:
        importlib.import_module(f"eval.{module}").main()
        return 0

    run.__name__ = module
    return run


build_benchmark = _script("build_benchmark")
generate = _script("generate")
score = _script("score")
preference = _script("preference")

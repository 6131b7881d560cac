"""Console scripts of the eval commands ([project.scripts] in pyproject.toml).

Each module's `main(argv)` returns its results to a Python caller (tests, notebooks); a console
script must return an exit status instead, so these run the main and return 0 (failures raise).
"""
from __future__ import annotations


def build_benchmark() -> int:
    from eval.build_benchmark import main

    main()
    return 0


def generate() -> int:
    from eval.generate import main

    main()
    return 0


def score() -> int:
    from eval.score import main

    main()
    return 0


def preference() -> int:
    from eval.preference import main

    main()
    return 0

"""Config of the eval section (light module: no torch import)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class EvalConfig:
    n: int = 30000

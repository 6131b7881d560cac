"""Config of the caption stage (light module: no torch import)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionConfig:
    engine: str = "hf"

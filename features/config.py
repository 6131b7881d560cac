"""Config of the features stage (light module: no torch import)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class FeaturesConfig:
    resolutions: tuple[int, ...] = (256,)

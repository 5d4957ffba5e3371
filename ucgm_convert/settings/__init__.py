"""Typed settings (pydantic): sampling, tuning, the model's config.json and its VAE spec.

Each model validates on construction and reports the first problem as one line naming the field
path and what was expected (settings/base.py). Recipes, which name a family, live one layer up in
ucgm_convert.recipe.
"""

from .base import Settings, SettingsError
from .bench import BenchSettings
from .model import ModelConfig, VaeSpec
from .sampling import SamplingSettings
from .tuning import TuningSettings

__all__ = ["BenchSettings", "ModelConfig", "SamplingSettings", "Settings", "SettingsError", "TuningSettings", "VaeSpec"]

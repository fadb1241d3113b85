"""lm: a byte-level GPT on the running Python's standard-library sources.

The standard workload for the comm hooks and the optimizers.
"""

from pathlib import Path

from gradlane.recipe import Recipe

from .schema import LMData, LMModel
from .train import build

RECIPE = Recipe(
    description="byte-level GPT on the Python stdlib sources (train/val loss, bits per byte)",
    config=Path(__file__).with_name("config.yaml"),
    build=build,
    model=LMModel,
    data=LMData,
)

"""The nerf_distill recipe: config, typed sections and task factory."""

from pathlib import Path

from gradlane.recipe import Recipe

from .schema import NerfData, NerfModel
from .train import build

RECIPE = Recipe(
    description="NeRF progressive volume distillation between mlp/hash/tensorf/plenoxel fields",
    config=Path(__file__).with_name("config.yaml"),
    build=build,
    model=NerfModel,
    data=NerfData,
)

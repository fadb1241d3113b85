"""nerf_distill: progressive volume distillation between radiance-field architectures.

A teacher field (mlp, hash, tensorf or plenoxel) trained from multi-view images
is distilled into a student of any other of the four (Fang et al., AAAI 2023),
on the built-in procedural scene or a data set in the NeRF-synthetic layout.
"""

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

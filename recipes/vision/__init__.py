"""vision: a small ResNet on scikit-learn's bundled handwritten digits.

The home of EvoNorm (`model.norm`) and MIP hypernetworks (`model.hyper`): one
hypernetwork run learns the weights for every label-smoothing setting at once.
"""

from pathlib import Path

from gradlane.recipe import Recipe

from .schema import VisionData, VisionModel
from .train import build

RECIPE = Recipe(
    description="small ResNet on scikit-learn digits (EvoNorm, MIP hypernetworks)",
    config=Path(__file__).with_name("config.yaml"),
    build=build,
    model=VisionModel,
    data=VisionData,
)

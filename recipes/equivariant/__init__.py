"""equivariant: a message-passing interatomic potential on EMT molecular dynamics.

The home of the Gaunt tensor product and frame averaging: `model.backbone`
gaunt | e3nn (the same network with e3nn's Clebsch-Gordan products) |
frame_averaging. Trained on lower temperatures, scored on a held-out higher one.
"""

from pathlib import Path

from gradlane.recipe import Recipe

from .schema import EquivariantData, EquivariantModel
from .train import build

RECIPE = Recipe(
    description="interatomic potential on EMT Cu molecular dynamics (Gaunt, e3nn, frames)",
    config=Path(__file__).with_name("config.yaml"),
    build=build,
    model=EquivariantModel,
    data=EquivariantData,
)

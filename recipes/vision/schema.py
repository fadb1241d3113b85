"""The vision recipe's `model.*` and `data.*` settings, typed and bounded."""

from __future__ import annotations

from dataclasses import dataclass

from gradlane.errors import ConfigError
from gradlane.recipe import param

from .model import NORMS

HYPER = ("none", "mip", "default")


@dataclass
class VisionModel:
    width: int = param(16, ge=1)  # channels of the first stage (then 2x, 4x)
    blocks: int = param(1, ge=1)  # residual blocks per stage (3 stages)
    norm: str = param("batchnorm", choices=NORMS)
    label_smoothing: float = param(0.0, ge=0.0, le=1.0)  # the fixed setting when hyper is none
    hyper: str = param("none", choices=HYPER)  # hypernetwork over the label smoothing
    hyper_params: list[str] = param(["layer3.*", "fc.*"])  # predicted parameters (globs)
    hyper_hidden: list[int] = param([16], ge=1)  # hidden layer sizes of the hypernetwork
    max_smoothing: float = param(0.4, ge=0.0, le=1.0)  # hyper-input s: smoothing s * max
    eval_settings: list[float] = param([0.0, 0.5, 1.0])  # hyper-inputs evaluated

    def check(self) -> None:
        if self.hyper != "none" and not all(0.0 <= s <= 1.0 for s in self.eval_settings):
            raise ConfigError(
                f"model.eval_settings={list(self.eval_settings)}: every item must be in [0, 1] "
                f"with model.hyper={self.hyper!r}"
            )


@dataclass
class VisionData:
    batch_size: int = param(64, ge=1)  # images per worker per step
    image_size: int = param(16, ge=8)  # the 8x8 digits are upsampled (bilinear) to this size
    val_fraction: float = param(0.2, gt=0.0, lt=1.0)  # a fixed split, the same for every run

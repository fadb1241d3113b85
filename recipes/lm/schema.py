"""The lm recipe's `model.*` and `data.*` settings, typed and bounded."""

from __future__ import annotations

from dataclasses import dataclass

from gradlane.errors import ConfigError
from gradlane.recipe import param


@dataclass
class LMModel:
    n_layer: int = param(4, ge=1)  # transformer blocks
    n_head: int = param(4, ge=1)  # attention heads (divide d_model)
    d_model: int = param(128, ge=1)  # width
    context: int = param(128, ge=1)  # bytes seen per prediction
    dropout: float = param(0.0, ge=0.0, lt=1.0)

    def check(self) -> None:
        if self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}"
            )


@dataclass
class LMData:
    batch_size: int = param(16, ge=1)  # sequences per worker per step
    max_bytes: int = param(8_000_000, ge=1)  # training text (bytes); validation is proportional
    val_every: int = param(20, ge=2)  # every val_every-th file (sorted paths) is validation
    eval_batches: int = param(8, ge=1)  # validation windows: eval_batches x batch_size

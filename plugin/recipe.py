"""What a recipe gives the training loop.

A recipe is a sub-package of `gradlane.recipes` (or a third-party package
registered under the `gradlane.recipes` entry-point group) exposing
`RECIPE = Recipe(...)`. Its `build(cfg, ctx)` returns a `Task`: the model and
the three functions the generic loop in `gradlane.training` needs. Batches are
a pure function of (seed, step, rank), so a resumed run sees exactly the data
an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class WorkerContext:
    """Where this training process sits: rank, world size, device and seed."""

    rank: int
    world_size: int
    device: torch.device
    seed: int

    def generator(self, step: int, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded by (seed, step, rank, salt): the same on resume."""
        g = torch.Generator()
        g.manual_seed(hash((self.seed, step, self.rank, salt)) & 0x7FFF_FFFF_FFFF_FFFF)
        return g


class Task:
    """A recipe's model plus how to get a batch, a loss and an evaluation."""

    model: nn.Module

    def batch(self, step: int) -> Any:
        """This rank's batch for `step` (deterministic in seed, step and rank)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of `model` (possibly DDP-wrapped) on `batch`."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics, called on every rank with the unwrapped model."""
        return {}

    def samples(self, batch: Any) -> int:
        """How many samples (tokens, images, rays) one batch holds, for samples/s."""
        return len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)

    def save_artifacts(self, model: nn.Module, outdir: Path) -> None:
        """Write plots or images of the trained model into `outdir` (rank 0 only)."""


@dataclass
class Recipe:
    description: str  # one line, shown by `gradlane list`
    config: Path
    build: Callable[[Any, WorkerContext], Task]

"""What a recipe gives the training loop: typed config sections and a `Task`.

A recipe is a sub-package of `gradlane.recipes` (or a third-party package
registered under the `gradlane.recipes` entry-point group) exposing
`RECIPE = Recipe(description, config, build, model=..., data=...)`:

    from dataclasses import dataclass
    from gradlane.errors import ConfigError
    from gradlane.recipe import Recipe, Task, WorkerContext, param

    @dataclass
    class Model:                                  # the `model.*` keys, typed
        width: int = param(64, ge=1)
        heads: int = param(4, ge=1)
        norm: str = param("layer", choices=("layer", "rms"))

        def check(self) -> None:                  # rules spanning fields (optional)
            if self.width % self.heads:
                raise ConfigError(f"model.width={self.width} must be divisible by "
                                  f"model.heads={self.heads}")

    @dataclass
    class Data:                                   # the `data.*` keys, typed
        batch_size: int = param(32, ge=1)
        n_val: int = param(512, ge=1)

    class MyTask(Task):
        def __init__(self, cfg, ctx: WorkerContext):
            self.model, self.ctx, self.val = ..., ctx, ...   # cfg.model.width etc.

        def evaluate(self, model):
            part = self.ctx.shard(len(self.val))           # this rank's slice
            err = ...                                      # per-item errors on that slice
            return {"mse": (err.sum(), err.numel())}       # (sum, count): reduced by the loop

        def finalize(self, means):                         # optional: after the reduction
            return {**means, "psnr": -10 * math.log10(means["mse"])}

    RECIPE = Recipe("one line for `gradlane list`", Path(__file__).with_name("config.yaml"),
                    lambda cfg, ctx: MyTask(cfg, ctx), model=Model, data=Data)

Types are enforced by OmegaConf and bounds, choices and `check()` by
`gradlane.schema` when the config is composed (`gradlane show` / `run`), so a
bad value stops with one line naming `model.key=value`, before Ray starts. The
recipe's `config.yaml` holds run/trainer/optimizer settings (and may override
model/data defaults). Batches are a pure function of (seed, step, rank), so a
resumed run sees exactly the data an uninterrupted one would. Evaluation is
sharded: each rank returns (sum, count) over its shard, the loop all-reduces
them once and logs sum/count (then `finalize`), the whole set's metrics.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .schema import param

__all__ = ["EvalSums", "Recipe", "Task", "WorkerContext", "param"]

# name -> (sum over this rank's shard, number of items summed); tensors or numbers
EvalSums = dict[str, tuple[torch.Tensor | float, torch.Tensor | float]]


def _mix(*values: int) -> int:
    """A 63-bit seed from integers, the same in every process (ints hash stably)."""
    return hash(values) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class WorkerContext:
    """Where this training process sits: rank, world size, device and seed."""

    rank: int
    world_size: int
    device: torch.device
    seed: int

    def generator(self, step: int, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded by (seed, step, rank, salt): the same on resume."""
        return torch.Generator().manual_seed(_mix(self.seed, step, self.rank, salt))

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of `n` items: [rank*n//world, (rank+1)*n//world)."""
        return slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    def seed_globals(self) -> None:
        """Seed torch, numpy and random from (seed, rank): dropout differs across ranks.

        Called after the model is built from the common seed (and DDP has
        broadcast rank 0's weights), before the first step."""
        seed = _mix(self.seed, self.rank, 0x5EED)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)


class Task:
    """A recipe's model plus how to get a batch, a loss and an evaluation."""

    model: nn.Module

    def batch(self, step: int) -> Any:
        """This rank's batch for `step` (deterministic in seed, step and rank)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of `model` (possibly DDP-wrapped) on `batch`."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> EvalSums:
        """name -> (sum, count) over this rank's shard of the validation set.

        Called on every rank with the unwrapped model in eval mode under
        no_grad; the loop sums each pair over ranks and logs sum / count."""
        return {}

    def finalize(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics from the whole set's means (e.g. PSNR from MSE); default: the means."""
        return means

    def samples(self, batch: Any) -> int:
        """How many samples (tokens, images, rays) one batch holds, for samples/s."""
        return len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)

    def save_artifacts(self, model: nn.Module, outdir: Path) -> None:
        """Write plots or images of the trained model into `outdir` (rank 0 only)."""


@dataclass
class Empty:
    """A section without keys (a recipe with no `data` settings, say)."""


@dataclass
class Recipe:
    description: str  # one line, shown by `gradlane list`
    config: Path  # run/trainer/optimizer settings of the recipe (and model/data overrides)
    build: Callable[[Any, WorkerContext], Task]
    model: type = Empty  # dataclass typing `model.*`
    data: type = Empty  # dataclass typing `data.*`

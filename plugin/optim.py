"""Optimizer registry, `build_optimizer(cfg, params)` and the learning-rate schedule.

An optimizer factory is called as `factory(params, **settings)` and returns a
`torch.optim.Optimizer`. The config keys `schedule`, `warmup_steps` and
`min_lr_ratio` belong to the schedule and are not passed to the factory.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from .errors import ConfigError
from .registry import Registry, bind_params

OPTIMIZERS = Registry("optimizer", "gradlane.optimizers")


def _sgd(
    params,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
):
    """SGD with momentum (torch.optim.SGD)."""
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )


def _adamw(
    params,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
):
    """AdamW (torch.optim.AdamW)."""
    return torch.optim.AdamW(
        params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay
    )


OPTIMIZERS.add("sgd", _sgd)
OPTIMIZERS.add("adamw", _adamw)
OPTIMIZERS.add(
    "mfac",
    "gradlane.optimizers:MFAC",
    "M-FAC: SGD preconditioned by the inverse Fisher of the last `ngrads` gradients",
)

SCHEDULE_KEYS = ("schedule", "warmup_steps", "min_lr_ratio")
SCHEDULES = ("constant", "cosine", "linear")


def build_optimizer(cfg: Any, params) -> torch.optim.Optimizer:
    """The optimizer named `cfg.name`, built with the rest of `cfg` (minus schedule keys)."""
    settings = {k: v for k, v in dict(cfg).items() if k not in SCHEDULE_KEYS}
    name = settings.pop("name", "adamw")
    factory = OPTIMIZERS.get(name)
    settings = bind_params("optimizer", name, factory, settings)
    lr = settings.get("lr")
    if lr is not None and lr < 0:
        raise ConfigError(f"optimizer.lr={lr!r} must be >= 0")
    try:
        return factory(params, **settings)
    except ConfigError:
        raise
    except ValueError as exc:  # the optimizer's own check, e.g. "ngrads=0 must be ..."
        where = "optimizer." if re.match(r"\w+=", str(exc)) else f"optimizer {name!r}: "
        raise ConfigError(f"{where}{exc}") from None


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int):
    """Linear warm-up, then constant, cosine or linear decay to `min_lr_ratio` x lr."""
    cfg = dict(cfg)
    kind = cfg.get("schedule", "constant")
    if kind not in SCHEDULES:
        raise ConfigError(
            f"optimizer.schedule={kind!r} is not allowed; allowed: {', '.join(SCHEDULES)}"
        )
    warmup, floor = cfg.get("warmup_steps", 0), cfg.get("min_lr_ratio", 0.0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"optimizer.warmup_steps={warmup!r} must be an integer >= 0")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
        raise ConfigError(f"optimizer.min_lr_ratio={floor!r} must be a number in [0, 1]")
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / decay_steps)
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if kind == "linear":
            return floor + (1 - floor) * (1 - t)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""Sharded evaluation: every rank scores its shard, one all-reduce makes the whole set's metrics.

A task's `evaluate` returns name -> (sum, count) over this rank's shard; the
metric is sum over ranks / count over ranks (a mean over the whole validation
set, each item counted once), then `Task.finalize` derives what is not a mean.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .recipe import Task


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, device: torch.device) -> dict[str, float]:
    """The whole validation set's metrics from every rank's (sum, count) pairs.

    Every rank must call this (it is a collective) and return the same names."""
    was_training = model.training
    model.eval()
    sums = task.evaluate(model)
    model.train(was_training)
    if not sums:
        return {}
    names = sorted(sums)
    pairs = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64).to(device) for n in names for v in sums[n]]
    )
    if dist.is_initialized():
        dist.all_reduce(pairs)
    values = pairs.view(-1, 2).tolist()
    means = {
        n: total / count if count else math.nan
        for n, (total, count) in zip(names, values, strict=True)
    }
    return task.finalize(means)

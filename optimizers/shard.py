"""Which columns of the flattened gradient this rank's window stores, and the collectives.

Three layouts, decided once at the first step from the parameters the optimizer holds:

* dense: one process, or `shard_window=False` with replicated parameters (DDP): the
  window stores every column and nothing is communicated;
* sliced: `shard_window=True` with replicated parameters: rank r stores columns
  [r*w, (r+1)*w) of the flattened gradient (w = ceil(n/R)); the dot products are summed
  with one all-reduce of m+1 numbers, and the slices of the update are all-gathered so
  every rank applies the same full update;
* partitioned: a wrapper (DeepSpeed ZeRO-1/2) has replaced the parameters by this
  rank's partition, so the optimizer holds tensors it was not built with; the window
  stores the partition, the dot products are all-reduced and no gather is needed
  (the wrapper all-gathers the parameters itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    layout: str  # "dense", "sliced" or "partitioned"
    lo: int  # first stored column of the flattened local gradient
    hi: int  # one past the last stored column
    n: int  # length of the flattened local gradient
    width: int = 0  # slice width of the all-gather ("sliced" only)
    group: object = None  # the process group of the collectives (None: default group)

    def reduce(self, vec: torch.Tensor) -> torch.Tensor:
        """Sum `vec` over the ranks (in place) unless the window is dense."""
        if self.layout != "dense":
            dist.all_reduce(vec, group=self.group)
        return vec

    def gather(self, part: torch.Tensor) -> torch.Tensor:
        """The full update from every rank's slice ("sliced"); `part` itself otherwise."""
        if self.layout != "sliced":
            return part
        padded = torch.zeros(self.width, dtype=part.dtype, device=part.device)
        padded[: part.numel()] = part
        pieces = [torch.empty_like(padded) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(pieces, padded, group=self.group)
        return torch.cat(pieces)[: self.n]


def plan(n: int, partitioned: bool, shard_window: bool, group=None) -> Shard:
    """The layout for `n` local gradient elements; `partitioned`: a wrapper's partition."""
    if not (dist.is_available() and dist.is_initialized()):
        return Shard("dense", 0, n, n)
    world = dist.get_world_size(group)
    if world == 1:
        return Shard("dense", 0, n, n)
    if partitioned:
        return Shard("partitioned", 0, n, n, group=group)
    if not shard_window:
        return Shard("dense", 0, n, n)
    width = -(-n // world)
    lo = min(n, dist.get_rank(group) * width)
    return Shard("sliced", lo, min(n, lo + width), n, width, group)

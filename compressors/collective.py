"""The collectives the compression math talks to, and their torch.distributed implementation.

Every compressor, the error feedback and the L-GreCo controller see only this
small interface, so one copy of the math runs over any transport (the DDP
comm hook here; DeepSpeed's `deepspeed.comm` and Horovod in `gradlane`'s
engine glue):

    rank, world                      this rank and the group's size
    all_reduce(t, async_op=False)    sum `t` over ranks in place; with async_op,
                                     return a handle whose .wait() finishes it
    all_gather(t) -> (world, *t.shape)   every rank's `t`, stacked by rank
    broadcast(t)                     overwrite `t` with group rank 0's `t`

A transport subclasses `Collective` and implements `_all_reduce`, `_all_gather`
and `_broadcast`; the public methods count bytes on the way through:

    payload    bytes this rank hands to collectives (the tensors' sizes)
    sent       bytes this rank puts on its links, received = what it takes off,
               modelled on the bandwidth-optimal ring algorithms NCCL and gloo use
               (per rank, W ranks, an n-byte tensor):
                 all-reduce  2 (W - 1) / W * n   (reduce-scatter, then all-gather)
                 all-gather  (W - 1) * n          (every other rank's n bytes)
                 broadcast   (W - 1) / W * n      (n to each of W - 1 ranks, spread over W)
               In each, a rank sends as much as it receives.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor


class Handle(Protocol):
    def wait(self) -> object: ...


class Collective:
    """All-reduce, all-gather and broadcast over one group of ranks, counting bytes."""

    rank: int
    world: int

    def __init__(self, rank: int, world: int):
        self.rank = rank
        self.world = world
        self.payload = 0
        self.sent = 0.0
        self.received = 0.0

    def all_reduce(self, t: Tensor, async_op: bool = False) -> Handle | None:
        """Sum `t` over ranks in place (returns a handle to wait on when `async_op`)."""
        n = _nbytes(t)
        self._count(n, 2 * (self.world - 1) / self.world * n)
        return self._all_reduce(t, async_op)

    def all_gather(self, t: Tensor) -> Tensor:
        """Every rank's `t`, stacked: shape (world, *t.shape)."""
        n = _nbytes(t)
        self._count(n, (self.world - 1) * n)
        return self._all_gather(t)

    def broadcast(self, t: Tensor) -> None:
        """Overwrite `t` with group rank 0's `t`."""
        n = _nbytes(t)
        self._count(n if self.rank == 0 else 0, (self.world - 1) / self.world * n)
        self._broadcast(t)

    def _count(self, payload: int, link: float) -> None:
        self.payload += payload
        self.sent += link
        self.received += link

    def _all_reduce(self, t: Tensor, async_op: bool) -> Handle | None:
        raise NotImplementedError

    def _all_gather(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _broadcast(self, t: Tensor) -> None:
        raise NotImplementedError


class TorchCollective(Collective):
    """torch.distributed on `group` (None: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        super().__init__(dist.get_rank(group), dist.get_world_size(group))
        self.group = group

    def _all_reduce(self, t: Tensor, async_op: bool) -> Handle | None:
        return dist.all_reduce(t, group=self.group, async_op=async_op)

    def _all_gather(self, t: Tensor) -> Tensor:
        out = t.new_empty((self.world * t.numel(),))
        _ALL_GATHER(out, t.contiguous().view(-1), group=self.group)
        return out.view(self.world, *t.shape)

    def _broadcast(self, t: Tensor) -> None:
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(t, src=src, group=self.group)


# one flat all-gather call: torch 2.13 renamed all_gather_into_tensor to all_gather_single
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def plain_mean(collective: Collective, grads: list[Tensor], buffer: Tensor | None = None) -> None:
    """Average `grads` over ranks in place with plain all-reduces, dividing first (as DDP
    does, so a sum cannot overflow because of the world size). `buffer`, when given, is
    one tensor the grads are views of (a DDP bucket) and travels in one piece."""
    if buffer is not None:
        buffer.div_(collective.world)
        collective.all_reduce(buffer)
        return
    for dtype in dict.fromkeys(g.dtype for g in grads):
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same]).div_(collective.world)
        collective.all_reduce(flat)
        for g, part in zip(same, flat.split([g.numel() for g in same]), strict=True):
            g.copy_(part.view_as(g))

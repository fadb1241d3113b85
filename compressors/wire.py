"""Collectives that count the bytes they send, and byte payloads for all_gather.

`Comm.sent` is the number of bytes this rank handed to collectives: the whole
tensor for an all-reduce, its own payload for an all-gather, the tensor on the
source of a broadcast. That is the figure every compressor reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

ALIGN = 4  # every payload segment starts at a multiple of 4 bytes, so it can be viewed as fp32


def aligned(nbytes: int) -> int:
    """`nbytes` rounded up to the segment alignment."""
    return -(-nbytes // ALIGN) * ALIGN


class Comm:
    """One process group's collectives, counting the bytes this rank sends."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.sent = 0

    def all_reduce(self, t: Tensor, async_op: bool = False):
        """Sum `t` over ranks in place (returns the work handle when `async_op`)."""
        self.sent += t.numel() * t.element_size()
        return dist.all_reduce(t, group=self.group, async_op=async_op)

    def all_gather(self, t: Tensor) -> Tensor:
        """Every rank's `t`, stacked: shape (world, *t.shape)."""
        self.sent += t.numel() * t.element_size()
        out = t.new_empty((self.world, *t.shape))
        dist.all_gather(list(out.unbind(0)), t, group=self.group)
        return out

    def broadcast(self, t: Tensor) -> None:
        """Overwrite `t` with group rank 0's `t`."""
        if self.rank == 0:
            self.sent += t.numel() * t.element_size()
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(t, src=src, group=self.group)


@dataclass(frozen=True)
class Segment:
    offset: int
    dtype: torch.dtype
    shape: torch.Size


def pack(parts: list[Tensor]) -> tuple[Tensor, list[Segment]]:
    """Concatenate tensors as raw bytes (uint8), each segment aligned to 4 bytes."""
    layout, offset = [], 0
    for p in parts:
        layout.append(Segment(offset, p.dtype, p.shape))
        offset += aligned(p.numel() * p.element_size())
    device = parts[0].device if parts else "cpu"
    payload = torch.zeros(offset, dtype=torch.uint8, device=device)
    for seg, p in zip(layout, parts, strict=True):
        raw = p.contiguous().reshape(-1).view(torch.uint8)
        payload[seg.offset : seg.offset + raw.numel()].copy_(raw)
    return payload, layout


def unpack(payload: Tensor, layout: list[Segment]) -> list[Tensor]:
    """The tensors `pack` put into `payload` (views, no copy)."""
    out = []
    for seg in layout:
        nbytes = seg.shape.numel() * seg.dtype.itemsize
        raw = payload[seg.offset : seg.offset + nbytes]
        out.append(raw.view(seg.dtype).view(seg.shape))
    return out

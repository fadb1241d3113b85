"""Byte payloads for all-gather: tensors of any dtype packed into one aligned uint8 buffer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ALIGN = 4  # every payload segment starts at a multiple of 4 bytes, so it can be viewed as fp32


def aligned(nbytes: int) -> int:
    """`nbytes` rounded up to the segment alignment."""
    return -(-nbytes // ALIGN) * ALIGN


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

"""fp16 / bf16: cast the gradient to 16 bits before a plain all-reduce (2 bytes per entry).

As in torch's fp16 hook each rank divides by the world size first, casts and sums
in the 16-bit dtype, so a sum overflows only where the mean itself would. Error
feedback keeps the rounding error, e' = M - W float(half(M / W)). A layer whose
16-bit sum is not finite counts as non-finite on every rank (`base.outcome`).
Gradients that are already 16 bits wide gain nothing from a cast: they go by a
plain all-reduce in their own dtype (`passes`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Compressor, Level, Slot, outcome
from .collective import Collective

CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Cast(Compressor):
    """A 16-bit cast (`dtype` fp16 or bf16); its one level is 16 bits."""

    default = 16

    def __init__(self, dtype: str = "fp16"):
        if dtype not in CAST_DTYPES:
            raise ValueError(f"dtype={dtype!r} must be one of {', '.join(CAST_DTYPES)}")
        self.name = dtype
        self.dtype = CAST_DTYPES[dtype]

    def passes(self, dtype: torch.dtype) -> bool:
        return dtype.itemsize <= 2

    def wire_bytes(self, shape: torch.Size, level: Level) -> int:
        return 2 * shape.numel()

    def exchange(self, slots: list[Slot], comm: Collective, flags: Tensor) -> Tensor:
        sizes = [s.m.numel() for s in slots]
        buf = torch.empty(sum(sizes) + len(slots), dtype=self.dtype, device=slots[0].m.device)
        *parts, flag = buf.split([*sizes, len(slots)])
        for s, part in zip(slots, parts, strict=True):
            torch.div(s.m.view(-1), comm.world, out=part)
            s.m.view(-1).sub_(part, alpha=comm.world)
        flag.copy_(flags)
        comm.all_reduce(buf)
        sums = torch.stack(torch._foreach_norm(parts, 2, dtype=torch.float32))
        total = torch.where(sums.isfinite(), flag.float(), torch.inf)
        factor, _ = outcome(total, 1)  # the parts already hold the mean
        for s, part, f in zip(slots, parts, factor, strict=True):
            torch.mul(part.view_as(s.grad), f, out=s.grad)
        return total

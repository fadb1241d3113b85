"""fp16 / bf16: cast the gradient to 16 bits before a plain all-reduce (2 bytes per entry).

Error feedback keeps the rounding error, e' = M - float(half(M)). As in torch's
fp16 hook the sum over ranks is taken in the 16-bit dtype; a cast or a sum that
overflows counts as non-finite and the bucket falls back to a plain all-reduce.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Compressor, Level, Slot
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

    def wire_bytes(self, shape: torch.Size, level: Level) -> int:
        return 2 * shape.numel()

    def exchange(self, slots: list[Slot], comm: Collective, bad: Tensor) -> bool:
        sizes = [s.m.numel() for s in slots]
        buf = torch.empty(sum(sizes) + 1, dtype=self.dtype, device=slots[0].m.device)
        *parts, flag = buf.split([*sizes, 1])
        for s, part in zip(slots, parts, strict=True):
            part.copy_(s.m.view(-1))
        flag.copy_(bad | ~torch.isfinite(buf[:-1]).all())
        work = comm.all_reduce(buf, async_op=True)
        for s in slots:
            s.m.sub_(s.m.to(self.dtype).float())
        work.wait()
        if flag.item() > 0 or not torch.isfinite(buf).all():
            return False
        for s, total in zip(slots, parts, strict=True):
            s.grad.copy_(total.view_as(s.grad).float() / comm.world)
        return True

"""TopK: send the k = density * n largest-magnitude entries of each gradient.

Aji & Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP
2017; error feedback as in Stich, Cordonnier & Jaggi, "Sparsified SGD with
Memory", NeurIPS 2018. A rank sends k fp32 values and k int32 indices per tensor
(8k bytes). A sum of sparse sets with different supports is not an all-reduce,
so ranks all-gather their pairs and scatter-add them:

    output = (1/W) sum_w scatter_add(idx_w, val_w);   e' = M with the sent entries zeroed
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Compressor, Level, Slot
from .collective import Collective
from .wire import pack, unpack


def keep(numel: int, density: float) -> int:
    """k = round(density * n), at least 1 and at most n."""
    return max(1, min(numel, round(density * numel)))


class TopK(Compressor):
    """Top-k sparsification; the level is the density k / n."""

    name = "topk"

    def __init__(self, density: float = 0.01):
        self.default = self.check(density)

    def check(self, level: Level) -> float:
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level <= 1:
            raise ValueError(f"density={level!r} must be in (0, 1]")
        return float(level)

    def candidates(self) -> list[Level]:
        return sorted({min(1.0, self.default * f) for f in (0.25, 0.5, 1, 2, 4)})

    def wire_bytes(self, shape: torch.Size, level: Level) -> int:
        return 8 * keep(shape.numel(), level)

    def errors(self, a: Tensor, levels: list[Level]) -> Tensor:
        """The energy outside the k largest entries, exactly."""
        sq = a.reshape(-1).double().square().sort(descending=True).values
        tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])  # tail[k] = sum_{i>=k}
        return torch.stack([tail[keep(sq.numel(), level)] for level in levels])

    def exchange(self, slots: list[Slot], comm: Collective, bad: Tensor) -> bool:
        parts = []
        for s in slots:
            flat = s.m.view(-1)
            idx = flat.abs().topk(keep(flat.numel(), s.level), sorted=False).indices
            parts += [flat[idx], idx.int()]
            flat[idx] = 0  # the residual is what was not sent
        payload, layout = pack([*parts, bad.view(1).float()])
        received = [unpack(row, layout) for row in comm.all_gather(payload)]
        if torch.cat([r[-1] for r in received]).sum().item() > 0:
            return False
        for i, s in enumerate(slots):
            total = torch.zeros(s.m.numel(), device=s.m.device)
            for r in received:
                total.index_add_(0, r[2 * i + 1].long(), r[2 * i])
            s.grad.copy_(total.view_as(s.grad) / comm.world)
        return True

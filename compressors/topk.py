"""TopK: send the k = density * n largest-magnitude entries of each gradient.

Aji & Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP
2017; error feedback as in Stich, Cordonnier & Jaggi, "Sparsified SGD with
Memory", NeurIPS 2018. A rank sends k fp32 values and k int32 indices per tensor
(8k bytes). A sum of sparse sets with different supports is not an all-reduce,
so ranks all-gather their pairs and scatter-add them:

    output = (1/W) sum_w scatter_add(idx_w, val_w);   e' = M with the sent entries zeroed

Layers of one size and density whose M lie back to back are selected as one batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Compressor, Level, Slot, batches, outcome
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

    def errors(
        self, a: Tensor, levels: list[Level], name: str = "", residual: Tensor | None = None
    ) -> Tensor:
        """The energy outside the k largest entries, exactly (from one top-k at the
        largest k: err(k) = ||a||^2 - sum of the k largest squares). `residual` is not
        used: L-GreCo calibrates a biased codec's residual by measurement (`adaptive.py`)."""
        sq = a.reshape(-1).double().square()
        ks = [keep(sq.numel(), level) for level in levels]
        top = sq.topk(max(ks)).values.cumsum(0)
        total = sq.sum()
        return torch.stack([(total - top[k - 1]).clamp_min(0) for k in ks])

    def exchange(self, slots: list[Slot], comm: Collective, flags: Tensor) -> Tensor:
        index = {id(s): i for i, s in enumerate(slots)}
        runs = batches(slots, key=lambda s: (s.m.numel(), s.level))
        parts = []
        for run, view in runs:
            flat = view.view(len(run), -1)
            idx = flat.abs().topk(keep(flat.shape[1], run[0].level), dim=1, sorted=False).indices
            parts += [flat.gather(1, idx), idx.int()]
            flat.scatter_(1, idx, 0.0)  # the residual is what was not sent
        payload, layout = pack([*parts, flags])
        received = [unpack(row, layout) for row in comm.all_gather(payload)]
        total_flags = torch.stack([r[-1] for r in received]).sum(0)
        factor, _ = outcome(total_flags, comm.world)
        for g, (run, view) in enumerate(runs):
            total = torch.zeros(view.view(len(run), -1).shape, device=view.device)
            for r in received:
                total.scatter_add_(1, r[2 * g + 1].long(), r[2 * g])
            for j, s in enumerate(run):
                torch.mul(total[j].view_as(s.grad), factor[index[id(s)]], out=s.grad)
        return total_flags

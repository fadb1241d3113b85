"""PowerSGD: rank-r gradient compression by one warm-started power iteration.

Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression
for Distributed Optimization", NeurIPS 2019, Algorithm 1. A gradient with
ndim >= 2 is viewed as M (n x m) = (shape[0], rest), and with Q (m x r) warm-started
from the previous step (identical on every rank):

    P = all-reduce(M Q);  P^ = orthogonalize(P)
    Q_w = M^T P^;         e' = M - P^ Q_w^T          (this rank's residual)
    Q = all-reduce(Q_w) / W;  output = P^ Q^T = mean_w P^ Q_w^T

1-D tensors, and those where r(n + m) does not save `min_compression_rate` over
nm, ride along uncompressed (fp32) in the first all-reduce. A compressed tensor
costs 4 r (n + m) bytes (fp32 P and Q).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Compressor, Level, Slot, check_positive_int, stable_seed
from .collective import Collective

GRAM_SCHMIDT_MAX_RANK = 2  # beyond this, one QR call beats the column loop


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """(shape[0], prod(shape[1:])): how a gradient is viewed as a matrix."""
    return shape[0], shape.numel() // max(shape[0], 1)


def orthogonalize(p: Tensor) -> None:
    """Orthonormalise the columns of `p` in place (Gram-Schmidt for small ranks, else QR).

    An all-zero column stays zero instead of becoming NaN."""
    if p.shape[1] > GRAM_SCHMIDT_MAX_RANK:
        p.copy_(torch.linalg.qr(p).Q)
        return
    for i in range(p.shape[1]):
        col = p[:, i : i + 1]
        col.div_(col.norm().clamp_min(torch.finfo(p.dtype).tiny))
        rest = p[:, i + 1 :]
        rest.sub_(col @ (col.t() @ rest))


class PowerSGD(Compressor):
    """Rank-`rank` PowerSGD with warm start; the level is the rank."""

    name = "powersgd"

    def __init__(self, rank: int = 16, min_compression_rate: float = 2.0, seed: int = 0):
        self.default = self.check(rank)
        if isinstance(min_compression_rate, bool) or not min_compression_rate >= 0:
            raise ValueError(f"min_compression_rate={min_compression_rate!r} must be >= 0")
        self.min_compression_rate = float(min_compression_rate)
        self.seed = seed
        self.q: dict[str, Tensor] = {}  # warm-start Q per layer, identical on every rank

    def check(self, level: Level) -> int:
        return check_positive_int("rank", level)

    def candidates(self) -> list[Level]:
        return list(range(max(1, self.default // 2), 2 * self.default + 1))

    def compresses(self, shape: torch.Size, level: Level) -> bool:
        if len(shape) < 2:
            return False
        n, m = matrix_shape(shape)
        return min(level, n, m) * (n + m) * self.min_compression_rate <= n * m

    def wire_bytes(self, shape: torch.Size, level: Level) -> int:
        if not self.compresses(shape, level):
            return 4 * shape.numel()
        n, m = matrix_shape(shape)
        return 4 * min(level, n, m) * (n + m)

    def errors(self, a: Tensor, levels: list[Level]) -> Tensor:
        """Best rank-r error sum_{i>r} s_i^2 (Eckart-Young): what warm-started power
        iteration converges to; 0 where the tensor goes uncompressed."""
        out = torch.zeros(len(levels), dtype=torch.float64, device=a.device)
        if a.dim() < 2:
            return out
        s2 = torch.linalg.svdvals(a.reshape(a.shape[0], -1).double()).square()
        tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])  # tail[r] = sum_{i>=r}
        for i, level in enumerate(levels):
            if self.compresses(a.shape, level):
                out[i] = tail[min(level, s2.numel())]
        return out

    def exchange(self, slots: list[Slot], comm: Collective, bad: Tensor) -> bool:
        dense = [s for s in slots if not self.compresses(s.m.shape, s.level)]
        low = [s for s in slots if self.compresses(s.m.shape, s.level)]
        mats = [s.m.view(s.m.shape[0], -1) for s in low]
        ranks = [min(s.level, *mat.shape) for s, mat in zip(low, mats, strict=True)]
        device = slots[0].m.device

        # Round 1: [uncompressed tensors | P = M Q of each layer | bad flag].
        dense_sizes = [s.m.numel() for s in dense]
        p_sizes = [mat.shape[0] * r for mat, r in zip(mats, ranks, strict=True)]
        first = torch.empty(sum(dense_sizes) + sum(p_sizes) + 1, device=device)
        *dense_parts, p_region, flag = first.split(dense_sizes + [sum(p_sizes), 1])
        ps = [
            part.view(mat.shape[0], r)
            for part, mat, r in zip(p_region.split(p_sizes), mats, ranks, strict=True)
        ]
        for s, part in zip(dense, dense_parts, strict=True):
            part.copy_(s.m.view(-1))
        for s, mat, p in zip(low, mats, ps, strict=True):
            torch.matmul(mat, self._warm_q(s.name, mat.shape[1], p.shape[1], device), out=p)
        flag.copy_(bad)
        comm.all_reduce(first)
        if flag.item() > 0:
            return False

        for s, total in zip(dense, dense_parts, strict=True):
            s.grad.copy_(total.view_as(s.grad) / comm.world)
            s.m.zero_()
        if not low:
            return True

        # Round 2: Q_w = M^T P^ of each layer; the residuals are computed while it travels.
        q_sizes = [mat.shape[1] * r for mat, r in zip(mats, ranks, strict=True)]
        second = torch.empty(sum(q_sizes), device=device)
        qs = [part.view(-1, r) for part, r in zip(second.split(q_sizes), ranks, strict=True)]
        for mat, p, q in zip(mats, ps, qs, strict=True):
            orthogonalize(p)
            torch.matmul(mat.t(), p, out=q)
        local = second.clone()
        work = comm.all_reduce(second, async_op=True)
        for mat, p, q_w in zip(mats, ps, local.split(q_sizes), strict=True):
            mat.addmm_(p, q_w.view(mat.shape[1], -1).t(), alpha=-1)
        work.wait()
        second.div_(comm.world)
        for s, p, q in zip(low, ps, qs, strict=True):
            self.q[s.name] = q
            _write(s.grad, p, q)
        return True

    def _warm_q(self, name: str, m: int, r: int, device: torch.device) -> Tensor:
        """The layer's Q from the last step; a rank change keeps the columns it can."""
        q = self.q.get(name)
        if q is None or q.shape[0] != m:
            q = self._fresh(name, m, 0, r)
        elif q.shape[1] > r:
            q = q[:, :r]
        elif q.shape[1] < r:
            q = torch.cat([q, self._fresh(name, m, q.shape[1], r).to(q.device)], 1)
        return q.to(device)

    def _fresh(self, name: str, m: int, start: int, stop: int) -> Tensor:
        """Columns start..stop of a seeded Gaussian Q, the same on every rank."""
        gen = torch.Generator().manual_seed(stable_seed(self.seed, name, stop))
        return torch.randn(m, stop, generator=gen)[:, start:]

    def state_dict(self) -> dict:
        return {"q": dict(self.q)}

    def load_state_dict(self, state: dict) -> None:
        self.q = dict(state["q"])


def _write(grad: Tensor, p: Tensor, q: Tensor) -> None:
    """grad <- P Q^T, straight into the bucket when it is fp32."""
    view = grad.view(p.shape[0], q.shape[0])
    if grad.dtype == torch.float32:
        torch.matmul(p, q.t(), out=view)
    else:
        view.copy_(p @ q.t())

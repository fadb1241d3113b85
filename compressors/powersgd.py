"""PowerSGD: rank-r gradient compression by one warm-started power iteration.

Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression
for Distributed Optimization", NeurIPS 2019, Algorithm 1. A gradient with
ndim >= 2 is viewed as M (n x m) = (shape[0], rest), and with Q (m x r) warm-started
from the previous step (identical on every rank):

    P = all-reduce(M Q);  P^ = orthogonalize(P)
    Q_w = M^T P^;         e' = M - P^ Q_w^T          (this rank's residual)
    Q = all-reduce(Q_w) / W;  output = P^ Q^T = mean_w P^ Q_w^T

Layers of one shape and rank whose M lie back to back run as one batch (bmm,
batched QR). P and Q are computed and sent transposed, P^T = Q^T M^T and
Q_w^T = P^T M: the same products with r rows instead of r columns, which MKL runs
1.1-1.3x faster on the CPU at ranks that are multiples of 16 and 2-6x faster at the
others (`benchmarks/powersgd_layout.py`); cuBLAS takes either.
1-D tensors, and those where r(n + m) does not save `min_compression_rate` over
nm, ride along uncompressed (fp32) in the first all-reduce. A compressed tensor
costs 4 r (n + m) bytes (fp32 P and Q).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (
    Compressor,
    Level,
    Slot,
    batches,
    check_positive_int,
    outcome,
    square_norm,
    stable_seed,
)
from .collective import Collective

GRAM_SCHMIDT_MAX_RANK = 2  # beyond this, one QR call beats the column loop
REFINE_ITERATIONS = 2  # subspace iterations standing in for the steps that warm Q up


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """(shape[0], prod(shape[1:])): how a gradient is viewed as a matrix."""
    return shape[0], shape.numel() // max(shape[0], 1)


def orthogonalize(p: Tensor) -> None:
    """Orthonormalise the columns of `p` (..., n, r) in place, each matrix of a batch on its
    own (Gram-Schmidt for small ranks, else QR). An all-zero column stays zero, not NaN."""
    if p.shape[-1] > GRAM_SCHMIDT_MAX_RANK:
        p.copy_(torch.linalg.qr(p).Q)
        return
    for i in range(p.shape[-1]):
        col = p[..., i : i + 1]
        norm = torch.linalg.vector_norm(col, dim=-2, keepdim=True)
        col.div_(norm.clamp_min(torch.finfo(p.dtype).tiny))
        rest = p[..., i + 1 :]
        rest.sub_(col @ (col.transpose(-2, -1) @ rest))


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

    def why_not(self, shape: torch.Size, level: Level) -> str:
        if len(shape) < 2:
            return "1-D"
        n, m = matrix_shape(shape)
        return (
            f"{n}x{m} at rank {min(level, n, m)} saves less than "
            f"min_compression_rate={self.min_compression_rate:g}"
        )

    def wire_bytes(self, shape: torch.Size, level: Level) -> int:
        if not self.compresses(shape, level):
            return 4 * shape.numel()
        n, m = matrix_shape(shape)
        return 4 * min(level, n, m) * (n + m)

    def errors(
        self, a: Tensor, levels: list[Level], name: str = "", residual: Tensor | None = None
    ) -> Tensor:
        """The error of one power iteration from this layer's warm-start Q, as the next
        step would run it, at every rank at once: with Q_R the first R = max(levels)
        columns (the warm ones, then fresh), P^ = orthogonalize(A Q_R) and B = P^T A,
        the rank-r output keeps sum_{i<r} ||B_i||^2 (P^'s first r columns span A Q_r),
        so err(r) = ||A||^2 - sum_{i<r} ||B_i||^2. Columns beyond the current rank are
        fresh (and a layer not yet compressed has no warm start at all), so
        REFINE_ITERATIONS subspace iterations first stand in for the steps that warm
        them up: every candidate is judged as it would run once warm, not the larger
        ranks on random columns. 0 where the tensor goes uncompressed. `residual` is not
        used: L-GreCo calibrates a biased codec's residual by measurement (`adaptive.py`)."""
        out = torch.zeros(len(levels), dtype=torch.float64, device=a.device)
        n, m = matrix_shape(a.shape)
        ranks = {lv: min(lv, n, m) for lv in levels if self.compresses(a.shape, lv)}
        if not ranks:
            return out
        mat = a.reshape(n, m).float()
        q = self._warm_q(name, m, max(ranks.values()), a.device)
        qt = q.t()
        for _ in range(REFINE_ITERATIONS):
            pt = qt @ mat.t()
            orthogonalize(pt.t())
            qt = pt @ mat
        pt = qt @ mat.t()
        orthogonalize(pt.t())
        kept = square_norm(pt @ mat, dim=1).cumsum(0)
        total = square_norm(mat)
        for i, level in enumerate(levels):
            if level in ranks:
                out[i] = (total - kept[ranks[level] - 1]).clamp_min(0)
        return out

    def exchange(self, slots: list[Slot], comm: Collective, flags: Tensor) -> Tensor:
        index = {id(s): i for i, s in enumerate(slots)}
        dense = [s for s in slots if not self.compresses(s.m.shape, s.level)]
        low = [s for s in slots if self.compresses(s.m.shape, s.level)]
        groups = [
            _Group(run, view, min(run[0].level, *matrix_shape(run[0].m.shape)))
            for run, view in batches(low, key=lambda s: (s.m.shape, s.level))
        ]
        device = slots[0].m.device

        # Round 1: [uncompressed tensors | P = M Q of each layer | flags].
        dense_sizes = [s.m.numel() for s in dense]
        p_sizes = [g.p_numel for g in groups]
        first = torch.empty(sum(dense_sizes) + sum(p_sizes) + len(slots), device=device)
        parts = first.split([*dense_sizes, *p_sizes, len(slots)])
        dense_parts, p_parts, flag_part = parts[: len(dense)], parts[len(dense) : -1], parts[-1]
        for s, part in zip(dense, dense_parts, strict=True):
            part.copy_(s.m.view(-1))
        for g, part in zip(groups, p_parts, strict=True):
            g.pt = part.view(len(g.run), g.r, g.n)
            g.warm = torch.stack([self._warm_q(s.name, g.m, g.r, device).t() for s in g.run])
            torch.bmm(g.warm, g.mats.transpose(1, 2), out=g.pt)  # P^T = Q^T M^T
        flag_part.copy_(flags)
        comm.all_reduce(first)
        factor, keep = outcome(flag_part, comm.world)
        for s, total in zip(dense, dense_parts, strict=True):
            torch.mul(total.view_as(s.grad), factor[index[id(s)]], out=s.grad)
            s.m.zero_()
        if not groups:
            return flag_part

        # Round 2: Q_w = M^T P^ of each layer; the residuals are computed while it travels.
        second = torch.empty(sum(g.q_numel for g in groups), device=device)
        for g, part in zip(groups, second.split([g.q_numel for g in groups]), strict=True):
            orthogonalize(g.pt.transpose(1, 2))
            g.qt = part.view(len(g.run), g.r, g.m)
            torch.bmm(g.pt, g.mats, out=g.qt)  # Q_w^T = P^T M
        local = second.clone()
        work = comm.all_reduce(second, async_op=True)
        for g, q_w in zip(groups, local.split([g.q_numel for g in groups]), strict=True):
            g.mats.baddbmm_(g.pt.transpose(1, 2), q_w.view_as(g.qt), alpha=-1)
        work.wait()
        for g in groups:
            for j, s in enumerate(g.run):
                i = index[id(s)]
                self.q[s.name] = torch.where(keep[i], g.warm[j], g.qt[j] / comm.world).t()
                _write(s.grad, g.pt[j], g.qt[j] * factor[i])
        return flag_part

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
        """Columns start..stop of a seeded Gaussian Q, the same on every rank and whatever
        the rank (each column has a seed of its own)."""
        gens = [
            torch.Generator().manual_seed(stable_seed(self.seed, name, j))
            for j in range(start, stop)
        ]
        return torch.stack([torch.randn(m, generator=g) for g in gens], 1)

    def state_dict(self) -> dict:
        return {"q": dict(self.q)}

    def load_state_dict(self, state: dict) -> None:
        self.q = dict(state["q"])


class _Group:
    """Same-shape, same-rank layers whose M lie back to back: one bmm for all of them."""

    def __init__(self, run: list[Slot], view: Tensor, r: int):
        self.run = run
        self.n, self.m = matrix_shape(run[0].m.shape)
        self.r = r
        self.mats = view.view(len(run), self.n, self.m)
        self.p_numel = len(run) * self.n * r
        self.q_numel = len(run) * self.m * r
        self.pt = self.qt = self.warm = view  # P^T, Q^T and the warm Q^T, set in the exchange


def _write(grad: Tensor, pt: Tensor, qt: Tensor) -> None:
    """grad <- P Q^T from P^T and Q^T, straight into the bucket when it is fp32."""
    view = grad.view(pt.shape[1], qt.shape[1])
    if grad.dtype == torch.float32:
        torch.matmul(pt.t(), qt, out=view)
    else:
        view.copy_(pt.t() @ qt)

"""SH coefficients <-> values on the Gauss-Legendre x uniform grid as two dense matrices.

The same grid and exact quadrature as `sh_grid.py`, with the separable transforms
multiplied out: Y[p, lm] = Y_lm(a_j, b_k) at point p = (j, k), and

    values = x Y^T                       (R, (L+1)^2) -> (R, n_a n_b)
    x_lm   = sum_p q_p h_p Y[p, lm],     q_p = w_k / (2 n_a)      (n_a n_b) -> (L+1)^2

one GEMM each. For small lmax these beat the per-order transforms: the matrices
are small, and one large GEMM has no per-order launches or layout gathers. On the
CPU, float32 products go through oneDNN's matmul (`torch.ops.mkldnn`), which
runs AVX-512 kernels where MKL's sgemm (torch's default) may not (on the AMD EPYC
of `benchmarks/results/gaunt_cpu.md`, 2-2.5x faster); elsewhere `torch.matmul`.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from .sh_grid import Sampler, grid_nodes, grid_size
from .spherical import azimuthal, polar, sh_dim


@cache
def dense_tables(lmax: int, total: int) -> tuple[Tensor, Tensor]:
    """(Y (n_a n_b, (L+1)^2), Y q ((L+1)^2 rows, n_a n_b)), float64: sampling and quadrature."""
    alpha, beta, weight = grid_nodes(total)
    order = torch.cat([torch.arange(-ell, ell + 1) for ell in range(lmax + 1)]) + lmax
    values = polar(lmax, beta)[None] * azimuthal(lmax, alpha)[:, None, order]
    values = values.reshape(-1, sh_dim(lmax))
    quadrature = (weight / (2 * len(alpha))).repeat(len(alpha))
    return values, (values * quadrature[:, None]).T.contiguous()


def _onednn_works() -> bool:
    try:
        x = torch.ones(2, 3)
        return bool(torch.ops.mkldnn._linear_pointwise(x, x, None, "none", [None], "").sum() == 12)
    except (AttributeError, RuntimeError):
        return False


ONEDNN = torch.backends.mkldnn.is_available() and _onednn_works()


def matmul_t(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weight.T, by oneDNN for float32 on the CPU (no autograd: see `Linear`)."""
    if ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [None], "")
    return x @ weight.T


class Linear(torch.autograd.Function):
    """y = x @ weight.T for a constant table; the gradient x-bar = y-bar @ weight is the
    same product with the transposed table, so every order of derivative is a GEMM."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, weight_t: Tensor) -> Tensor:
        ctx.save_for_backward(weight, weight_t)
        return matmul_t(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, weight_t = ctx.saved_tensors
        return Linear.apply(grad, weight_t, weight), None, None


class DenseSampler(Sampler):
    """Exact SH <-> grid transforms as dense GEMMs, for products of total degree <= `total`.

    Values are returned as (points, R) views of row-major (R, points) tensors, the
    layout the other samplers use (R last), so the product code is shared."""

    def __init__(self, total: int):
        super().__init__()
        self.total = total
        self.n_alpha, self.n_beta = grid_size(total)

    def synthesis(self, x: Tensor, lmax: int) -> Tensor:
        """(R, (lmax+1)^2) -> values (n_alpha n_beta, R)."""
        table, table_t = self._tables(
            ("synthesis", lmax), x, lambda: dense_tables(lmax, self.total)[0]
        )
        return Linear.apply(x, table, table_t).T

    def analysis(self, values: Tensor, lmax: int) -> Tensor:
        """values (n_alpha n_beta, R) -> ((lmax+1)^2, R)."""
        table, table_t = self._tables(
            ("analysis", lmax), values, lambda: dense_tables(lmax, self.total)[1]
        )
        return Linear.apply(values.T, table, table_t).T

    def _tables(self, key: tuple, like: Tensor, build) -> tuple[Tensor, Tensor]:
        """A table and its transpose, both contiguous, on `like`'s device and dtype."""
        return self.cached(key, like, lambda: (build(), build().T.contiguous()))

"""SH coefficients <-> values on the Gauss-Legendre x uniform grid as two dense matrices.

The same grid and exact quadrature as `sh_grid.py`, with the separable transforms
multiplied out: Y[p, lm] = Y_lm(a_j, b_k) at point p = (j, k), and

    values = x Y^T                       (R, (L+1)^2) -> (R, n_a n_b)
    x_lm   = sum_p q_p h_p Y[p, lm],     q_p = w_k / (2 n_a)      (n_a n_b) -> (L+1)^2

one GEMM each (`table_matmul`). For small lmax these beat the per-order
transforms: the matrices are small, and one large GEMM has no per-order launches
or layout gathers.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from .sh_grid import Sampler, grid_nodes, grid_size, table_matmul
from .spherical import azimuthal, polar, sh_dim


@cache
def dense_tables(lmax: int, total: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Y (n_a n_b, (L+1)^2), Y^T, Q = (Y q)^T ((L+1)^2, n_a n_b), Q^T), float64: sampling
    and quadrature, each with its transpose (the gradient's table)."""
    alpha, beta, weight = grid_nodes(total)
    order = torch.cat([torch.arange(-ell, ell + 1) for ell in range(lmax + 1)]) + lmax
    values = polar(lmax, beta)[None] * azimuthal(lmax, alpha)[:, None, order]
    values = values.reshape(-1, sh_dim(lmax))
    project = values * (weight / (2 * len(alpha))).repeat(len(alpha))[:, None]
    return values, values.T.contiguous(), project.T.contiguous(), project


class DenseSampler(Sampler):
    """Exact SH <-> grid transforms as dense GEMMs, for products of total degree <= `total`."""

    def __init__(self, total: int):
        super().__init__()
        self.total = total
        self.n_alpha, self.n_beta = grid_size(total)

    def synthesis(self, x: Tensor, lmax: int) -> Tensor:
        """(R, (lmax+1)^2) -> values (n_alpha n_beta, R)."""
        return table_matmul(*self._tables(x, lmax)[:2], x.T)

    def analysis(self, values: Tensor, lmax: int) -> Tensor:
        """values (n_alpha n_beta, R) -> ((lmax+1)^2, R)."""
        return table_matmul(*self._tables(values, lmax)[2:], values)

    def _tables(self, like: Tensor, lmax: int) -> tuple[Tensor, ...]:
        return self.cached(("dense", lmax), like, lambda: dense_tables(lmax, self.total))

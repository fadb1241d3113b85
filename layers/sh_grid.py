"""SH coefficients <-> values on a Gauss-Legendre x uniform grid, one order m at a time.

A function f = sum_lm x_lm Y_lm of degree L is sampled at the n_b Gauss-Legendre
nodes cos(b_k) = z_k and n_a uniform azimuths a_j = 2 pi j / n_a:

    Z[m, k]  = sum_l x_lm sqrt(4 pi) P_lm(b_k)        (per order m: (L+1) -> n_b)
    f[j, k]  = sum_m S_m(a_j) Z[m, k]                   ((2L+1) -> n_a)

and projected back (component normalisation, `spherical.py`) by quadrature:

    x_lm = (1/4pi) int f Y_lm = sum_k (w_k / 2) sqrt(4 pi) P_lm(b_k) sum_j S_m(a_j) f[j, k] / n_a

The quadrature is exact when f Y_lm has degree D <= 2 n_b - 1 in cos b and its
azimuthal frequencies alias nowhere below L_out + 1: n_b = floor(D / 2) + 1,
n_a = D + 1 with D = (degree of the sampled product) + L_out. Both steps are
small dense products with the batch (R = all leading dims x channels) as the
last, contiguous dimension, so every step is one GEMM over R. On the CPU,
float32 GEMMs by a table go through oneDNN's matmul (`torch.ops.mkldnn`), which
uses AVX-512 where MKL's sgemm (torch's default) may not: 1.6-2.5x faster on the
AMD EPYC of `benchmarks/results/gaunt_cpu.md`.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch
from torch import Tensor

from .spherical import azimuthal, flat_index, order_major_index, polar_order_major, sh_dim


def grid_size(total: int) -> tuple[int, int]:
    """(n_alpha, n_beta) that integrate products of total degree `total` exactly."""
    return total + 1, total // 2 + 1


@cache
def grid_nodes(total: int) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha (n_a,), beta (n_b,), Gauss-Legendre weights (n_b,)), float64."""
    n_alpha, n_beta = grid_size(total)
    z, w = np.polynomial.legendre.leggauss(n_beta)
    alpha = torch.arange(n_alpha, dtype=torch.float64) * (2 * math.pi / n_alpha)
    return alpha, torch.acos(torch.from_numpy(z)), torch.from_numpy(w)


@cache
def synthesis_tables(lmax: int, total: int) -> tuple[Tensor, Tensor, Tensor]:
    """(polar (2L+1, n_b, L+1), azimuthal (n_a, 2L+1) and its transpose) for sampling
    degree-`lmax` inputs."""
    alpha, beta, _ = grid_nodes(total)
    azim = azimuthal(lmax, alpha)
    return polar_order_major(lmax, beta), azim, azim.T.contiguous()


@cache
def analysis_tables(lmax: int, total: int) -> tuple[Tensor, Tensor, Tensor]:
    """(azimuthal (2L+1, n_a) / n_a and its transpose, polar (2L+1, L+1, n_b) x w_k / 2)
    for the projection."""
    alpha, beta, weight = grid_nodes(total)
    polar = polar_order_major(lmax, beta) * (weight / 2)[None, :, None]
    azim = azimuthal(lmax, alpha) / len(alpha)
    return azim.T.contiguous(), azim, polar.transpose(1, 2).contiguous()


def _onednn_works() -> bool:
    try:
        x = torch.ones(2, 3)
        return bool(torch.ops.mkldnn._linear_pointwise(x, x, None, "none", [None], "").sum() == 12)
    except (AttributeError, RuntimeError):
        return False


ONEDNN = torch.backends.mkldnn.is_available() and _onednn_works()


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b. Float32 on the CPU goes to oneDNN's matmul, `_linear_pointwise(x, w)` = x @ w.T,
    with the row-major one of b.T and b as x (no autograd: see `TableProduct`)."""
    if not (ONEDNN and a.device.type == "cpu" and a.dtype == torch.float32):
        return a @ b
    if b.T.is_contiguous():
        return torch.ops.mkldnn._linear_pointwise(b.T, a, None, "none", [None], "").T
    return torch.ops.mkldnn._linear_pointwise(a, b.T, None, "none", [None], "")


class TableProduct(torch.autograd.Function):
    """table @ x for a constant table (given with its transpose). The gradient
    x-bar = table.T @ y-bar is the same product with the transposed table, so every
    order of derivative is one GEMM."""

    @staticmethod
    def forward(ctx, table: Tensor, table_t: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(table, table_t)
        return matmul(table, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        table, table_t = ctx.saved_tensors
        return None, None, TableProduct.apply(table_t, table, grad)


def table_matmul(table: Tensor, table_t: Tensor, x: Tensor) -> Tensor:
    """table @ x, through `TableProduct` only when autograd records (no Function call
    overhead inside the products' own forward and backward)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return TableProduct.apply(table, table_t, x)
    return matmul(table, x)


class Sampler:
    """Base of the samplers: tables built once per size in float64 (lru-cached), cast and
    moved once per (device, dtype) and kept, so a forward pass never copies host data."""

    n_alpha: int
    n_beta: int
    rows_first = False  # sampled values are (points, R); True: (R, points)

    def __init__(self):
        self._cache: dict = {}

    def cached(self, key: tuple, like: Tensor, build) -> tuple[Tensor, ...]:
        """`build()`'s tensors on `like`'s device; floating ones in its (complex) dtype."""
        k = (*key, like.device, like.dtype)
        if k not in self._cache:
            complex_dtype = torch.complex128 if like.dtype == torch.float64 else torch.complex64
            self._cache[k] = tuple(
                t.to(like.device, complex_dtype if t.is_complex() else like.dtype)
                if t.is_floating_point() or t.is_complex()
                else t.to(like.device)
                for t in build()
            )
        return self._cache[k]

    def to_order_major(self, x: Tensor, lmax: int) -> Tensor:
        """(R, (L+1)^2) -> (2L+1, L+1, R), a strided view: each order's coefficients as
        rows. Slots with l > L hold x[:, 0]; every table multiplies them by zero."""
        return self.rows_by_order(x, lmax).permute(0, 2, 1)

    def from_order_major(self, y: Tensor, lmax: int) -> Tensor:
        """(2L+1, L+1, R) -> ((L+1)^2, R), the inverse of `to_order_major`."""
        index, inverse = self.cached(("index", lmax), y, lambda: layout_indices(lmax))
        rows = y.reshape((2 * lmax + 1) * (lmax + 1), y.shape[-1])
        return Gather.apply(rows, 0, inverse, index)

    def rows_by_order(self, x: Tensor, lmax: int) -> Tensor:
        """(R, (L+1)^2) -> (2L+1, R, L+1), a strided view: each order's coefficients with
        the rows before the degrees (`to_order_major` puts the rows last)."""
        index, inverse = self.cached(("index", lmax), x, lambda: layout_indices(lmax))
        rows = Gather.apply(x, 1, index, inverse)
        return rows.view(x.shape[0], 2 * lmax + 1, lmax + 1).transpose(0, 1)

    def rows_from_order(self, y: Tensor, lmax: int) -> Tensor:
        """(2L+1, R, L+1) -> (R, (L+1)^2), the inverse of `rows_by_order`."""
        index, inverse = self.cached(("index", lmax), y, lambda: layout_indices(lmax))
        rows = y.transpose(0, 1).reshape(y.shape[1], -1)
        return Gather.apply(rows, 1, inverse, index)


def layout_indices(lmax: int) -> tuple[Tensor, Tensor]:
    """(flat -> order-major gather index, with padding slots at coefficient 0; its inverse)."""
    index = order_major_index(lmax).flatten()
    return torch.where(index == sh_dim(lmax), 0, index), flat_index(lmax)


class Gather(torch.autograd.Function):
    """y = x.index_select(dim, index), whose backward is again a gather (by `inverse`)
    instead of a scatter-add, several times faster on the CPU.

    Valid here because the two layouts hold the same coefficients: each source entry
    appears at its `inverse` slot, and the other (padding) slots meet zero table
    entries, so their gradients are zero and need not be added. Being linear, the
    backward is this Function with the indices swapped, to any order."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.dim = dim
        ctx.save_for_backward(index, inverse)
        return x.index_select(dim, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, inverse = ctx.saved_tensors
        return Gather.apply(grad, ctx.dim, inverse, index), None, None, None


class GridSampler(Sampler):
    """Exact SH <-> grid transforms for products f1 f2 Y_lm of total degree <= `total`."""

    def __init__(self, total: int):
        super().__init__()
        self.total = total
        self.n_alpha, self.n_beta = grid_size(total)

    def synthesis(self, x: Tensor, lmax: int) -> Tensor:
        """(R, (lmax+1)^2) -> values (n_alpha, n_beta * R)."""
        build = lambda: synthesis_tables(lmax, self.total)  # noqa: E731
        polar, *azim = self.cached(("in", lmax), x, build)
        z = torch.bmm(polar, self.to_order_major(x, lmax))  # (2L+1, n_b, R)
        return table_matmul(*azim, z.view(2 * lmax + 1, -1))

    def analysis(self, values: Tensor, lmax: int) -> Tensor:
        """values (n_alpha, n_beta * R) -> ((lmax+1)^2, R)."""
        build = lambda: analysis_tables(lmax, self.total)  # noqa: E731
        *azim, polar = self.cached(("out", lmax), values, build)
        w = table_matmul(*azim, values).view(2 * lmax + 1, self.n_beta, -1)
        return self.from_order_major(torch.bmm(polar, w), lmax)

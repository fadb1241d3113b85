"""Real spherical harmonics in e3nn's convention, split into polar and azimuthal factors.

e3nn evaluates Y_lm at the point (sin b sin a, cos b, sin b cos a) (y is the polar
axis) as a product of a polar and an azimuthal factor:

    Y_lm(a, b) = sqrt(4 pi) P_lm(b) S_m(a),   S_m(a) = sqrt2 sin(|m| a), 1, sqrt2 cos(m a)

for m < 0, m = 0, m > 0 (`e3nn.o3.Legendre`, `e3nn.o3.spherical_harmonics_alpha`).
We use component normalisation (the mean of Y_lm^2 over the sphere is 1), as
`e3nn.o3.spherical_harmonics(..., normalization="component")` does, so that a
feature vector x of a function f = sum_lm x_lm Y_lm holds x_lm = mean(f Y_lm).

Features are laid out as e3nn lays them out: (..., (L+1)^2), index l^2 + l + m.
Transforms work one order m at a time on the order-major layout (2L+1, L+1),
which holds x_lm at [m + L, l - |m|] and zeros where l > L.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor


def sh_dim(lmax: int) -> int:
    """Number of real SH coefficients up to degree lmax: (lmax + 1)^2."""
    return (lmax + 1) ** 2


def degrees(lmax: int) -> Tensor:
    """The degree l of each coefficient in the flat layout, shape ((lmax+1)^2,)."""
    return torch.cat([torch.full((2 * ell + 1,), ell) for ell in range(lmax + 1)])


@cache
def order_major_index(lmax: int) -> Tensor:
    """Index (2L+1, L+1) into the flat layout padded by one zero: flat[l^2+l+m] at
    [m + L, l - |m|], the padding slot (L+1)^2 where l > L."""
    index = torch.full((2 * lmax + 1, lmax + 1), sh_dim(lmax), dtype=torch.long)
    for m in range(-lmax, lmax + 1):
        for ell in range(abs(m), lmax + 1):
            index[m + lmax, ell - abs(m)] = ell * ell + ell + m
    return index


@cache
def flat_index(lmax: int) -> Tensor:
    """Inverse of `order_major_index`: for each flat coefficient, its row in the
    flattened order-major layout."""
    index = order_major_index(lmax).flatten()
    inverse = torch.empty(sh_dim(lmax), dtype=torch.long)
    for row, flat in enumerate(index.tolist()):
        if flat < sh_dim(lmax):
            inverse[flat] = row
    return inverse


def polar(lmax: int, beta: Tensor) -> Tensor:
    """sqrt(4 pi) P_lm(beta), shape (len(beta), (lmax+1)^2), float64.

    P_lm is a polynomial in cos b and sin b, so this is also the trigonometric
    polynomial's value for beta outside [0, pi] (used by the Fourier tables)."""
    from e3nn import o3

    beta = beta.double()
    return o3.Legendre(list(range(lmax + 1)))(beta.cos(), beta.sin()) * math.sqrt(4 * math.pi)


def azimuthal(lmax: int, alpha: Tensor) -> Tensor:
    """S_m(alpha) for m = -lmax..lmax, shape (len(alpha), 2 lmax + 1), float64."""
    from e3nn import o3

    return o3.spherical_harmonics_alpha(lmax, alpha.double())


def polar_order_major(lmax: int, beta: Tensor) -> Tensor:
    """sqrt(4 pi) P_lm(beta) in the order-major layout: (2L+1, len(beta), L+1), zeros
    where l > L."""
    values = torch.cat([polar(lmax, beta), torch.zeros(len(beta), 1, dtype=torch.float64)], 1)
    index = order_major_index(lmax)
    return values[:, index].permute(1, 0, 2).contiguous()

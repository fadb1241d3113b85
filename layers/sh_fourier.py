"""Exact change of basis real SH <-> 2-D Fourier series on the torus, and the FFT product.

Luo, Chen, Krishnapriyan, "Enabling Efficient Equivariant Operations in the
Fourier Basis via Gaunt Tensor Products", ICLR 2024, section 3.2. Each
Y_lm(a, b) = sqrt(4 pi) P_lm(b) S_m(a) (`spherical.py`) is a trigonometric
polynomial of degree l in both angles, so with p_lm[u] and q_m[v] the Fourier
coefficients of sqrt(4 pi) P_lm and S_m,

    f = sum_lm x_lm Y_lm = sum_{|u|,|v| <= L} F[v, u] e^{i (v a + u b)},
    F[v, u] = sum_{m = +-|v|} q_m[v] sum_l x_lm p_lm[u]        (per order m)

(P_lm is even in b for even |m| and odd for odd |m|: p_lm[u] is real or purely
imaginary, stored as one real number). A product of such functions is the 2-D
convolution of their coefficients, computed as pointwise products of their
values on a torus grid (an inverse FFT), and projected back exactly:

    x_lm = (1/4 pi) int_0^2pi da int_0^pi sin b db  h Y_lm
         = (1/2) Re sum_v sum_{u >= 0} c_u H[v, u] q_m[-v] K_lm[u]

with c_0 = 1, c_u = 2 (the u < 0 half by symmetry) and K_lm[u] = int_0^pi
e^{iub} sqrt(4 pi) P_lm(b) sin b db = sum_u' p_lm[u'] J(u + u'), J(k) = (1 + (-1)^k) / (1 - k^2)
for k != +-1 and J(+-1) = +-i pi / 2. All tables come from exact DFTs of sampled
trigonometric polynomials and these closed forms (float64), not from a fit.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

from .sh_grid import Sampler
from .spherical import azimuthal, order_major_index, polar


def fft_size(n: int) -> int:
    """The smallest m >= n whose prime factors are 2, 3 and 5 (fast FFT lengths)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def torus_size(total: int, product: int) -> tuple[int, int]:
    """(N_alpha, N_beta) for products of degree <= `product` projected with total degree
    (product + output degree) <= `total`: alias-free below the output degree in alpha,
    alias-free for the whole product in beta (the projection uses every beta frequency)."""
    return fft_size(total + 1), fft_size(2 * product + 1)


def _dft(values: Tensor, n: int) -> Tensor:
    """Coefficients c[u], u = 0..n//2 ... (FFT order), of samples at 2 pi k / n, float64."""
    return torch.fft.fft(values.to(torch.complex128), dim=0) / n


@cache
def polar_coefficients(lmax: int) -> Tensor:
    """p_lm[u], u = 0..L, real (even |m|) or imaginary part (odd |m|), order-major:
    (2L+1, L+1 [u], L+1 [l - |m|])."""
    n = 2 * lmax + 2
    beta = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    coef = _dft(polar(lmax, beta), n)[: lmax + 1]  # (u, lm)
    odd = torch.tensor([abs(m) % 2 for ell in range(lmax + 1) for m in range(-ell, ell + 1)])
    real = torch.where(odd.bool(), coef.imag, coef.real)
    real = torch.cat([real, torch.zeros(lmax + 1, 1, dtype=torch.float64)], 1)
    return real[:, order_major_index(lmax)].permute(1, 0, 2).contiguous()


@cache
def azimuthal_coefficients(lmax: int) -> Tensor:
    """q_m[v] i^(|m| mod 2), rows v = 0..L, -L..-1 (FFT order), columns m = -L..L, complex128."""
    n = 2 * lmax + 2
    alpha = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    q = _dft(azimuthal(lmax, alpha), n)  # (v mod n, m)
    rows = list(range(lmax + 1)) + list(range(n - lmax, n))
    parity = torch.tensor([1j if abs(m) % 2 else 1.0 for m in range(-lmax, lmax + 1)])
    return q[rows] * parity


def _sin_integral(k: Tensor) -> Tensor:
    """J(k) = int_0^pi e^{ikb} sin b db, complex128."""
    k = k.double()
    even = (1 + torch.cos(math.pi * k)) / torch.where(k.abs() == 1, 2.0, 1 - k * k)
    odd = torch.where(k.abs() == 1, k * math.pi / 2, 0.0)
    return torch.complex(torch.where(k.abs() == 1, 0.0, even), odd)


@cache
def projection_tables(lmax_out: int, degree: int) -> tuple[Tensor, Tensor]:
    """(q (2L+1 [m], 2L+1 [v]) complex, K (2L+1, L+1, degree+1 [u]) complex) such that
    x[m, l] = Re sum_u K[m, l, u] sum_v q[m, v] H[v, u], v in FFT order."""
    n = 2 * lmax_out + 2
    beta = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    p = _dft(polar(lmax_out, beta), n)  # (u' mod n, lm), |u'| <= l
    u_prime = torch.fft.fftfreq(n, 1 / n).round()
    u = torch.arange(degree + 1)
    kernel = (_sin_integral(u[:, None] + u_prime[None, :]) @ p).T  # (lm, u)
    weight = torch.where(u == 0, 1.0, 2.0) / 2  # 2 pi (alpha integral) / 4 pi
    kernel = torch.cat([kernel * weight, torch.zeros(1, degree + 1, dtype=kernel.dtype)])
    kernel = kernel[order_major_index(lmax_out)]  # (2L+1, L+1, u)
    # alpha integral: int e^{iva} S_m(a) da / 2pi = q_m[-v]
    q = azimuthal_coefficients(lmax_out)  # rows v (FFT order), includes i^(|m|%2)
    parity = torch.tensor([1j if abs(m) % 2 else 1.0 for m in range(-lmax_out, lmax_out + 1)])
    q = q / parity  # plain q_m[v]
    minus_v = [0] + list(range(2 * lmax_out, 0, -1))  # row of -v for each row v
    return q[minus_v].T.contiguous(), kernel


class FourierSampler(Sampler):
    """Exact SH <-> torus-grid transforms through the 2-D Fourier basis, with FFTs.

    `synthesis` maps SH coefficients to values on an N_alpha x N_beta torus grid
    (inverse FFT of the 2-D Fourier coefficients), `analysis` maps values back
    (FFT, then the exact projection above). A pointwise product of sampled values
    is the FFT convolution of the Fourier coefficients.
    """

    def __init__(self, total: int, product: int):
        super().__init__()
        self.total, self.product = total, product
        self.n_alpha, self.n_beta = torus_size(total, product)

    def _input_tables(self, lmax: int, like: Tensor) -> tuple[Tensor, ...]:
        def build():
            q = azimuthal_coefficients(lmax) * (self.n_alpha * self.n_beta)
            return polar_coefficients(lmax), q.real.contiguous(), q.imag.contiguous()

        return self.cached(("in", lmax), like, build)

    def synthesis(self, x: Tensor, lmax: int) -> Tensor:
        """(R, (lmax+1)^2) -> values (N_alpha, N_beta * R) on the torus grid."""
        polar_t, q_re, q_im = self._input_tables(lmax, x)
        r = x.shape[0]
        z = torch.bmm(polar_t, self.to_order_major(x, lmax)).view(2 * lmax + 1, -1)  # (m, u R)
        spec = torch.complex(q_re @ z, q_im @ z).view(2 * lmax + 1, lmax + 1, r)
        grid = spec.new_zeros(self.n_alpha, self.n_beta // 2 + 1, r)
        grid[: lmax + 1, : lmax + 1] = spec[: lmax + 1]
        grid[self.n_alpha - lmax :, : lmax + 1] = spec[lmax + 1 :]
        values = torch.fft.irfft2(grid, s=(self.n_alpha, self.n_beta), dim=(0, 1))
        return values.reshape(self.n_alpha, -1)

    def analysis(self, values: Tensor, lmax: int) -> Tensor:
        """values (N_alpha, N_beta * R) -> ((lmax+1)^2, R)."""
        lout, deg = lmax, self.product

        def build():
            rows = torch.tensor([*range(lout + 1), *range(self.n_alpha - lout, self.n_alpha)])
            return (*projection_tables(lout, deg), rows)

        q, kernel, rows = self.cached(("out", lmax), values, build)
        h = values.view(self.n_alpha, self.n_beta, -1)
        spec = torch.fft.rfft2(h, dim=(0, 1), norm="forward")
        spec = spec.index_select(0, rows)[:, : deg + 1]  # (v, u, R)
        w = (q @ spec.reshape(2 * lout + 1, -1)).view(2 * lout + 1, deg + 1, -1)
        return self.from_order_major(torch.bmm(kernel, w).real, lout)

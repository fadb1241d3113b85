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


def _partners(lmax: int, n_rows: int) -> tuple[Tensor, Tensor]:
    """For each order m = -L..L, the rows of frequencies v = +|m| and v = -|m| in an
    FFT-ordered axis of length `n_rows` (row 0 twice for m = 0)."""
    m = torch.arange(-lmax, lmax + 1).abs()
    return m, torch.where(m == 0, 0, n_rows - m)


@cache
def synthesis_coefficients(lmax: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_plus, c_minus, m_plus, m_minus): F[v, u] = c_plus[v] Z[m_plus[v], u] +
    c_minus[v] Z[m_minus[v], u], v = 0..L, -L..-1 (FFT order), Z[m] = sum_l x_lm p_lm: the
    two nonzero entries of each row of `azimuthal_coefficients` (S_m has frequencies
    +-|m| only), complex128, and their columns (m + L)."""
    q = azimuthal_coefficients(lmax)
    rows = torch.tensor([*range(lmax + 1), *range(-lmax, 0)])
    m_plus, m_minus = lmax + rows.abs(), lmax - rows.abs()
    c_plus = q[torch.arange(len(rows)), m_plus]
    c_minus = torch.where(rows == 0, 0, q[torch.arange(len(rows)), m_minus])
    rest = q.clone()
    rest[torch.arange(len(rows)), m_plus] = 0
    rest[torch.arange(len(rows)), m_minus] = 0
    assert rest.abs().max() < 1e-12, "azimuthal coefficients are not two per row"
    return c_plus, c_minus, m_plus, m_minus


@cache
def analysis_table(lmax_out: int, degree: int) -> Tensor:
    """(2L+1 [m], 2 (degree+1), L+1 [l]) real: x[m, l] = sum_k D[m, k] T[m, k, l] with D[m]
    the real and imaginary parts of H[|m|, u], u = 0..degree. This is `projection_tables`
    with its two nonzero azimuthal entries per order (v = +-|m|) folded in, and
    H[-v, u] = (-1)^v conj H[v, u] (h is real, and each row v is even or odd in b with v):
    Re(K1 H + K2 (-1)^m conj H) = (Re K1 + (-1)^m Re K2) Re H + ((-1)^m Im K2 - Im K1) Im H."""
    q, kernel = projection_tables(lmax_out, degree)  # q (m, v local), kernel (m, l, u)
    plus, minus = _partners(lmax_out, 2 * lmax_out + 1)
    m = torch.arange(2 * lmax_out + 1)
    k1 = kernel * q[m, plus][:, None, None]
    k2 = kernel * torch.where(plus == 0, 0, q[m, minus])[:, None, None]
    sign = (1 - 2 * (plus % 2)).to(torch.float64)[:, None, None]
    parts = torch.stack([k1.real + sign * k2.real, sign * k2.imag - k1.imag], -1)  # m l u c
    return parts.flatten(2).transpose(1, 2).contiguous()


class FourierSampler(Sampler):
    """Exact SH <-> torus-grid transforms through the 2-D Fourier basis, with FFTs.

    `synthesis` maps SH coefficients to values on an N_alpha x N_beta torus grid
    (inverse FFT of the 2-D Fourier coefficients), `analysis` maps values back
    (FFT, then the exact projection above). A pointwise product of sampled values
    is the FFT convolution of the Fourier coefficients. Rows come first (values are
    (R, N_alpha N_beta)), so every FFT runs over contiguous memory, and the azimuthal
    change of basis uses its two nonzero entries per frequency instead of a dense
    product.
    """

    rows_first = True

    def __init__(self, total: int, product: int):
        super().__init__()
        self.total, self.product = total, product
        self.n_alpha, self.n_beta = torus_size(total, product)

    def _input_tables(self, lmax: int, like: Tensor) -> tuple[Tensor, ...]:
        def build():
            c_plus, c_minus, m_plus, m_minus = synthesis_coefficients(lmax)
            scale = self.n_alpha * self.n_beta  # the two inverse FFTs divide by it
            c = [t.view(-1, 1, 1) * scale for t in (c_plus, c_minus)]
            p = polar_coefficients(lmax).transpose(1, 2).contiguous()  # (m, l, u)
            return p, c[0].real, c[0].imag, c[1].real, c[1].imag, m_plus, m_minus

        return self.cached(("in", lmax), like, build)

    def synthesis(self, x: Tensor, lmax: int) -> Tensor:
        """(R, (lmax+1)^2) -> values (R, N_alpha N_beta) on the torus grid."""
        p, a_re, a_im, b_re, b_im, m_plus, m_minus = self._input_tables(lmax, x)
        r = x.shape[0]
        z = torch.bmm(self.rows_by_order(x, lmax), p)  # (m, R, u)
        z1, z2 = z.index_select(0, m_plus), z.index_select(0, m_minus)  # (v, R, u)
        spec = torch.complex(a_re * z1 + b_re * z2, a_im * z1 + b_im * z2).transpose(0, 1)
        # Frequencies |v| > (N_alpha - 1) / 2 (there are some when L > L_other + L_out)
        # belong to degrees no output degree can reach: they are dropped, not folded.
        keep = min(lmax, (self.n_alpha - 1) // 2)
        gap = spec.new_zeros(r, self.n_alpha - 2 * keep - 1, lmax + 1)
        spec = torch.cat([spec[:, : keep + 1], gap, spec[:, 2 * lmax + 1 - keep :]], 1)
        # the inverse 2-D FFT as two 1-D ones, the first only over the columns u <= L
        values = torch.fft.irfft(torch.fft.ifft(spec, dim=1), n=self.n_beta, dim=2)
        return values.view(r, -1)

    def analysis(self, values: Tensor, lmax: int) -> Tensor:
        """values (R, N_alpha N_beta) -> ((lmax+1)^2, R)."""
        deg = self.product

        def build():
            return analysis_table(lmax, deg), _partners(lmax, self.n_alpha)[0]

        table, plus = self.cached(("out", lmax), values, build)
        h = values.view(-1, self.n_alpha, self.n_beta)
        spec = torch.fft.rfft2(h, dim=(1, 2), norm="forward")[:, :, : deg + 1]
        spec = torch.view_as_real(spec).index_select(1, plus)  # (R, m, u, re/im)
        w = spec.flatten(2).transpose(0, 1)  # (m, R, 2 (deg+1))
        return self.rows_from_order(torch.bmm(w, table), lmax).T

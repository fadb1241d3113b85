"""Gaunt tensor products: equivariant products of spherical functions, by grid or by FFT.

Luo, Chen, Krishnapriyan, "Enabling Efficient Equivariant Operations in the
Fourier Basis via Gaunt Tensor Products", ICLR 2024. Inputs hold real SH
coefficients (e3nn's convention and layout, component normalisation:
`spherical.py`) of functions f1, f2 on the sphere, one function per channel;
the output holds the coefficients of their product up to degree L_out:

    out[l3 m3] = sum G(l1 m1, l2 m2, l3 m3) x1[l1 m1] x2[l2 m2],   G = mean_S2(Y_l1m1 Y_l2m2 Y_l3m3)

G are Gaunt coefficients. By equivariance G = g(l1, l2, l3) C(l1 l2 l3) with C
e3nn's Clebsch-Gordan (`wigner_3j`) tensors, so this is e3nn's "uuu"
`TensorProduct` with fixed path weights g, computed in O(L^3) instead of O(L^6).
Parity limits which paths exist: G = 0 unless l1 + l2 + l3 is even, so a Gaunt
product never yields, e.g., the cross product of two vectors (1 x 1 -> 1); it
only produces what a product of two functions on the sphere can.

With `weights="per_degree"` each channel c scales its inputs and output per degree,

    out = w3[c, l3] GP(w1[c, l1] x1, w2[c, l2] x2)     (learnable, initialised to 1)

which equals a "uuu" TensorProduct with path weights w1 w2 w3 g.

Backends (the same module, the same numbers): "grid" samples both inputs on a
Gauss-Legendre x uniform grid, multiplies pointwise and projects back by exact
quadrature, one order m at a time (`sh_grid.py`); "dense" does the same with the
transforms as two dense matrices, three GEMMs in all (`sh_dense.py`, fastest for
small lmax); "fft" goes through the 2-D Fourier basis and computes
the product as an FFT convolution (`sh_fourier.py`). "auto" picks per size and
device from the measured crossover (`benchmarks/gaunt.py`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .sh_dense import DenseSampler
from .sh_fourier import FourierSampler
from .sh_grid import GridSampler
from .spherical import degrees, sh_dim

BACKENDS = ("auto", "dense", "grid", "fft")
WEIGHTS = ("per_degree", None)
# "auto" uses the dense route up to the total degree L1 + L2 + Lout in DENSE_UP_TO, the
# FFT route from the one in FFT_FROM, the grid route in between, per device type
# (crossovers measured with benchmarks/gaunt.py: results/gaunt_cpu.md, gaunt_cuda.md;
# dense is unmeasured on a GPU, FFT was never faster than grid, up to lmax 32).
DENSE_UP_TO = {"cpu": 24}
FFT_FROM = {"cpu": math.inf, "cuda": math.inf}
# On the CPU the rows are processed in chunks whose sampled values take about this many
# bytes, so that the grid tensors stay in cache (the transforms are memory-bound); 2 MiB
# was the fastest of 128 KiB .. 16 MiB at lmax 4 and 8 (AMD EPYC, 2 threads).
CHUNK_BYTES = 2**21

Samplers = dict[str, "DenseSampler | GridSampler | FourierSampler"]
UNWEIGHTED = (None, None, None)  # `_Product`'s (w1, w2, w3) for a plain product


def choose_backend(total: int, device: torch.device) -> str:
    """The faster backend for products of total degree `total` (L1 + L2 + Lout) on `device`."""
    if total >= FFT_FROM.get(device.type, math.inf):
        return "fft"
    return "dense" if total <= DENSE_UP_TO.get(device.type, -1) else "grid"


def _check_lmax(**lmax: int) -> None:
    for name, value in lmax.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be an integer >= 0")


def _check_options(channels: int | None, weights: str | None, backend: str) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not allowed; allowed: 'per_degree', None")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; allowed: {', '.join(BACKENDS)}")
    if weights is not None and (not isinstance(channels, int) or channels < 1):
        raise ValueError(f"channels={channels!r} must be an integer >= 1 with per-degree weights")


def _chunk_rows(sampler, x: Tensor, multiple: int = 1) -> int:
    """Rows per chunk: all on a GPU; on the CPU about CHUNK_BYTES of samples. A multiple of
    `multiple` (the channels, so that a chunk holds whole channel groups)."""
    if x.device.type != "cpu":
        rows = max(x.shape[0], 1)
    else:
        rows = max(64, CHUNK_BYTES // (sampler.n_alpha * sampler.n_beta * x.element_size()))
    return -(-rows // multiple) * multiple


class _ProductPair(torch.autograd.Function):
    """(P_L1(G f2), P_L2(G f1)): both input gradients of an unweighted `_Product`, sharing
    the samples; its own backward is made of `_Product`s."""

    @staticmethod
    def forward(ctx, g, x1, x2, sampler, lmax, lmax1, lmax2):
        ctx.save_for_backward(g, x1, x2)
        ctx.meta = (sampler, lmax, lmax1, lmax2)
        out1 = x1.new_empty(x1.shape)
        out2 = x2.new_empty(x2.shape)
        step = _chunk_rows(sampler, x1)
        for s in range(0, x1.shape[0], step):
            gv = sampler.synthesis(g[s : s + step], lmax)
            f1 = sampler.synthesis(x1[s : s + step], lmax1)
            f2 = sampler.synthesis(x2[s : s + step], lmax2)
            out1[s : s + step] = sampler.analysis(f2.mul_(gv), lmax1).T
            out2[s : s + step] = sampler.analysis(f1.mul_(gv), lmax2).T
        return out1, out2

    @staticmethod
    def backward(ctx, grad1, grad2):
        g, x1, x2 = ctx.saved_tensors
        sampler, lmax, lmax1, lmax2 = ctx.meta
        grad_g = _Product.apply(grad1, x2, *UNWEIGHTED, sampler, lmax1, lmax2, lmax)
        grad_g = grad_g + _Product.apply(grad2, x1, *UNWEIGHTED, sampler, lmax2, lmax1, lmax)
        grad_x1 = _Product.apply(grad2, g, *UNWEIGHTED, sampler, lmax2, lmax, lmax1)
        grad_x2 = _Product.apply(grad1, g, *UNWEIGHTED, sampler, lmax1, lmax, lmax2)
        return grad_g, grad_x1, grad_x2, None, None, None, None


def _scale(x: Tensor, weight: Tensor | None) -> Tensor:
    """x (N C, dims) times the per-channel weight (C, dims), row n C + c scaled by weight[c]."""
    if weight is None:
        return x
    return (x.unflatten(0, (-1, weight.shape[0])) * weight).flatten(0, 1)


class _Product(torch.autograd.Function):
    """out = w3 P_L((w1 x1)(w2 x2)) for x1, x2 (R, dims) -> (R, (L+1)^2), rows n C + c
    weighted by channel c (weights (C, dims), or None: `UNWEIGHTED`), in chunks of whole
    channel groups: the weighted inputs exist only one chunk at a time, so a forward
    allocates its output and no full-size temporaries.

    Gaunt coefficients are symmetric in their three (l, m) pairs, so the gradient
    is again a product: d<g, out>/dx1 = P_L1(G f2), G the function with coefficients g.
    The backward is made of differentiable operations (`_scale`, `_ProductPair`, whose
    own backward is made of `_Product`), so every order of derivative stays exact and
    cheap; it saves the inputs, never the sampled values, and the unweighted product only
    when w3 needs a gradient (recomputed under `create_graph`, to stay differentiable)."""

    @staticmethod
    def forward(ctx, x1, x2, w1, w2, w3, sampler, lmax1, lmax2, lmax):
        channels = 1 if w1 is None else w1.shape[0]
        step = _chunk_rows(sampler, x1, channels)
        out = x1.new_empty(x1.shape[0], sh_dim(lmax))
        keep = w3 is not None and ctx.needs_input_grad[4]
        product = torch.empty_like(out) if keep else None
        for s in range(0, x1.shape[0], step):
            n = min(step, x1.shape[0] - s)
            values = sampler.synthesis(_scale(x1[s : s + n], w1), lmax1)
            values.mul_(sampler.synthesis(_scale(x2[s : s + n], w2), lmax2))
            p = sampler.analysis(values, lmax).T
            if keep:
                product[s : s + n] = p
            if w3 is None:
                out[s : s + n] = p
            else:
                torch.mul(
                    p.unflatten(0, (-1, channels)),
                    w3,
                    out=out[s : s + n].unflatten(0, (-1, channels)),
                )
        ctx.save_for_backward(x1, x2, w1, w2, w3, product)
        ctx.meta = (sampler, lmax1, lmax2, lmax)
        return out

    @staticmethod
    def backward(ctx, grad):
        x1, x2, w1, w2, w3, product = ctx.saved_tensors
        sampler, lmax1, lmax2, lmax = ctx.meta
        a, b = _scale(x1, w1), _scale(x2, w2)
        ga, gb = _ProductPair.apply(_scale(grad, w3), a, b, sampler, lmax, lmax1, lmax2)
        gw3 = None
        if ctx.needs_input_grad[4]:
            if torch.is_grad_enabled():
                product = _Product.apply(a, b, *UNWEIGHTED, sampler, lmax1, lmax2, lmax)
            gw3 = _channel_sum(grad * product, w3)
        gw1 = _channel_sum(ga * x1, w1) if ctx.needs_input_grad[2] else None
        gw2 = _channel_sum(gb * x2, w2) if ctx.needs_input_grad[3] else None
        return _scale(ga, w1), _scale(gb, w2), gw1, gw2, gw3, None, None, None, None


def _channel_sum(x: Tensor, weight: Tensor) -> Tensor:
    """(N C, dims) -> (C, dims): the sum over the rows of each channel."""
    return x.unflatten(0, (-1, weight.shape[0])).sum(0)


class _SphereProduct(nn.Module):
    """Shared parts: both samplers, backend choice, per-degree weights and shapes."""

    def __init__(self, total: int, product: int, lmax_out: int, backend: str):
        super().__init__()
        self.lmax_out, self.backend, self.total = lmax_out, backend, total
        self._samplers: Samplers = {
            "dense": DenseSampler(total),
            "grid": GridSampler(total),
            "fft": FourierSampler(total, product),
        }
        self._degree_index: dict = {}

    def sampler(self, x: Tensor) -> DenseSampler | GridSampler | FourierSampler:
        name = choose_backend(self.total, x.device) if self.backend == "auto" else self.backend
        return self._samplers[name]

    def _per_degree(self, weight: Tensor, lmax: int) -> Tensor:
        """(C, L+1) -> (C, (L+1)^2): each degree's weight repeated over its 2l+1 orders."""
        key = (lmax, weight.device)
        if key not in self._degree_index:
            self._degree_index[key] = degrees(lmax).to(weight.device)
        return weight[:, self._degree_index[key]]

    def _output(self, out: Tensor, lead: torch.Size) -> Tensor:
        """(R, (Lout+1)^2) -> (*lead, (Lout+1)^2), scaled by the output weights."""
        out = out.reshape(*lead, out.shape[-1])
        if self.weighted:
            out = out * self._per_degree(self.weight_out, self.lmax_out)
        return out

    def _check(self, x: Tensor, lmax: int, name: str) -> None:
        ok = x.dim() >= 2 and x.shape[-1] == sh_dim(lmax)
        if self.weighted:
            ok = ok and x.shape[-2] == self.channels
        if not ok:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}; expected (..., "
                f"{self.channels if self.weighted else 'channels'}, {sh_dim(lmax)}) for lmax {lmax}"
            )


class GauntTensorProduct(_SphereProduct):
    """Gaunt tensor product of (..., C, (L1+1)^2) and (..., C, (L2+1)^2) -> (..., C, (Lout+1)^2).

    Leading dimensions broadcast. `channels` is required with per-degree weights.
    `backend`: "auto" (default), "dense", "grid" or "fft".
    """

    def __init__(
        self,
        lmax_in1: int,
        lmax_in2: int,
        lmax_out: int,
        channels: int | None = None,
        weights: str | None = "per_degree",
        backend: str = "auto",
    ):
        _check_lmax(lmax_in1=lmax_in1, lmax_in2=lmax_in2, lmax_out=lmax_out)
        _check_options(channels, weights, backend)
        pairs = (lmax_in1 + lmax_in2, lmax_in1 + lmax_out, lmax_in2 + lmax_out)
        super().__init__(lmax_in1 + lmax_in2 + lmax_out, max(pairs), lmax_out, backend)
        self.lmax_in1, self.lmax_in2, self.channels = lmax_in1, lmax_in2, channels
        if weights is not None:
            self.weight1 = nn.Parameter(torch.ones(channels, lmax_in1 + 1))
            self.weight2 = nn.Parameter(torch.ones(channels, lmax_in2 + 1))
            self.weight_out = nn.Parameter(torch.ones(channels, lmax_out + 1))
        self.weighted = weights is not None

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        self._check(x1, self.lmax_in1, "x1")
        self._check(x2, self.lmax_in2, "x2")
        lead = torch.broadcast_shapes(x1.shape[:-1], x2.shape[:-1])
        x1 = x1.expand(*lead, x1.shape[-1]).reshape(-1, x1.shape[-1])
        x2 = x2.expand(*lead, x2.shape[-1]).reshape(-1, x2.shape[-1])
        weights = [None] * 3
        if self.weighted:
            pairs = zip(
                (self.weight1, self.weight2, self.weight_out),
                (self.lmax_in1, self.lmax_in2, self.lmax_out),
                strict=True,
            )
            weights = [self._per_degree(w, lmax) for w, lmax in pairs]
        lmaxes = (self.lmax_in1, self.lmax_in2, self.lmax_out)
        out = _Product.apply(x1, x2, *weights, self.sampler(x1), *lmaxes)
        return out.reshape(*lead, out.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"lmax_in1={self.lmax_in1}, lmax_in2={self.lmax_in2}, lmax_out={self.lmax_out}, "
            f"channels={self.channels}, weighted={self.weighted}, backend={self.backend!r}"
        )


class GauntSelfProduct(_SphereProduct):
    """Many-body (MACE-style) self-product of one input: (..., C, (L+1)^2) -> (..., C, (Lout+1)^2).

    With f = sum (w_in x) Y (per-degree input weights), the output is the projection
    to degree Lout of a polynomial in f evaluated pointwise on the sphere:

        weights=None:          P(f^nu), the nu-fold Gaunt self-product, by repeated squaring
        weights="per_degree":  w_out[c, l] P(sum_k a[c, k] f^k), k = 1..nu, by Horner's rule

    Both are exact (the grid resolves degree nu L + Lout), equal to nested Gaunt
    products with untruncated intermediate degrees, and cost one synthesis, at
    most 2 log2(nu) (resp. nu - 1) pointwise products and one projection.
    """

    def __init__(
        self,
        lmax_in: int,
        lmax_out: int,
        correlation: int,
        channels: int | None = None,
        weights: str | None = "per_degree",
        backend: str = "auto",
    ):
        _check_lmax(lmax_in=lmax_in, lmax_out=lmax_out)
        if isinstance(correlation, bool) or not isinstance(correlation, int) or correlation < 1:
            raise ValueError(f"correlation={correlation!r} must be an integer >= 1")
        _check_options(channels, weights, backend)
        product = correlation * lmax_in
        super().__init__(product + lmax_out, product, lmax_out, backend)
        self.lmax_in, self.correlation, self.channels = lmax_in, correlation, channels
        if weights is not None:
            self.weight_in = nn.Parameter(torch.ones(channels, lmax_in + 1))
            self.order_weight = nn.Parameter(torch.ones(channels, correlation))
            self.weight_out = nn.Parameter(torch.ones(channels, lmax_out + 1))
        self.weighted = weights is not None

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, self.lmax_in, "x")
        if self.weighted:
            x = x * self._per_degree(self.weight_in, self.lmax_in)
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        sampler = self.sampler(x)
        f = sampler.synthesis(x, self.lmax_in)
        h = self._horner(f, sampler.rows_first) if self.weighted else _power(f, self.correlation)
        return self._output(sampler.analysis(h, self.lmax_out).T, lead)

    def _horner(self, f: Tensor, rows_first: bool) -> Tensor:
        """sum_k a[c, k] f^k = f (a_1 + f (a_2 + ... f a_nu)), channel c fastest in rows
        (the rows are f's first dimension when `rows_first`, else its last)."""
        if rows_first:
            f3, a = f.view(-1, self.channels, f.shape[-1]), self.order_weight[..., None]
        else:
            f3, a = f.view(f.shape[0], -1, self.channels), self.order_weight
        h = a[:, -1].expand_as(f3)
        for k in range(self.correlation - 2, -1, -1):
            h = a[:, k] + f3 * h
        return (f3 * h).reshape(f.shape)

    def extra_repr(self) -> str:
        return (
            f"lmax_in={self.lmax_in}, lmax_out={self.lmax_out}, correlation={self.correlation}, "
            f"channels={self.channels}, weighted={self.weighted}, backend={self.backend!r}"
        )


def _power(f: Tensor, n: int) -> Tensor:
    """f^n elementwise by repeated squaring."""
    result, square = None, f
    while True:
        if n & 1:
            result = square if result is None else result * square
        n >>= 1
        if not n:
            return result
        square = square * square

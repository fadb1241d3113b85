"""Gaunt tensor products against e3nn (Wigner D, Clebsch-Gordan products, SH quadrature)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from e3nn import o3
from torch.autograd import gradcheck, gradgradcheck

import gradlane.layers.gaunt as gaunt_module
from gradlane.layers import GauntSelfProduct, GauntTensorProduct

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = ("dense", "grid", "fft")
F64 = torch.float64


@contextmanager
def float64_default():
    """e3nn builds Wigner D matrices and Clebsch-Gordan tables in the default dtype
    (only float32-exact otherwise, also when cast to float64 afterwards)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def wigner_d(lmax: int, rotation: torch.Tensor) -> torch.Tensor:
    """e3nn's D(R) for real SH coefficients of degrees 0..lmax (parity (-1)^l), float64."""
    with float64_default():
        irreps = o3.Irreps([(1, (ell, (-1) ** ell)) for ell in range(lmax + 1)])
        return irreps.D_from_matrix(rotation.to(F64))


def sh(lmax: int, points: torch.Tensor) -> torch.Tensor:
    return o3.spherical_harmonics(
        list(range(lmax + 1)), points, normalize=True, normalization="component"
    )


def quadrature_product(x1, x2, lmax1, lmax2, lmax_out, n=24):
    """Oracle: project f1 f2 onto SH by Gauss-Legendre x uniform quadrature on a fine grid,
    with e3nn's spherical_harmonics at the points (exact for these degrees)."""
    z, w = np.polynomial.legendre.leggauss(n)
    beta = torch.acos(torch.tensor(z, dtype=F64))
    alpha = torch.arange(2 * n, dtype=F64) * math.pi / n
    b, a = torch.meshgrid(beta, alpha, indexing="ij")
    points = o3.angles_to_xyz(a, b).reshape(-1, 3)
    weight = (torch.tensor(w, dtype=F64)[:, None] * math.pi / n).expand(n, 2 * n).reshape(-1)
    f = (x1 @ sh(lmax1, points).T) * (x2 @ sh(lmax2, points).T)
    return (f * weight / (4 * math.pi)) @ sh(lmax_out, points)


def random_weights(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lmax", [(2, 3, 4), (3, 3, 3), (1, 4, 2), (0, 2, 2), (4, 1, 5)])
def test_matches_sh_quadrature(backend, lmax):
    l1, l2, lo = lmax
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(3, 2, (l1 + 1) ** 2, generator=gen, dtype=F64)
    x2 = torch.randn(3, 2, (l2 + 1) ** 2, generator=gen, dtype=F64)
    ours = GauntTensorProduct(l1, l2, lo, weights=None, backend=backend)(x1, x2)
    ref = quadrature_product(x1.reshape(6, -1), x2.reshape(6, -1), l1, l2, lo).view(3, 2, -1)
    assert (ours - ref).abs().max() < 1e-12


def gaunt_path_weight(l1: int, l2: int, l3: int) -> float:
    """g with G = g C (C: e3nn's wigner_3j, unit norm): sum_m C Y Y Y is rotation invariant,
    so its value at any one point is mean(sum_m C Y Y Y) = sum_m C G = g."""
    point = torch.tensor([[0.3, -0.5, 0.8]], dtype=F64)
    c = o3.wigner_3j(l1, l2, l3, dtype=F64)
    y = [sh(ell, point)[0, ell * ell :] for ell in (l1, l2, l3)]
    return torch.einsum("ijk,i,j,k->", c, *y).item()


def e3nn_layout(x: torch.Tensor, lmax: int) -> torch.Tensor:
    """(B, C, (L+1)^2) -> e3nn's (B, sum_l C (2l+1)) for irreps C x 0e + C x 1o + ..."""
    return torch.cat([x[..., ell * ell : (ell + 1) ** 2].flatten(1) for ell in range(lmax + 1)], 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_e3nn_tensor_product_with_gaunt_path_weights(backend):
    """Oracle: e3nn's "uuu" TensorProduct on the even paths, each path's weight the Gaunt
    factor g(l1, l2, l3) times the per-degree weights of its three irreps. (e3nn applies an
    instruction's own path_weight under a square root, so g goes into the weights.)"""
    l1, l2, lo, channels = 2, 3, 3, 4
    ours = GauntTensorProduct(l1, l2, lo, channels, backend=backend).double()
    random_weights(ours)

    def irreps(lmax):
        return o3.Irreps([(channels, (ell, (-1) ** ell)) for ell in range(lmax + 1)])

    paths = [(a, b, c) for a in range(l1 + 1) for b in range(l2 + 1) for c in range(lo + 1)
             if abs(a - b) <= c <= a + b and (a + b + c) % 2 == 0]  # fmt: skip
    with float64_default():
        tp = o3.TensorProduct(
            irreps(l1),
            irreps(l2),
            irreps(lo),
            [(a, b, c, "uuu", True) for a, b, c in paths],
            irrep_normalization="none",
            path_normalization="none",
            internal_weights=False,
            shared_weights=True,
        )
    w1, w2, w3 = ours.weight1.detach(), ours.weight2.detach(), ours.weight_out.detach()
    weight = torch.cat([gaunt_path_weight(a, b, c) * w1[:, a] * w2[:, b] * w3[:, c]
                        for a, b, c in paths])  # fmt: skip
    x1 = torch.randn(5, channels, (l1 + 1) ** 2, dtype=F64)
    x2 = torch.randn(5, channels, (l2 + 1) ** 2, dtype=F64)
    ref = tp(e3nn_layout(x1, l1), e3nn_layout(x2, l2), weight)
    assert (e3nn_layout(ours(x1, x2), lo) - ref).abs().max() < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_equivariant_under_rotations_and_inversion(backend, dtype, tol):
    l1, l2, lo, channels = 3, 2, 4, 3
    module = GauntTensorProduct(l1, l2, lo, channels, backend=backend).to(dtype)
    random_weights(module)
    gen = torch.Generator().manual_seed(2)
    x1 = torch.randn(4, channels, (l1 + 1) ** 2, generator=gen, dtype=dtype)
    x2 = torch.randn(4, channels, (l2 + 1) ** 2, generator=gen, dtype=dtype)
    out = module(x1, x2)
    scale = out.abs().max()
    for k in range(3):
        rotation = o3.rand_matrix(dtype=torch.float64) * (-1) ** k  # k = 1: with inversion
        d1, d2, do = (wigner_d(ell, rotation).to(dtype) for ell in (l1, l2, lo))
        rotated = module(x1 @ d1.T, x2 @ d2.T)
        assert ((rotated - out @ do.T).abs().max() / scale) < tol


def test_backends_agree_in_float32():
    x1 = torch.randn(8, 16, 25)
    x2 = torch.randn(8, 16, 25)
    grid = GauntTensorProduct(4, 4, 4, weights=None, backend="grid")(x1, x2)
    for backend in ("dense", "fft"):
        other = GauntTensorProduct(4, 4, 4, weights=None, backend=backend)(x1, x2)
        assert ((grid - other).abs().max() / grid.abs().max()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("self_product", [False, True])
def test_float32_gradients_match_float64(backend, self_product):
    """The float32 route (on the CPU oneDNN's matmul for table products) to second order,
    inside the product function and under autograd (the self-product)."""
    if self_product:
        module, dims = GauntSelfProduct(2, 3, 2, channels=4, backend=backend), (9,)
    else:
        module, dims = GauntTensorProduct(3, 2, 3, channels=4, backend=backend), (16, 9)
    random_weights(module.double())
    xs = [torch.randn(6, 4, d, dtype=F64, requires_grad=True) for d in dims]
    g = torch.randn(6, 4, 16, dtype=F64)

    def grads(mod, inputs):
        first = torch.autograd.grad(mod(*inputs), inputs, g.to(inputs[0].dtype), create_graph=True)
        second = torch.autograd.grad(sum(f.square().sum() for f in first), inputs)
        return [*first, *second]

    exact = grads(module, xs)
    single = grads(module.float(), [x.detach().float().requires_grad_() for x in xs])
    for a, b in zip(single, exact, strict=True):
        assert ((a.double() - b).abs().max() / b.abs().max()) < 1e-5


def test_auto_backend_follows_the_measured_crossovers(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(gaunt_module, "FFT_FROM", {"cpu": 30})
    assert [gaunt_module.choose_backend(t, cpu) for t in (6, 24, 25, 29, 30)] == [
        "dense", "dense", "grid", "grid", "fft"
    ]  # fmt: skip
    assert gaunt_module.choose_backend(6, torch.device("cuda")) == "grid"
    module = GauntTensorProduct(2, 2, 2, weights=None)
    x = torch.randn(3, 9)
    assert module.sampler(x) is module._samplers["dense"]


def test_parity_only_even_paths():
    """Two vectors (l = 1) give l = 0 and 2 but no l = 1 (their cross product is odd)."""
    x1 = torch.zeros(1, 1, 4, dtype=F64)
    x2 = torch.zeros(1, 1, 4, dtype=F64)
    x1[..., 1:], x2[..., 1:] = torch.randn(3, dtype=F64), torch.randn(3, dtype=F64)
    out = GauntTensorProduct(1, 1, 2, weights=None)(x1, x2)
    assert out[..., 1:4].abs().max() < 1e-14 and out[..., 0].abs() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_to_second_order_across_chunks(backend, monkeypatch):
    monkeypatch.setattr(gaunt_module, "CHUNK_BYTES", 1)  # one row per chunk (at least 64)
    module = GauntTensorProduct(2, 1, 2, channels=3, backend=backend).double()
    random_weights(module)
    x1 = torch.randn(70, 3, 9, dtype=F64, requires_grad=True)
    x2 = torch.randn(70, 3, 4, dtype=F64, requires_grad=True)
    assert gradcheck(module, (x1[:3], x2[:3]))
    assert gradgradcheck(module, (x1[:3], x2[:3]))
    # more rows than one chunk: gradients equal the single-chunk ones
    out = module(x1, x2)
    g1, g2 = torch.autograd.grad(out.square().sum(), (x1, x2))
    monkeypatch.setattr(gaunt_module, "CHUNK_BYTES", 2**30)
    h1, h2 = torch.autograd.grad(module(x1, x2).square().sum(), (x1, x2))
    assert torch.allclose(g1, h1, atol=1e-12) and torch.allclose(g2, h2, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_gradcheck_to_second_order_across_chunks(backend, monkeypatch):
    """The per-degree weights are applied chunk by chunk inside the product: their first
    and second derivatives (with the inputs') are checked numerically over several
    chunks of whole channel groups (64 rows at least, here 3 channels -> 66 rows)."""
    monkeypatch.setattr(gaunt_module, "CHUNK_BYTES", 1)
    module = GauntTensorProduct(2, 1, 2, channels=3, backend=backend).double()
    names = ("weight1", "weight2", "weight_out")
    weights = [(torch.rand_like(getattr(module, n)) + 0.5).requires_grad_() for n in names]
    x1 = torch.randn(23, 3, 9, dtype=F64, requires_grad=True)
    x2 = torch.randn(23, 3, 4, dtype=F64, requires_grad=True)

    def product(x1, x2, *w):
        return torch.func.functional_call(module, dict(zip(names, w, strict=True)), (x1, x2))

    assert gradcheck(product, (x1, x2, *weights))
    assert gradgradcheck(product, (x1, x2, *weights))


def test_any_leading_shape_and_broadcasting():
    module = GauntTensorProduct(2, 2, 2, channels=4)
    x1 = torch.randn(2, 3, 5, 4, 9)
    x2 = torch.randn(5, 4, 9)
    out = module(x1, x2)
    assert out.shape == (2, 3, 5, 4, 9)
    assert torch.allclose(out[1, 2], module(x1[1, 2], x2), atol=1e-6)
    assert module(x1[0, 0, 0], x2[0]).shape == (4, 9)


def test_bad_shapes_and_options_raise():
    module = GauntTensorProduct(2, 1, 2, channels=4)
    with pytest.raises(ValueError, match=r"x2 has shape \(3, 4, 9\); expected \(\.\.\., 4, 4\)"):
        module(torch.randn(3, 4, 9), torch.randn(3, 4, 9))
    with pytest.raises(ValueError, match="channels"):
        GauntTensorProduct(2, 2, 2)
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        GauntTensorProduct(2, 2, 2, weights=None, backend="cuda")
    with pytest.raises(ValueError, match="lmax_out=-1"):
        GauntTensorProduct(2, 2, -1, weights=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_product_is_nested_products_without_truncation(backend):
    """weights=None: P(f^3) equals GP(GP(x, x) to degree 2L, x) (exact intermediate)."""
    lmax, lo = 2, 3
    x = torch.randn(4, 2, 9, dtype=F64)
    cube = GauntSelfProduct(lmax, lo, 3, weights=None, backend=backend)(x)
    square = GauntTensorProduct(lmax, lmax, 2 * lmax, weights=None)(x, x)
    nested = GauntTensorProduct(2 * lmax, lmax, lo, weights=None)(square, x)
    assert (cube - nested).abs().max() < 1e-12


def test_weighted_self_product_is_horner_polynomial():
    """w_out P(a1 f + a2 f^2 + a3 f^3), f from the weighted input, against the pieces."""
    lmax, lo, channels = 1, 2, 3
    module = GauntSelfProduct(lmax, lo, 3, channels).double()
    random_weights(module)
    x = torch.randn(5, channels, 4, dtype=F64)
    a = module.order_weight.detach()
    deg_in, deg_out = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 1, 1, 2, 2, 2, 2, 2])
    xw = x * module.weight_in.detach()[:, deg_in]
    linear = torch.cat([xw, torch.zeros(5, channels, 5, dtype=F64)], -1)
    square = GauntSelfProduct(lmax, lo, 2, weights=None)(xw)
    cube = GauntSelfProduct(lmax, lo, 3, weights=None)(xw)
    poly = a[:, 0, None] * linear + a[:, 1, None] * square + a[:, 2, None] * cube
    expected = poly * module.weight_out.detach()[:, deg_out]
    assert (module(x) - expected).abs().max() < 1e-12


def test_self_product_equivariant_and_differentiable():
    module = GauntSelfProduct(2, 2, 3, channels=2).double()
    random_weights(module)
    x = torch.randn(3, 2, 9, dtype=F64, requires_grad=True)
    rotation = -o3.rand_matrix(dtype=F64)
    d = wigner_d(2, rotation)
    assert (module(x @ d.T) - module(x) @ d.T).abs().max() < 1e-10
    assert gradcheck(module, (x,)) and gradgradcheck(module, (x,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_cpu(backend):
    module = GauntTensorProduct(3, 3, 3, channels=8, backend=backend)
    random_weights(module)
    x1, x2 = torch.randn(16, 8, 16), torch.randn(16, 8, 16)
    cpu = module(x1, x2)
    gpu = module.cuda()(x1.cuda(), x2.cuda()).cpu()
    assert ((gpu - cpu).abs().max() / cpu.abs().max()) < 1e-5

"""The volume renderer against closed forms, and PSNR / SSIM against scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gradlane.layers import (
    FieldOutput,
    OccupancyGrid,
    camera_rays,
    composite,
    psnr,
    ray_box,
    scatter_valid,
    sh_basis,
    ssim,
    stratified_samples,
)
from gradlane.recipes.nerf_distill.distill import Rays, RenderSettings, render_rays

RADIUS, SIGMA, COLOR = 0.5, 3.0, (0.2, 0.6, 0.9)


class SphereField(torch.nn.Module):
    """Constant density SIGMA and colour COLOR inside a ball of radius RADIUS, else empty."""

    def forward(self, x, d):
        inside = x.norm(dim=-1) < RADIUS
        log_density = torch.where(inside, math.log(SIGMA), -30.0)
        rgb = torch.tensor(COLOR, dtype=x.dtype).expand(len(x), 3)
        return FieldOutput(log_density, rgb, None)

    def density(self, x):
        return torch.exp(self(x, x)[0])


def _chord(origins, dirs):
    """Length of each ray's path through the ball (closed form)."""
    b = (origins * dirs).sum(-1)
    disc = b * b - (origins * origins).sum(-1) + RADIUS**2
    return 2 * disc.clamp(min=0).sqrt()


def test_constant_density_sphere_renders_its_closed_form_opacity_and_colour():
    origins = torch.tensor([[0.0, 0.0, 3.0]]).expand(7, 3).clone()
    origins[:, 0] = torch.linspace(-0.6, 0.6, 7)  # impact parameters, some missing the ball
    dirs = torch.tensor([[0.0, 0.0, -1.0]]).expand(7, 3)
    background = torch.tensor([1.0, 1.0, 1.0])
    settings = RenderSettings(1.0, 2048, background, OccupancyGrid(8, 1.0))
    out = render_rays(SphereField(), Rays(origins, dirs), settings)
    expected = 1 - torch.exp(-SIGMA * _chord(origins, dirs))
    assert expected[0] == 0 and expected[3] > 0.94  # the edge rays miss, the centre one not
    torch.testing.assert_close(out.opacity, expected, atol=3e-3, rtol=0)
    color = expected[:, None] * torch.tensor(COLOR) + (1 - expected[:, None]) * background
    torch.testing.assert_close(out.rgb, color, atol=3e-3, rtol=0)


def test_composite_matches_a_direct_product_over_samples():
    gen = torch.Generator().manual_seed(0)
    density = torch.rand(5, 9, generator=gen) * 4
    rgb = torch.rand(5, 9, 3, generator=gen)
    deltas = torch.rand(5, 9, generator=gen) * 0.2
    background = torch.tensor([0.3, 0.2, 0.1])
    color, opacity = composite(density, rgb, deltas, background)
    for r in range(5):
        transmittance, expected = 1.0, torch.zeros(3)
        for i in range(9):
            alpha = 1 - math.exp(-density[r, i].item() * deltas[r, i].item())
            expected += transmittance * alpha * rgb[r, i]
            transmittance *= 1 - alpha
        expected += transmittance * background
        torch.testing.assert_close(opacity[r], torch.tensor(1 - transmittance), atol=1e-5, rtol=0)
        torch.testing.assert_close(color[r], expected, atol=1e-5, rtol=0)


def test_camera_rays_follow_the_pinhole_model():
    c2w = torch.eye(4)
    c2w[:3, 3] = torch.tensor([0.1, -0.2, 2.0])
    origins, dirs = camera_rays(c2w, 5, 7, focal=4.0)
    assert origins.shape == dirs.shape == (35, 3)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(35))
    centre = 2 * 7 + 3  # row 2, column 3: the optical axis
    torch.testing.assert_close(dirs[centre], torch.tensor([0.0, 0.0, -1.0]))
    # pixel (row 0, col 6): its centre is 3 pixels right and 2 up of the axis
    expected = torch.nn.functional.normalize(torch.tensor([3.0 / 4, 2.0 / 4, -1.0]), dim=0)
    torch.testing.assert_close(dirs[6], expected)
    torch.testing.assert_close(origins[0], c2w[:3, 3])


def test_ray_box_and_stratified_samples_stay_inside_the_box():
    origins = torch.tensor([[-3.0, 0.2, 0.1], [0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    dirs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    near, far = ray_box(origins, dirs, 1.0)
    torch.testing.assert_close(near, torch.tensor([2.0, 0.0, 0.0]))
    torch.testing.assert_close(far, torch.tensor([4.0, 1.0, 0.0]))  # the third misses
    samples = stratified_samples(origins, dirs, 1.0, 16, torch.Generator().manual_seed(1))
    assert (samples.points[:2].abs() <= 1.0 + 1e-6).all()
    torch.testing.assert_close(samples.deltas[:, 0], torch.tensor([2 / 16, 1 / 16, 0.0]))


def test_occupancy_grid_marks_the_sphere_and_skips_empty_space():
    grid = OccupancyGrid(16, 1.0)
    fraction = grid.update(SphereField().density, threshold=1.0, dilate=0, points_per_cell=4)
    ball_cells = (4 / 3 * math.pi * RADIUS**3) / (2 / 16) ** 3
    assert 0.8 * ball_cells / 16**3 < fraction < 1.6 * ball_cells / 16**3
    points = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.9, 0.9], [2.0, 0.0, 0.0]])
    assert grid.occupied(points).tolist() == [True, False, False]
    settings = RenderSettings(1.0, 256, torch.ones(3), grid)
    origins, dirs = torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([[0.0, 0.0, -1.0]])
    out = render_rays(SphereField(), Rays(origins, dirs), settings)
    # only samples in cells the ball touches are evaluated: its chord (1.0 of the box's
    # 2.0) plus at most one cell (2/16) at either end
    assert 128 <= out.valid.sum() <= 256 * (1.0 + 2 * 2 / 16) / 2
    torch.testing.assert_close(out.opacity, 1 - torch.exp(-SIGMA * _chord(origins, dirs)),
                               atol=1e-2, rtol=0)  # fmt: skip


def test_scatter_valid_places_values_and_passes_gradients():
    valid = torch.tensor([[True, False, True], [False, True, False]])
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    full = scatter_valid(values, valid)
    assert full.tolist() == [[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]
    (full * torch.arange(6.0).reshape(2, 3)).sum().backward()
    assert values.grad.tolist() == [0.0, 2.0, 4.0]


def _images(seed: int):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, 40)
    smooth = np.stack([np.outer(np.sin(3 * x + c), np.cos(2 * x - c)) for c in (0, 1, 2)], -1)
    a = np.clip(0.5 + 0.4 * smooth, 0, 1)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    return a, b


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_and_ssim_match_scikit_image(seed):
    a, b = _images(seed)
    ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    assert psnr(tb, ta).item() == pytest.approx(
        peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-3
    )
    expected = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        channel_axis=-1,
    )  # fmt: skip
    assert ssim(tb, ta).item() == pytest.approx(expected, abs=1e-5)
    assert ssim(ta, ta).item() == pytest.approx(1.0, abs=1e-6)


def test_sh_basis_is_orthonormal_on_the_sphere():
    n = 200_000  # a Fibonacci lattice: nearly uniform points
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    d = torch.stack([(1 - z * z).sqrt() * phi.cos(), (1 - z * z).sqrt() * phi.sin(), z], -1)
    y = sh_basis(d, 4)
    gram = y.t() @ y * (4 * math.pi / n)
    torch.testing.assert_close(gram, torch.eye(16, dtype=torch.float64), atol=1e-3, rtol=0)

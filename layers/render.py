"""Volume rendering in plain PyTorch (any device): rays, samples, compositing, metrics.

Cameras follow the NeRF-synthetic (Blender/OpenGL) convention: a camera-to-world
matrix whose camera looks down its -z axis with +y up. Samples are stratified
between the ray's entry into and exit from the scene box [-bound, bound]^3;
an `OccupancyGrid` marks the cells that hold matter so empty space is skipped.
Compositing is the quadrature of Mildenhall et al. (NeRF, ECCV 2020):

    alpha_i = 1 - exp(-sigma_i delta_i),  T_i = exp(-sum_{j<i} sigma_j delta_j)
    C = sum_i T_i alpha_i c_i + (1 - sum_i T_i alpha_i) background
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def camera_rays(
    c2w: Tensor, height: int, width: int, focal: float, pixels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Origins and unit directions of the rays through pixel centres.

    `c2w` is (4, 4) or (B, 4, 4); `pixels` (B, N) flat pixel indices (row * width
    + col) picks N rays per camera, else every pixel. Returns (B*N, 3) each.
    """
    c2w = c2w.reshape(-1, 4, 4)
    if pixels is None:
        pixels = torch.arange(height * width, device=c2w.device).expand(len(c2w), -1)
    rows = torch.div(pixels, width, rounding_mode="floor").to(c2w.dtype)
    cols = (pixels % width).to(c2w.dtype)
    cam = torch.stack(
        [
            (cols + 0.5 - width / 2) / focal,
            -(rows + 0.5 - height / 2) / focal,
            -torch.ones_like(cols),
        ],
        dim=-1,
    )  # (B, N, 3)
    dirs = F.normalize(cam @ c2w[:, :3, :3].transpose(1, 2), dim=-1)
    origins = c2w[:, None, :3, 3].expand_as(dirs)
    return origins.reshape(-1, 3), dirs.reshape(-1, 3)


def ray_box(origins: Tensor, dirs: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """Entry and exit distances of each ray through [-bound, bound]^3 (slab method).

    Rays that miss the box (or start past it) get near == far.
    """
    inv = 1.0 / torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0, t1 = (-bound - origins) * inv, (bound - origins) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, torch.maximum(far, near)


@dataclass
class Samples:
    """Points along rays: `points` (R, S, 3), `dirs` (R, S, 3), `deltas` (R, S)."""

    points: Tensor
    dirs: Tensor
    deltas: Tensor


def stratified_samples(
    origins: Tensor,
    dirs: Tensor,
    bound: float,
    n_samples: int,
    generator: torch.Generator | None = None,
) -> Samples:
    """`n_samples` points per ray inside the box: one uniform draw in each of
    `n_samples` equal bins (`generator`), or the bin centres when it is None."""
    near, far = ray_box(origins, dirs, bound)
    rays = len(origins)
    if generator is None:
        u = torch.full((rays, n_samples), 0.5, device=origins.device, dtype=origins.dtype)
    else:
        u = torch.rand(rays, n_samples, generator=generator, dtype=origins.dtype)
        u = u.to(origins.device)
    steps = torch.arange(n_samples, device=origins.device, dtype=origins.dtype)
    span = (far - near)[:, None]
    t = near[:, None] + span * (steps + u) / n_samples
    points = origins[:, None] + t[..., None] * dirs[:, None]
    deltas = (span / n_samples).expand(-1, n_samples)
    return Samples(points, dirs[:, None].expand_as(points), deltas)


def blend_weights(density: Tensor, deltas: Tensor) -> Tensor:
    """T_i alpha_i of each of the (R, S) samples: its share of the pixel colour."""
    tau = density * deltas
    return torch.exp(-(torch.cumsum(tau, dim=-1) - tau)) * (1.0 - torch.exp(-tau))


def composite(
    density: Tensor, rgb: Tensor, deltas: Tensor, background: Tensor
) -> tuple[Tensor, Tensor]:
    """Alpha-composite (R, S) densities and (R, S, 3) colours over `background` (3,).

    Returns the pixel colours (R, 3) and the opacities sum_i T_i alpha_i (R,).
    """
    weights = blend_weights(density, deltas)
    opacity = weights.sum(-1)
    color = (weights[..., None] * rgb).sum(-2) + (1.0 - opacity)[:, None] * background
    return color, opacity


def scatter_valid(values: Tensor, valid: Tensor) -> Tensor:
    """Values of the valid samples placed into a zero tensor of `valid`'s shape."""
    full = values.new_zeros((*valid.shape, *values.shape[1:]))
    return full.index_put((valid,), values)


class OccupancyGrid:
    """A boolean grid of `resolution`^3 cells over [-bound, bound]^3: which cells hold
    matter. Samples in empty cells are skipped (their density counts as zero)."""

    def __init__(self, resolution: int, bound: float, cells: Tensor | None = None):
        if resolution < 1:
            raise ValueError(f"occupancy grid resolution={resolution} must be >= 1")
        self.resolution, self.bound = resolution, float(bound)
        self.cells = (
            torch.ones((resolution,) * 3, dtype=torch.bool) if cells is None else cells.bool()
        )

    def to(self, device: torch.device | str) -> OccupancyGrid:
        self.cells = self.cells.to(device)
        return self

    def cell_index(self, points: Tensor) -> Tensor:
        """Integer cell coordinates (..., 3) of points (clamped into the grid)."""
        scaled = (points + self.bound) / (2 * self.bound) * self.resolution
        return scaled.floor().long().clamp(0, self.resolution - 1)

    def occupied(self, points: Tensor) -> Tensor:
        """True for points inside the box and in an occupied cell."""
        inside = (points.abs() <= self.bound).all(-1)
        i = self.cell_index(points)
        return inside & self.cells[i[..., 0], i[..., 1], i[..., 2]]

    @torch.no_grad()
    def update(
        self,
        density: Callable[[Tensor], Tensor],
        threshold: float,
        generator: torch.Generator | None = None,
        points_per_cell: int = 2,
        dilate: int = 1,
        chunk: int = 1 << 16,
    ) -> float:
        """Mark the cells whose largest density over jittered points exceeds
        `threshold`, grown by `dilate` cells; returns the occupied fraction."""
        r = self.resolution
        device = self.cells.device
        axis = torch.arange(r, device=device, dtype=torch.float32)
        corner = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        best = torch.full((r**3,), -math.inf, device=device)
        for _ in range(points_per_cell):
            jitter = torch.rand(r**3, 3, generator=generator).to(device)
            points = (corner + jitter) / r * (2 * self.bound) - self.bound
            values = torch.cat([density(p) for p in points.split(chunk)])
            best = torch.maximum(best, values.float())
        cells = (best > threshold).reshape(r, r, r).float()
        if dilate:
            cells = F.max_pool3d(cells[None, None], 2 * dilate + 1, 1, dilate)[0, 0]
        self.cells = cells.bool()
        return self.cells.float().mean().item()

    def state_dict(self) -> dict:
        return {"resolution": self.resolution, "bound": self.bound, "cells": self.cells.cpu()}

    @classmethod
    def from_state(cls, state: dict) -> OccupancyGrid:
        return cls(state["resolution"], state["bound"], state["cells"])


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio of images in [0, 1]: -10 log10(MSE)."""
    return -10.0 * torch.log10(F.mse_loss(pred, target).clamp(min=1e-12))


def _gaussian_window(size: int, sigma: float, device, dtype) -> Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(pred: Tensor, target: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean structural similarity of (H, W, C) images in [0, 1] (Wang et al., 2004).

    Gaussian-weighted local statistics (window 11, sigma 1.5, K1 = 0.01,
    K2 = 0.03), averaged over the pixels whose whole window lies in the image
    and over channels: scikit-image's `structural_similarity` with
    `gaussian_weights=True, use_sample_covariance=False, data_range=1`.
    """
    c1, c2 = 0.01**2, 0.03**2
    x = pred.permute(2, 0, 1)[None].double()
    y = target.permute(2, 0, 1)[None].double()
    channels = x.shape[1]
    w = _gaussian_window(window, sigma, x.device, x.dtype)
    kernel = (w[:, None] * w[None, :]).expand(channels, 1, window, window)

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(z, kernel, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean().to(pred.dtype)

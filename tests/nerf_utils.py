"""Shared pieces of the NeRF tests: small field settings and an analytic field."""

from __future__ import annotations

import torch

from gradlane.layers import build_field

# small settings, so each test takes a fraction of a second
SMALL = {
    "mlp": {"width": 32, "depth": 3, "freqs": 4, "skip": 2, "color_hidden": 32},
    "hash": {
        "levels": 4,
        "table_log2": 12,
        "base_resolution": 4,
        "max_resolution": 32,
        "hidden": 32,
        "color_hidden": 32,
    },  # fmt: skip
    "tensorf": {"resolution": 24, "density_rank": 4, "color_rank": 6, "color_hidden": 32},
    "plenoxel": {"resolution": 24, "sh_degree": 2},
}
LEARNING_RATES = {"mlp": 0.005, "hash": 0.05, "tensorf": 0.02, "plenoxel": 0.3}


def small_field(arch: str, seed: int = 0, geo_feat_dim: int = 7, bound: float = 1.5):
    torch.manual_seed(seed)
    return build_field(arch, bound, geo_feat_dim, **SMALL[arch])


def random_points(n: int, seed: int, bound: float = 1.5):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, generator=gen) * 2 - 1) * bound
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    return x, d


def analytic(x: torch.Tensor, d: torch.Tensor):
    """A ball of radius 0.8 with log density 4 and a colour that varies with position
    and (a little) with the view; log density -2 (the floor) outside."""
    inside = x.norm(dim=-1) < 0.8
    log_density = torch.where(inside, 4.0, -2.0)
    rgb = torch.sigmoid(torch.stack([2 * x[:, 0], 2 * x[:, 1] - x[:, 2], d[:, 2]], -1))
    return log_density, rgb


def fit_analytic(field, arch: str, steps: int, points: int = 1024) -> None:
    """Regress `field`'s log density and colour onto `analytic` at random points."""
    opt = torch.optim.Adam(field.parameters(), lr=LEARNING_RATES[arch])
    for step in range(steps):
        x, d = random_points(points, step, field.bound)
        log_density, rgb = analytic(x, d)
        out = field(x, d)
        loss = 0.1 * torch.nn.functional.mse_loss(out.log_density, log_density)
        loss = loss + torch.nn.functional.mse_loss(out.rgb, rgb)
        opt.zero_grad()
        loss.backward()
        opt.step()

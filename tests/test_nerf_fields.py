"""The four radiance fields: shapes, gradients, the hash encoding against brute force, and
a short fit to an analytic field."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from nerf_utils import analytic, fit_analytic, random_points, small_field

from gradlane.layers import FIELDS, LOG_DENSITY_RANGE, HashField, build_field, clamp_log_density


@pytest.mark.parametrize("arch", sorted(FIELDS))
def test_field_shapes_and_gradients_reach_every_parameter(arch):
    field = small_field(arch)
    x, d = random_points(300, 0)
    out = field(x, d)
    assert out.log_density.shape == (300,) and out.rgb.shape == (300, 3)
    assert ((out.rgb > 0) & (out.rgb < 1)).all()
    lo, hi = LOG_DENSITY_RANGE
    assert ((out.log_density >= lo) & (out.log_density <= hi)).all()
    if arch == "plenoxel":
        assert out.feature is None and field.feature_dim == 0
    else:
        assert out.feature.shape == (300, 8) == (300, field.feature_dim)
        torch.testing.assert_close(out.feature[:, 0], out.log_density)
    torch.testing.assert_close(field.log_density(x), out.log_density)
    # a loss that moves density up and colour down reaches every parameter tensor
    (out.rgb.sum() - out.log_density.sum()).backward()
    for name, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_clamped_log_density_lets_gradients_return_into_range():
    raw = torch.tensor([-5.0, 0.0, 9.0], requires_grad=True)
    out = clamp_log_density(raw)
    assert out.tolist() == [-2.0, 0.0, 7.0]
    out.sum().backward()  # descent lowers all: the high one returns, the low one stays
    assert raw.grad.tolist() == [0.0, 1.0, 1.0]
    raw.grad = None
    (-clamp_log_density(raw)).sum().backward()  # descent raises all: the low one returns
    assert raw.grad.tolist() == [-1.0, -1.0, 0.0]


def _brute_force_hash_encoding(field: HashField, x: torch.Tensor) -> torch.Tensor:
    """Instant-NGP's encoding of one point, written out corner by corner."""
    table = 1 << field.table_log2
    out, offset = [], 0
    for res in field.resolutions.tolist():
        dense = (res + 1) ** 3 <= table
        pos = [(float(c) + 1) / 2 * res for c in x]
        base = [min(math.floor(p), res - 1) for p in pos]
        value = torch.zeros(field.table.shape[1], dtype=torch.float64)
        for corner in itertools.product((0, 1), repeat=3):
            v = [b + c for b, c in zip(base, corner, strict=True)]
            if dense:
                index = v[0] + (res + 1) * v[1] + (res + 1) ** 2 * v[2]
            else:
                index = (v[0] * 1 ^ v[1] * 2654435761 ^ v[2] * 805459861) % table
            weight = math.prod(
                (p - b) if c else 1 - (p - b) for p, b, c in zip(pos, base, corner, strict=True)
            )
            value += weight * field.table[offset + index].double()
        out.append(value)
        offset += min((res + 1) ** 3, table)
    return torch.cat(out)


def test_hash_encoding_matches_brute_force_with_dense_and_hashed_levels():
    torch.manual_seed(0)
    field = HashField(1.0, levels=4, table_log2=10, base_resolution=4, max_resolution=40)
    with torch.no_grad():
        field.table.normal_()
    assert field.dense.tolist() == [True, True, False, False]  # (res+1)^3 vs 1024 entries
    x = torch.tensor([[0.13, -0.72, 0.55], [-0.999, 0.999, 0.0], [0.4, 0.41, -0.3]])
    encoded = field.encode(x)
    for i in range(len(x)):
        torch.testing.assert_close(encoded[i].double(), _brute_force_hash_encoding(field, x[i]),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("arch", sorted(FIELDS))
def test_short_fit_to_an_analytic_field(arch):
    field = small_field(arch, seed=1)
    x, d = random_points(2000, 99)
    target = analytic(x, d)

    def error() -> tuple[float, float]:
        with torch.no_grad():
            out = field(x, d)
        return (
            torch.nn.functional.mse_loss(out.log_density, target[0]).item(),
            torch.nn.functional.mse_loss(out.rgb, target[1]).item(),
        )

    before = error()
    fit_analytic(field, arch, steps=60)
    after = error()
    assert after[0] < 0.35 * before[0], (before, after)
    assert after[1] < 0.6 * before[1], (before, after)


def test_build_field_rejects_unknown_names_and_wrong_types():
    with pytest.raises(ValueError, match="unknown field 'nerf'"):
        build_field("nerf", 1.0)
    with pytest.raises(ValueError, match="hash field has no setting 'levles'"):
        build_field("hash", 1.0, levles=3)
    with pytest.raises(ValueError, match=r"tensorf.resolution=2.5 must be an integer"):
        build_field("tensorf", 1.0, resolution=2.5)
    with pytest.raises(ValueError, match=r"plenoxel.resolution=1 \(>= 2\).*out of range"):
        build_field("plenoxel", 1.0, resolution=1)


def test_plenoxel_upsampling_keeps_the_field_where_old_voxels_are_new_ones():
    field = build_field("plenoxel", 1.0, resolution=5, sh_degree=2).double()
    with torch.no_grad():
        field.grid.normal_(generator=torch.Generator().manual_seed(1))
    x, d = random_points(200, 2, bound=1.0)  # inside the grid
    x, d = x.double(), d.double()
    corners = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=3)), dtype=torch.float64)
    before, at_corners = field(x, d), field.log_density(corners)
    field.upsample(9)  # 9 - 1 = 2 (5 - 1): the trilinear field is exactly preserved
    assert field.grid.shape == (1, 13, 9, 9, 9) and field.grid.requires_grad
    after = field(x, d)
    torch.testing.assert_close(after.log_density, before.log_density)
    torch.testing.assert_close(after.rgb, before.rgb)
    field.upsample(7)  # not a refinement: the field changes, but not at the corners
    assert not torch.allclose(field.log_density(x), before.log_density)
    torch.testing.assert_close(field.log_density(corners), at_corners)
    with pytest.raises(ValueError, match=r"plenoxel.resolution=1"):
        field.upsample(1)

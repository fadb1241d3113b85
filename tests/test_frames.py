"""Frame averaging: exact invariance / equivariance of a plain MLP, degenerate clouds."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3
from torch import nn

from gradlane.layers import FrameAveraging

F64 = torch.float64


class PointMLP(nn.Module):
    """Not equivariant at all: an MLP of raw coordinates, summed per graph (or per point)."""

    def __init__(self, out: int, per_point: bool):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, out)).double()
        self.per_point = per_point

    def forward(self, pos, batch):
        y = self.net(pos) + self.net(pos**2)  # (F, N, out)
        if self.per_point:
            return y.view(*y.shape[:2], -1, 3) if y.shape[-1] % 3 == 0 else y
        return y.new_zeros(y.shape[0], int(batch.max()) + 1, y.shape[-1]).index_add_(1, batch, y)


def clouds(sizes=(5, 8, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(sum(sizes), 3, generator=gen, dtype=F64) * torch.tensor([1.0, 2.0, 3.0])
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return pos, batch


def transform(group: str, seed: int):
    torch.manual_seed(seed)
    rotation = o3.rand_matrix(dtype=F64)
    if group in ("O3", "E3"):
        rotation = -rotation  # a reflection
    shift = torch.randn(3, dtype=F64) if group in ("E3", "SE3") else torch.zeros(3, dtype=F64)
    return rotation, shift


@pytest.mark.parametrize("group", ["O3", "SO3", "E3", "SE3"])
def test_invariant_output_is_exactly_invariant(group):
    fa = FrameAveraging(PointMLP(4, per_point=False), group=group)
    pos, batch = clouds()
    out = fa(pos, batch, num_graphs=3)
    plain = PointMLP(4, per_point=False)
    plain.load_state_dict(fa.backbone.state_dict())
    for seed in range(3):
        rotation, shift = transform(group, seed)
        perm = torch.randperm(len(pos))
        moved = fa(pos[perm] @ rotation.T + shift, batch[perm], num_graphs=3)
        assert (moved - out).abs().max() < 1e-10
        # the backbone alone is far from invariant
        raw = plain(pos[None] @ rotation.T + shift, batch)[0] - plain(pos[None], batch)[0]
        assert raw.abs().max() > 1e-2


@pytest.mark.parametrize("group", ["O3", "SE3"])
def test_equivariant_output_rotates_with_the_input(group):
    fa = FrameAveraging(PointMLP(6, per_point=True), group=group, output="equivariant")
    pos, batch = clouds()
    out = fa(pos, batch, num_graphs=3)  # (N, 2, 3): two vectors per point
    rotation, shift = transform(group, 7)
    perm = torch.randperm(len(pos))
    moved = fa(pos[perm] @ rotation.T + shift, batch[perm], num_graphs=3)
    assert (moved - out[perm] @ rotation.T).abs().max() < 1e-10


def test_so3_frames_tell_mirror_images_apart():
    fa = FrameAveraging(PointMLP(4, per_point=False), group="SO3")
    pos, batch = clouds(sizes=(9,))
    mirrored = pos * torch.tensor([-1.0, 1.0, 1.0], dtype=F64)
    assert (fa(pos, batch) - fa(mirrored, batch)).abs().max() > 1e-3
    o3_fa = FrameAveraging(fa.backbone, group="O3")
    assert (o3_fa(pos, batch) - o3_fa(mirrored, batch)).abs().max() < 1e-10


def test_vectors_rotate_with_the_frame():
    """A per-graph vector input (a cell) rotates with the frame: invariance holds for both."""

    class WithCell(nn.Module):
        def forward(self, pos, cell, batch):
            return (pos[:, :, :1] * cell[:, batch, 0, :1]).sum(1) + cell[..., 2, :].sum(-1)

    fa = FrameAveraging(WithCell(), group="E3")
    pos, batch = clouds(sizes=(6,))
    cell = torch.randn(1, 3, 3, dtype=F64)
    out = fa(pos, batch, vectors=(cell,))
    rotation, shift = transform("E3", 3)
    moved = fa(pos @ rotation.T + shift, batch, vectors=(cell @ rotation.T,))
    assert (moved - out).abs().max() < 1e-10


def test_isotropic_but_asymmetric_cloud_takes_the_quartic_frame():
    """Whitened random points: covariance = identity (every basis is a PCA basis), but the
    fourth moments pick axes, so the average stays exactly invariant and is not flagged."""
    pos, batch = clouds(sizes=(12,), seed=3)
    centred = pos - pos.mean(0)
    cov = centred.T @ centred / len(pos)
    evals, evecs = torch.linalg.eigh(cov)
    white = centred @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    fa = FrameAveraging(PointMLP(3, per_point=False), group="E3")
    frames = fa.frames(white, batch, 1)
    assert not frames.degenerate.any()
    out = fa(white, batch)
    for seed in range(3):
        rotation, shift = transform("E3", seed)
        assert (fa(white @ rotation.T + shift, batch) - out).abs().max() < 1e-9


def test_symmetric_cloud_is_flagged_degenerate():
    """A cube's vertices: every equivariant matrix is a multiple of the identity, no finite
    PCA frame exists. The layer says so instead of pretending to be invariant."""
    cube = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=F64)
    batch = torch.zeros(8, dtype=torch.long)
    fa = FrameAveraging(PointMLP(3, per_point=False), group="E3")
    assert fa.frames(cube, batch, 1).degenerate.all()
    pos, batch_g = clouds(sizes=(8,))
    assert not fa.frames(pos, batch_g, 1).degenerate.any()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="group='E2' is not allowed"):
        FrameAveraging(nn.Identity(), group="E2")
    with pytest.raises(ValueError, match="output='vector' is not allowed"):
        FrameAveraging(nn.Identity(), output="vector")
    with pytest.raises(ValueError, match=r"pos has shape \(4, 2\)"):
        FrameAveraging(nn.Identity())(torch.randn(4, 2))

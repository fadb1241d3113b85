"""Frame averaging: exact invariance or equivariance for any backbone, by PCA frames.

Puny, Atzmon, Ben-Hamu, Misra, Grover, Smith, Lipman, "Frame Averaging for
Invariant and Equivariant Network Design", ICLR 2022, section 3.1 (E(3) point
clouds). For a point cloud X (n x 3, rows are points) with centroid t and
covariance C = (X - t)^T (X - t) / n = U diag(lambda) U^T (eigenvalues ascending),
each frame element is g = (U S, t) with S = diag(+-1, +-1, +-1):

    invariant:    <phi>(X) = 1/|F| sum_g phi((X - t) U S)
    equivariant:  <phi>(X) = 1/|F| sum_g phi((X - t) U S) (U S)^T    (vector outputs)

O(3) and E(3) use all 8 sign choices, SO(3) and SE(3) the 4 with det(U S) = +1;
O(3) and SO(3) take no centroid (second moments about the origin, no translation).
A rotation, reflection or translation of X maps the frame onto itself, so the
average is exactly invariant (or equivariant) whatever the backbone is. The
paper's code used `torch.symeig`; this uses `torch.linalg.eigh`, batched over the
graphs of a batch (of any sizes).

Degenerate spectra. When two eigenvalues coincide (relative gap below `tol`),
eigenvectors are not unique and eigh's arbitrary choice would silently break
invariance. Such a graph takes its frame instead from K = sum_i |r_i|^2 r_i r_i^T / n
(r_i = x_i - t), another equivariant symmetric matrix, which separates the axes of
clouds whose second moments are isotropic but whose shapes are not. A cloud for
which K is degenerate too (e.g. a regular polyhedron: every equivariant matrix of
a shape with cubic symmetry is a multiple of the identity) admits no finite PCA
frame; `frames(...).degenerate` flags it, and for it the average is only as
invariant as eigh's arbitrary basis happens to be. Eigenvector derivatives scale
with 1 / gap, so forces through a nearly degenerate frame are noisy: keep inputs
away from the flagged set (for crystals: non-cubic cells).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

GROUPS = ("O3", "SO3", "E3", "SE3")
OUTPUTS = ("invariant", "equivariant")
SIGNS = torch.tensor(list(itertools.product((1.0, -1.0), repeat=3)))  # (8, 3)


class Frames(NamedTuple):
    rotations: Tensor  # (G, F, 3, 3): columns are the frame axes U S of each element
    centers: Tensor  # (G, 3): the centroids (zeros for O3 / SO3)
    degenerate: Tensor  # (G,) bool: no well-defined frame (see the module docstring)


def _segment_sum(values: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
    out = values.new_zeros((num_graphs, *values.shape[1:]))
    return out.index_add_(0, batch, values)


def _relative_gap(eigenvalues: Tensor) -> Tensor:
    """min_i (lambda_{i+1} - lambda_i) / lambda_max per graph."""
    scale = eigenvalues[:, -1].abs().clamp_min(torch.finfo(eigenvalues.dtype).tiny)
    return (eigenvalues[:, 1:] - eigenvalues[:, :-1]).min(dim=1).values / scale


class FrameAveraging(nn.Module):
    """Wrap `backbone` so its output is averaged over PCA frames of each graph.

    forward(pos, batch=None, vectors=(), num_graphs=None, **kwargs):
      pos (N, 3) points; batch (N,) graph index of each point (default: one graph);
      vectors: per-graph vector inputs (G, ..., 3) rotated with the frame but not
      translated (e.g. periodic cell vectors); kwargs go to the backbone unchanged.
      Pass `num_graphs` to avoid reading batch.max() back from the device.
    The backbone is called once, on every frame at once:
      backbone(pos_frames (F, N, 3), *vectors_frames (F, G, ..., 3), batch=batch, **kwargs)
    and returns a tensor with the frame dimension F first. "invariant" averages it
    over F; "equivariant" reads it as per-point vectors (F, N, ..., 3), rotates each
    back to the input's axes and averages.
    """

    def __init__(
        self, backbone: nn.Module, group: str = "E3", output: str = "invariant", tol: float = 1e-4
    ):
        super().__init__()
        if group not in GROUPS:
            raise ValueError(f"group={group!r} is not allowed; allowed: {', '.join(GROUPS)}")
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r} is not allowed; allowed: {', '.join(OUTPUTS)}")
        if not tol >= 0:
            raise ValueError(f"tol={tol!r} must be >= 0")
        self.backbone, self.group, self.output, self.tol = backbone, group, output, tol
        proper = group in ("SO3", "SE3")  # the 4 sign choices with det(S) = +1
        self.register_buffer("signs", SIGNS[SIGNS.prod(1) > 0] if proper else SIGNS, False)

    def frames(self, pos: Tensor, batch: Tensor, num_graphs: int) -> Frames:
        """The frame of every graph (no host synchronisation)."""
        counts = _segment_sum(torch.ones_like(pos[:, 0]), batch, num_graphs).clamp_min(1)
        centers = pos.new_zeros(num_graphs, 3)
        if self.group in ("E3", "SE3"):
            centers = _segment_sum(pos, batch, num_graphs) / counts[:, None]
        r = pos - centers[batch]
        outer = r[:, :, None] * r[:, None, :]
        cov = _segment_sum(outer, batch, num_graphs) / counts[:, None, None]
        quartic = _segment_sum(outer * (r * r).sum(1)[:, None, None], batch, num_graphs)
        flat = _relative_gap(torch.linalg.eigvalsh(cov.detach())) < self.tol
        # one eigh on the chosen matrix: no gradient flows through an unused, degenerate one
        lam, axes = torch.linalg.eigh(torch.where(flat[:, None, None], quartic, cov))
        if self.group in ("SO3", "SE3"):  # det(U) = +1, so that det(U S) = det(S) = +1
            axes = torch.cat(
                [axes[..., :2], axes[..., 2:] * torch.linalg.det(axes)[:, None, None]], -1
            )
        degenerate = _relative_gap(lam) < self.tol
        signs = self.signs.to(pos.dtype)
        return Frames(axes[:, None] * signs[None, :, None, :], centers, degenerate)

    def forward(
        self,
        pos: Tensor,
        batch: Tensor | None = None,
        vectors: Sequence[Tensor] = (),
        num_graphs: int | None = None,
        **kwargs,
    ) -> Tensor:
        if pos.dim() != 2 or pos.shape[1] != 3:
            raise ValueError(f"pos has shape {tuple(pos.shape)}; expected (N, 3)")
        if batch is None:
            batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
        if num_graphs is None:
            num_graphs = int(batch.max()) + 1 if batch.numel() else 0
        frame = self.frames(pos, batch, num_graphs)
        rot = frame.rotations.transpose(0, 1)  # (F, G, 3, 3)
        local = torch.einsum("ni,fnij->fnj", pos - frame.centers[batch], rot[:, batch])
        local_vectors = [torch.einsum("g...i,fgij->fg...j", v, rot) for v in vectors]
        out = self.backbone(local, *local_vectors, batch=batch, **kwargs)
        if self.output == "invariant":
            return out.mean(0)
        return torch.einsum("fn...j,fnij->n...i", out, rot[:, batch]) / out.shape[0]

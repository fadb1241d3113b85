"""A message-passing interatomic potential with three interchangeable backbones.

Energy E = scale * sum_i e_i + sum_i shift[Z_i]; forces F = -dE/dx by autograd
(`ForceField`: both from one forward pass).
Edges are periodic neighbour pairs (i, j, S) with r_ij = x_j - x_i + S @ cell.

"gaunt" / "e3nn": node features h (N, C, (L+1)^2) hold C channels of real SH
coefficients (e3nn's order). Each layer, as in NequIP / MACE:

    A_i = sum_j TP(h_j, R(|r_ij|)[c, l] Y_lm(r_ij)) / avg_neighbours
    B_i = A_i + products of A_i with itself up to `correlation` (many-body)
    h_i <- gate(W_l B_i + U_l h_i)           (per-degree channel mixing, gated)

with TP the Gaunt tensor product (`gradlane.layers.GauntTensorProduct`, per-degree
weights; many-body `GauntSelfProduct`) or, as the anchor, e3nn's Clebsch-Gordan
`TensorProduct` ("uuu", one weight per path and channel; many-body by chaining it)
on the same paths (l1 + l2 + l3 even). Everything else is shared code.

"frame_averaging": a plain message-passing network on Cartesian edge vectors
(not equivariant itself) wrapped in `gradlane.layers.FrameAveraging` (E(3), the
8 PCA frames of each structure; the cell rotates with the frame).

The large tensors are matrices with the channel count first (mixing weights
(C, L+1, C), MLP weights), which every comm hook compresses; the per-path and
per-degree weights are small.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gradlane.layers import FrameAveraging, GauntSelfProduct, GauntTensorProduct
from gradlane.layers.spherical import degrees, sh_dim

from .data import GraphBatch

BACKBONES = ("gaunt", "e3nn", "frame_averaging")
MAX_Z = 119


def cutoff_envelope(r: Tensor, cutoff: float, p: int = 6) -> Tensor:
    """Smooth polynomial envelope, 1 at 0 and 0 with two zero derivatives at the cutoff
    (Gasteiger, Gross, Guennemann, DimeNet, ICLR 2020, eq. 8)."""
    d = r / cutoff
    u = (
        1
        - (p + 1) * (p + 2) / 2 * d**p
        + p * (p + 2) * d ** (p + 1)
        - p * (p + 1) / 2 * d ** (p + 2)
    )
    return u * (d < 1)


class RadialBasis(nn.Module):
    """Bessel basis sqrt(2/rc) sin(n pi r / rc) / r, n = 1..count, times the envelope."""

    def __init__(self, count: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("freq", torch.arange(1, count + 1) * math.pi / cutoff, False)

    def forward(self, r: Tensor) -> Tensor:
        r = r[..., None]
        basis = math.sqrt(2 / self.cutoff) * torch.sin(self.freq * r) / r
        return basis * cutoff_envelope(r, self.cutoff)


def mlp(sizes: list[int], act: type[nn.Module] = nn.SiLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class ElementEmbedding(nn.Module):
    """Learned features of the elements the data holds, Z -> (C,): one row per element
    (an embedding over all 118 would be unused rows, and too wide for PowerSGD)."""

    def __init__(self, elements: list[int], channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(len(elements), channels))
        row = torch.full((MAX_Z,), len(elements))  # an element not in the list: IndexError
        row[torch.tensor(elements)] = torch.arange(len(elements))
        self.register_buffer("row", row, False)

    def forward(self, numbers: Tensor) -> Tensor:
        return self.weight[self.row[numbers]]


class DegreeLinear(nn.Module):
    """Channel mixing per degree: out[o, lm] = sum_c W[o, l, c] x[c, lm] (equivariant)."""

    def __init__(self, channels: int, lmax: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, lmax + 1, channels) / math.sqrt(channels))
        self.register_buffer("degree", degrees(lmax), False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("ncd,odc->nod", x, self.weight[:, self.degree])


class Gate(nn.Module):
    """SiLU on the scalars; each l > 0 block of channel c scaled by a sigmoid of the scalars."""

    def __init__(self, channels: int, lmax: int):
        super().__init__()
        self.lmax = lmax
        self.gates = nn.Linear(channels, channels * lmax)
        self.register_buffer("degree", degrees(lmax)[1:] - 1, False)

    def forward(self, x: Tensor) -> Tensor:
        scalars = x[..., 0]
        if self.lmax == 0:
            return nn.functional.silu(scalars)[..., None]
        gates = torch.sigmoid(self.gates(scalars)).view(*scalars.shape, self.lmax)
        rest = x[..., 1:] * gates[..., self.degree]
        return torch.cat([nn.functional.silu(scalars)[..., None], rest], -1)


class E3nnProduct(nn.Module):
    """e3nn's Clebsch-Gordan TensorProduct on our (..., C, (L+1)^2) layout: "uuu" on every
    path with l1 + l2 + l3 even, one learnable weight per path and channel."""

    def __init__(self, lmax1: int, lmax2: int, lmax_out: int, channels: int):
        super().__init__()
        from e3nn import o3

        def irreps(lmax: int):
            return o3.Irreps([(channels, (ell, (-1) ** ell)) for ell in range(lmax + 1)])

        paths = [
            (l1, l2, l3, "uuu", True)
            for l1 in range(lmax1 + 1)
            for l2 in range(lmax2 + 1)
            for l3 in range(abs(l1 - l2), min(l1 + l2, lmax_out) + 1)
            if (l1 + l2 + l3) % 2 == 0
        ]
        self.tp = o3.TensorProduct(irreps(lmax1), irreps(lmax2), irreps(lmax_out), paths)
        self.channels, self.lmax_out = channels, lmax_out
        for name, lmax in (("in1", lmax1), ("in2", lmax2), ("out", lmax_out)):
            self.register_buffer(f"perm_{name}", self._e3nn_order(channels, lmax), False)
        self.register_buffer("unperm_out", torch.argsort(self.perm_out), False)

    @staticmethod
    def _e3nn_order(channels: int, lmax: int) -> Tensor:
        """Index into our flattened (C, (L+1)^2) giving e3nn's (l, C, 2l+1) order."""
        d = sh_dim(lmax)
        return torch.cat(
            [
                (
                    torch.arange(channels)[:, None] * d + ell * ell + torch.arange(2 * ell + 1)
                ).flatten()
                for ell in range(lmax + 1)
            ]
        )

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        lead = x1.shape[:-2]
        a = x1.reshape(*lead, -1)[..., self.perm_in1]
        b = x2.reshape(*lead, -1)[..., self.perm_in2]
        out = self.tp(a, b)[..., self.unperm_out]
        return out.view(*lead, self.channels, sh_dim(self.lmax_out))


class ChainedSelfProduct(nn.Module):
    """B = A + P2(A, A) + P3(P2, A) + ...: many-body terms by chaining a two-input product."""

    def __init__(self, products: list[nn.Module]):
        super().__init__()
        self.products = nn.ModuleList(products)

    def forward(self, a: Tensor) -> Tensor:
        out, term = a, a
        for product in self.products:
            term = product(term, a)
            out = out + term
        return out


class EquivariantLayer(nn.Module):
    def __init__(self, backbone, channels, lmax, radial, radial_hidden, correlation, tp_backend):
        super().__init__()
        self.lmax, self.channels = lmax, channels
        self.radial = mlp([radial, radial_hidden, channels * (lmax + 1)])
        self.register_buffer("degree", degrees(lmax), False)
        if backbone == "gaunt":
            self.product = GauntTensorProduct(lmax, lmax, lmax, channels, backend=tp_backend)
            self.many_body = (
                GauntSelfProduct(lmax, lmax, correlation, channels, backend=tp_backend)
                if correlation > 1
                else nn.Identity()
            )
        else:
            self.product = E3nnProduct(lmax, lmax, lmax, channels)
            chain = [E3nnProduct(lmax, lmax, lmax, channels) for _ in range(correlation - 1)]
            self.many_body = ChainedSelfProduct(chain)
        self.mix = DegreeLinear(channels, lmax)
        self.self_mix = DegreeLinear(channels, lmax)
        self.gate = Gate(channels, lmax)

    def forward(self, h, edge_sh, edge_basis, src, dst, avg_neighbours):
        weights = self.radial(edge_basis).view(-1, self.channels, self.lmax + 1)
        x2 = weights[..., self.degree] * edge_sh[:, None, :]
        messages = self.product(h[dst], x2)
        a = messages.new_zeros(h.shape).index_add_(0, src, messages) / avg_neighbours
        return self.gate(self.mix(self.many_body(a)) + self.self_mix(h))


class EquivariantPotential(nn.Module):
    """The "gaunt" and "e3nn" backbones: model(batch) -> energies (G,)."""

    def __init__(
        self,
        backbone: str,
        elements: list[int],
        channels: int,
        lmax: int,
        layers: int,
        cutoff: float,
        radial: int,
        radial_hidden: int,
        readout_hidden: int,
        correlation: int,
        tp_backend: str = "auto",
    ):
        super().__init__()
        self.lmax, self.channels = lmax, channels
        self.embed = ElementEmbedding(elements, channels)
        self.basis = RadialBasis(radial, cutoff)
        self.layers = nn.ModuleList(
            EquivariantLayer(
                backbone, channels, lmax, radial, radial_hidden, correlation, tp_backend
            )
            for _ in range(layers)
        )
        self.readout = mlp([channels, readout_hidden, 1])
        self.register_buffer("avg_neighbours", torch.ones(()))
        add_energy_statistics(self)

    def forward(self, batch: GraphBatch) -> Tensor:
        from e3nn import o3

        vec = edge_vectors(batch.positions, batch.cells, batch)
        edge_sh = o3.spherical_harmonics(
            list(range(self.lmax + 1)), vec, normalize=True, normalization="component"
        )
        basis = self.basis(vec.norm(dim=-1))
        h = vec.new_zeros(batch.positions.shape[0], self.channels, sh_dim(self.lmax))
        h[:, :, 0] = self.embed(batch.numbers)
        for layer in self.layers:
            h = layer(h, edge_sh, basis, batch.src, batch.dst, self.avg_neighbours)
        atom_energy = self.readout(h[:, :, 0]).squeeze(-1) * self.energy_scale
        atom_energy = atom_energy + self.energy_shift[batch.numbers]
        return atom_energy.new_zeros(batch.num_graphs).index_add_(0, batch.batch, atom_energy)


def edge_vectors(positions: Tensor, cells: Tensor, batch: GraphBatch) -> Tensor:
    """r_ij = x_j - x_i + S @ cell for every edge; positions and cells may carry a leading
    frame dimension (F, N, 3) / (F, G, 3, 3)."""
    shift = torch.einsum("ek,...ekj->...ej", batch.shifts, cells[..., batch.batch[batch.src], :, :])
    return positions[..., batch.dst, :] - positions[..., batch.src, :] + shift


class PlainMessagePassing(nn.Module):
    """Cartesian message passing (not equivariant): messages from [h_j, basis(r), r / |r|]."""

    def __init__(self, elements, channels, layers, cutoff, radial, radial_hidden, readout_hidden):
        super().__init__()
        self.embed = ElementEmbedding(elements, channels)
        self.basis = RadialBasis(radial, cutoff)
        self.messages = nn.ModuleList(
            mlp([channels + radial + 3, radial_hidden, channels]) for _ in range(layers)
        )
        self.updates = nn.ModuleList(mlp([2 * channels, channels, channels]) for _ in range(layers))
        self.readout = mlp([channels, readout_hidden, 1])
        self.register_buffer("avg_neighbours", torch.ones(()))

    def forward(self, positions, cells, batch, graph: GraphBatch) -> Tensor:
        """positions (F, N, 3), cells (F, G, 3, 3) -> atom energies summed per graph (F, G)."""
        vec = edge_vectors(positions, cells, graph)
        r = vec.norm(dim=-1, keepdim=True)
        basis = self.basis(r[..., 0])
        h = self.embed(graph.numbers).expand(positions.shape[0], -1, -1)
        for message, update in zip(self.messages, self.updates, strict=True):
            m = message(torch.cat([h[:, graph.dst], basis, vec / r], -1))
            agg = m.new_zeros(h.shape).index_add_(1, graph.src, m) / self.avg_neighbours
            h = h + update(torch.cat([h, agg], -1))
        atom_energy = self.readout(h).squeeze(-1)
        return atom_energy.new_zeros(atom_energy.shape[0], graph.num_graphs).index_add_(
            1, batch, atom_energy
        )


class FramePotential(nn.Module):
    """The "frame_averaging" backbone: PlainMessagePassing averaged over E(3) PCA frames."""

    def __init__(self, elements, channels, layers, cutoff, radial, radial_hidden, readout_hidden):
        super().__init__()
        plain = PlainMessagePassing(
            elements, channels, layers, cutoff, radial, radial_hidden, readout_hidden
        )
        self.frames = FrameAveraging(plain, group="E3", output="invariant")
        add_energy_statistics(self)

    def forward(self, batch: GraphBatch) -> Tensor:
        energy = self.frames(
            batch.positions,
            batch.batch,
            vectors=(batch.cells,),
            num_graphs=batch.num_graphs,
            graph=batch,
        )
        shift = batch.positions.new_zeros(batch.num_graphs).index_add_(
            0, batch.batch, self.energy_shift[batch.numbers]
        )
        return energy * self.energy_scale + shift


def add_energy_statistics(model: nn.Module) -> None:
    """Buffers (saved with the model) set from the training data by `set_statistics`."""
    model.register_buffer("energy_shift", torch.zeros(MAX_Z))  # eV per atom, by element
    model.register_buffer("energy_scale", torch.ones(()))  # eV


def set_statistics(model: nn.Module, shift: Tensor, scale: float, avg_neighbours: float) -> None:
    """Per-element energy shift, energy scale and mean neighbour count, from training data."""
    model.energy_shift.copy_(shift)
    model.energy_scale.fill_(scale)
    for module in model.modules():
        if hasattr(module, "avg_neighbours"):
            module.avg_neighbours.fill_(avg_neighbours)


def build_model(backbone: str, elements: list[int], **kwargs) -> nn.Module:
    """The potential for `backbone` (one of BACKBONES) over atoms of `elements` (Z)."""
    if backbone == "frame_averaging":
        for key in ("lmax", "correlation", "tp_backend"):
            kwargs.pop(key, None)
        return FramePotential(elements, **kwargs)
    return EquivariantPotential(backbone, elements, **kwargs)


def energy_and_forces(model: nn.Module, batch: GraphBatch, create_graph: bool):
    """(energies (G,), forces (N, 3) = -dE/dx)."""
    positions = batch.positions.detach().requires_grad_(True)
    batch = GraphBatch(**{**vars(batch), "positions": positions})
    energy = model(batch)
    (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph)
    return energy, -grad


class ForceField(nn.Module):
    """A potential's energies and forces F = -dE/dx from one forward pass.

    The derivative is taken inside `forward`, so a training loss is a plain function of
    the outputs: engines that hook a forward's outputs (DeepSpeed starts its backward
    bookkeeping there and rescales their gradients) see the loss's backward only, never
    the force derivative, on any engine and ZeRO stage. Training needs `create_graph`
    (the loss differentiates the forces again); evaluation does not."""

    def __init__(self, potential: nn.Module):
        super().__init__()
        self.potential = potential

    def forward(self, batch: GraphBatch, create_graph: bool = True) -> tuple[Tensor, Tensor]:
        return energy_and_forces(self.potential, batch, create_graph)

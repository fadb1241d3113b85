"""Radiance fields of four architectures behind one interface, in plain PyTorch.

A field maps positions x in [-bound, bound]^3 and unit view directions d to a
log density, a colour and (where the architecture has one) an intermediate
representation that progressive volume distillation matches first (Fang et
al., "One is All: Bridging the Gap Between Neural Radiance Fields
Architectures with Progressive Volume Distillation", AAAI 2023):

    mlp       positional encoding + MLP (Mildenhall et al., NeRF, ECCV 2020)
    hash      multiresolution hash grid + small MLP (Mueller et al., Instant-NGP, 2022)
    tensorf   vector-matrix decomposition + basis matrix (Chen et al., TensoRF, ECCV 2022)
    plenoxel  dense voxel grid of density and SH colour (Fridovich-Keil et al., 2022)

The first three compute a geometry vector h = [raw density, geometry feature]
(1 + geo_feat_dim values, the stage-1 representation) and share a colour head
MLP(SH(d), feature) -> sigmoid. Density is a truncated exp as in PVD:
sigma = exp(clamp(raw, -2, 7)), so distillation can match densities in log space.
"""

from __future__ import annotations

import inspect
import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_DENSITY_RANGE = (-2.0, 7.0)  # PVD's clamp of the density pre-activation


class _ClampLogDensity(torch.autograd.Function):
    """clamp(raw, lo, hi) whose gradient still flows where it would move a clamped
    value back into [lo, hi] (so no voxel or weight is stuck at the floor)."""

    @staticmethod
    def forward(ctx, raw: Tensor, lo: float, hi: float) -> Tensor:
        ctx.save_for_backward(raw)
        ctx.lo, ctx.hi = lo, hi
        return raw.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (raw,) = ctx.saved_tensors
        blocked = ((raw < ctx.lo) & (grad > 0)) | ((raw > ctx.hi) & (grad < 0))
        return grad.masked_fill(blocked, 0.0), None, None


def clamp_log_density(raw: Tensor) -> Tensor:
    """The density pre-activation clamped to LOG_DENSITY_RANGE (log of the density)."""
    return _ClampLogDensity.apply(raw, *LOG_DENSITY_RANGE)


_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
          0.5462742152960396)  # fmt: skip
_SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
          -0.4570457994644658, 1.445305721320277, -0.5900435899266435)  # fmt: skip


def sh_basis(d: Tensor, degree: int) -> Tensor:
    """Real spherical harmonics of unit vectors d (N, 3), bands 0..degree-1 (degree 1-4),
    orthonormal on the sphere; (N, degree^2). The graphics convention of Plenoxels."""
    if not 1 <= degree <= 4:
        raise ValueError(f"sh degree={degree} must be in 1..4")
    x, y, z = d.unbind(-1)
    out = [torch.full_like(x, _SH_C0)]
    if degree > 1:
        out += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree > 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [_SH_C2[0] * x * y, _SH_C2[1] * y * z, _SH_C2[2] * (2 * zz - xx - yy),
                _SH_C2[3] * x * z, _SH_C2[4] * (xx - yy)]  # fmt: skip
    if degree > 3:
        out += [_SH_C3[0] * y * (3 * xx - yy), _SH_C3[1] * x * y * z,
                _SH_C3[2] * y * (4 * zz - xx - yy), _SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
                _SH_C3[4] * x * (4 * zz - xx - yy), _SH_C3[5] * z * (xx - yy),
                _SH_C3[6] * x * (xx - 3 * yy)]  # fmt: skip
    return torch.stack(out, -1)


class FieldOutput(NamedTuple):
    """Per point: log density (N,), colour (N, 3) in (0, 1), and the stage-1
    representation (N, 1 + geo_feat_dim) or None where the field has none."""

    log_density: Tensor
    rgb: Tensor
    feature: Tensor | None


class RadianceField(nn.Module):
    """Base class: positions in [-bound, bound]^3 are scaled to [-1, 1]^3."""

    arch = ""
    feature_dim = 0  # width of the stage-1 representation (0: none)

    def __init__(self, bound: float):
        super().__init__()
        if bound <= 0:
            raise ValueError(f"bound={bound} must be > 0")
        self.bound = float(bound)

    def forward(self, x: Tensor, d: Tensor) -> FieldOutput:
        raise NotImplementedError

    def log_density(self, x: Tensor) -> Tensor:
        """Clamped log density at x (N,), without the colour."""
        raise NotImplementedError

    def density(self, x: Tensor) -> Tensor:
        return torch.exp(self.log_density(x))


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _GeometryField(RadianceField):
    """A field whose geometry part gives h = [raw density, feature] and whose colour
    comes from the shared head MLP(SH(d) (16 values), feature) -> sigmoid."""

    def __init__(self, bound: float, geo_feat_dim: int, color_hidden: int = 64):
        super().__init__(bound)
        if geo_feat_dim < 1 or color_hidden < 1:
            raise ValueError(
                f"geo_feat_dim={geo_feat_dim} and color_hidden={color_hidden} must be >= 1"
            )
        self.feature_dim = 1 + geo_feat_dim
        self.color_head = _mlp([16 + geo_feat_dim, color_hidden, color_hidden, 3])

    def geometry(self, x: Tensor) -> Tensor:
        """h = [raw density, geometry feature] (N, feature_dim) at x in [-1, 1]^3."""
        raise NotImplementedError

    def forward(self, x: Tensor, d: Tensor) -> FieldOutput:
        h = self.geometry(x / self.bound)
        log_density = clamp_log_density(h[:, 0])
        rgb = torch.sigmoid(self.color_head(torch.cat([sh_basis(d, 4), h[:, 1:]], -1)))
        return FieldOutput(log_density, rgb, torch.cat([log_density[:, None], h[:, 1:]], -1))

    def log_density(self, x: Tensor) -> Tensor:
        return clamp_log_density(self.geometry(x / self.bound)[:, 0])


class MLPField(_GeometryField):
    """NeRF: [x, sin(2^k pi x), cos(2^k pi x)]_{k<freqs} -> `depth` ReLU layers of
    `width` (the encoding re-enters at layer `skip`, 0: nowhere) -> h."""

    arch = "mlp"

    def __init__(self, bound: float, geo_feat_dim: int = 15, width: int = 64, depth: int = 4,
                 freqs: int = 8, skip: int = 2, color_hidden: int = 64):  # fmt: skip
        super().__init__(bound, geo_feat_dim, color_hidden)
        if width < 1 or depth < 1 or freqs < 0:
            raise ValueError(f"mlp.width={width}, mlp.depth={depth} (>= 1), mlp.freqs={freqs} "
                             "(>= 0): out of range")  # fmt: skip
        if not 0 <= skip < depth:
            raise ValueError(f"mlp.skip={skip} must be in [0, mlp.depth={depth}) (0: no skip)")
        self.freqs, self.skip = freqs, skip
        enc = 3 + 6 * freqs
        sizes = [enc] + [width + (enc if i == skip else 0) for i in range(1, depth)]
        self.layers = nn.ModuleList(nn.Linear(n, width) for n in sizes)
        self.out = nn.Linear(width, self.feature_dim)

    def encode(self, x: Tensor) -> Tensor:
        scales = (2.0 ** torch.arange(self.freqs, device=x.device, dtype=x.dtype)) * math.pi
        angles = (x[:, None, :] * scales[:, None]).flatten(1)
        return torch.cat([x, torch.sin(angles), torch.cos(angles)], -1)

    def geometry(self, x: Tensor) -> Tensor:
        enc = self.encode(x)
        h = enc
        for i, layer in enumerate(self.layers):
            if i == self.skip and i > 0:
                h = torch.cat([h, enc], -1)
            h = F.relu(layer(h))
        return self.out(h)


_HASH_PRIMES = (1, 2654435761, 805459861)  # Instant-NGP's spatial hash


class HashField(_GeometryField):
    """Instant-NGP: `levels` grids with resolutions growing geometrically from
    `base_resolution` to `max_resolution`, `features` values per vertex,
    trilinear interpolation. A level whose (N_l + 1)^3 vertices fit in
    2^`table_log2` entries is indexed densely, a finer one through the hash
    (x * 1) xor (y * 2654435761) xor (z * 805459861) mod 2^table_log2.
    The concatenated level features go through a `hidden`-wide MLP to h."""

    arch = "hash"

    def __init__(self, bound: float, geo_feat_dim: int = 15, levels: int = 12,
                 features: int = 2, table_log2: int = 15, base_resolution: int = 16,
                 max_resolution: int = 256, hidden: int = 64, color_hidden: int = 64):  # fmt: skip
        super().__init__(bound, geo_feat_dim, color_hidden)
        if levels < 1 or features < 1 or hidden < 1 or not 4 <= table_log2 <= 26:
            raise ValueError(
                f"hash.levels={levels}, hash.features={features}, hash.hidden={hidden} (>= 1), "
                f"hash.table_log2={table_log2} (4-26): out of range"
            )
        if not 1 <= base_resolution <= max_resolution:
            raise ValueError(
                f"hash.base_resolution={base_resolution} must be in [1, hash.max_resolution="
                f"{max_resolution}]"
            )
        growth = math.exp(math.log(max_resolution / base_resolution) / max(levels - 1, 1))
        res = [math.floor(base_resolution * growth**level) for level in range(levels)]
        table = 1 << table_log2
        sizes = [min((r + 1) ** 3, table) for r in res]
        self.register_buffer("resolutions", torch.tensor(res), persistent=False)
        self.register_buffer("dense", torch.tensor([(r + 1) ** 3 <= table for r in res]),
                             persistent=False)  # fmt: skip
        side = torch.tensor(res) + 1
        dense_strides = torch.stack([torch.ones_like(side), side, side * side])  # (3, L)
        primes = torch.tensor(_HASH_PRIMES)[:, None].expand(3, levels)
        self.register_buffer("strides", torch.where(self.dense, dense_strides, primes),
                             persistent=False)  # fmt: skip
        offsets = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.table_log2, self.table_mask = table_log2, table - 1
        self.dense_levels = sum((r + 1) ** 3 <= table for r in res)
        self.table = nn.Parameter(torch.empty(sum(sizes), features).uniform_(-1e-4, 1e-4))
        self.mlp = _mlp([levels * features, hidden, self.feature_dim])

    def encode(self, x: Tensor) -> Tensor:
        """Concatenated interpolated features of every level, (N, levels * features)."""
        res = self.resolutions
        pos = ((x.t() + 1) / 2).clamp(0, 1)[:, :, None] * res  # (3, N, L)
        base = torch.minimum(pos.floor(), res - 1)
        frac = pos - base
        # per axis and corner side (0 or 1): the vertex coordinate times the axis'
        # stride (dense levels) or prime (hashed levels), reduced mod the table size:
        # (a ^ b ^ c) mod 2^T = (a mod 2^T) ^ (b mod 2^T) ^ (c mod 2^T)
        vertex = base.long()[:, None] + torch.arange(2, device=x.device)[:, None, None]
        terms = ((vertex * self.strides[:, None, None, :]) & self.table_mask).int()
        k = self.dense_levels  # the coarse levels are the dense ones
        weights, index = [], []
        for cx, cy, cz in itertools.product((0, 1), repeat=3):
            tx, ty, tz = terms[0, cx], terms[1, cy], terms[2, cz]  # (N, L) each
            dense = tx[:, :k] + ty[:, :k] + tz[:, :k]
            hashed = tx[:, k:] ^ ty[:, k:] ^ tz[:, k:]
            index.append(torch.cat([dense, hashed], 1))
            wx, wy, wz = (f if c else 1 - f for f, c in zip(frac, (cx, cy, cz), strict=True))
            weights.append(wx * wy * wz)
        index = torch.stack(index) + self.offsets.int()  # (8, N, L)
        width = self.table.shape[1]
        feats = self.table.index_select(0, index.flatten()).view(*index.shape, width)
        return (torch.stack(weights)[..., None] * feats).sum(0).flatten(1)

    def geometry(self, x: Tensor) -> Tensor:
        return self.mlp(self.encode(x))


class TensoRFField(_GeometryField):
    """TensoRF VM: for each axis pair (xy, xz, yz) a plane of `rank` components at
    `resolution`^2 and a line along the remaining axis. Density is the sum of
    plane * line products over `density_rank` components; the colour feature
    is a bias-free linear map of the 3 * `color_rank` products."""

    arch = "tensorf"
    PLANES = ((0, 1), (0, 2), (1, 2))
    LINES = (2, 1, 0)

    def __init__(self, bound: float, geo_feat_dim: int = 15, resolution: int = 64,
                 density_rank: int = 8, color_rank: int = 16, init_scale: float = 0.1,
                 color_hidden: int = 64):  # fmt: skip
        super().__init__(bound, geo_feat_dim, color_hidden)
        if resolution < 2 or density_rank < 1 or color_rank < 1:
            raise ValueError(
                f"tensorf.resolution={resolution} (>= 2), tensorf.density_rank={density_rank}, "
                f"tensorf.color_rank={color_rank} (>= 1): out of range"
            )
        rank = density_rank + color_rank
        self.density_rank = density_rank
        self.planes = nn.Parameter(init_scale * torch.randn(3, rank, resolution, resolution))
        self.lines = nn.Parameter(init_scale * torch.randn(3, rank, resolution, 1))
        self.basis = nn.Linear(3 * color_rank, geo_feat_dim, bias=False)

    def geometry(self, x: Tensor) -> Tensor:
        plane_xy = torch.stack([x[:, list(p)] for p in self.PLANES])[:, :, None, :]  # (3,N,1,2)
        line_t = torch.stack([x[:, a] for a in self.LINES])
        line_xy = torch.stack([torch.zeros_like(line_t), line_t], -1)[:, :, None, :]
        planes = F.grid_sample(self.planes, plane_xy, align_corners=True)[..., 0]  # (3, R, N)
        lines = F.grid_sample(self.lines, line_xy, align_corners=True)[..., 0]
        prod = planes * lines
        raw = prod[:, : self.density_rank].sum((0, 1))
        color = prod[:, self.density_rank :].flatten(0, 1).t()
        return torch.cat([raw[:, None], self.basis(color)], -1)


class PlenoxelField(RadianceField):
    """Plenoxels: a dense `resolution`^3 grid holding a raw density and
    3 * `sh_degree`^2 SH coefficients per voxel, trilinearly interpolated;
    colour = sigmoid(sum_k c_k Y_k(d)). No stage-1 representation."""

    arch = "plenoxel"

    def __init__(self, bound: float, resolution: int = 48, sh_degree: int = 2):
        super().__init__(bound)
        if resolution < 2 or not 1 <= sh_degree <= 4:
            raise ValueError(
                f"plenoxel.resolution={resolution} (>= 2), plenoxel.sh_degree={sh_degree} (1-4): "
                "out of range"
            )
        self.sh_degree = sh_degree
        self.grid = nn.Parameter(torch.zeros(1, 1 + 3 * sh_degree**2, *(resolution,) * 3))

    def _sample(self, x: Tensor, channels: slice) -> Tensor:
        coords = (x / self.bound)[None, :, None, None, :]  # grid_sample reads (x, y, z)
        return F.grid_sample(self.grid[:, channels], coords, align_corners=True)[0, :, :, 0, 0].t()

    def forward(self, x: Tensor, d: Tensor) -> FieldOutput:
        v = self._sample(x, slice(None))
        sh = v[:, 1:].reshape(len(x), 3, self.sh_degree**2)
        rgb = torch.sigmoid((sh * sh_basis(d, self.sh_degree)[:, None, :]).sum(-1))
        return FieldOutput(clamp_log_density(v[:, 0]), rgb, None)

    def log_density(self, x: Tensor) -> Tensor:
        return clamp_log_density(self._sample(x, slice(0, 1))[:, 0])

    @torch.no_grad()
    def upsample(self, resolution: int) -> None:
        """Resample the grid trilinearly to `resolution`^3 (a new parameter: rebuild the
        optimizer). Where resolution - 1 is a multiple of the old resolution - 1 every
        old voxel is a new one, and the field is unchanged everywhere."""
        if resolution < 2:
            raise ValueError(f"plenoxel.resolution={resolution} (>= 2): out of range")
        size = (resolution,) * 3
        grid = F.interpolate(self.grid, size=size, mode="trilinear", align_corners=True)
        self.grid = nn.Parameter(grid)


FIELDS: dict[str, type[RadianceField]] = {
    f.arch: f for f in (MLPField, HashField, TensoRFField, PlenoxelField)
}


def build_field(arch: str, bound: float, geo_feat_dim: int = 15, **settings) -> RadianceField:
    """A field of architecture `arch` (a key of FIELDS) with its own `settings`.

    `geo_feat_dim` sizes the stage-1 representation of mlp, hash and tensorf
    (plenoxel has none and ignores it). Unknown names or settings raise ValueError.
    """
    if arch not in FIELDS:
        raise ValueError(f"unknown field {arch!r}; allowed: {', '.join(sorted(FIELDS))}")
    cls = FIELDS[arch]
    params = inspect.signature(cls).parameters
    for key, value in settings.items():
        if key not in params or key in ("bound", "geo_feat_dim"):
            allowed = sorted(set(params) - {"bound", "geo_feat_dim"})
            raise ValueError(f"{arch} field has no setting {key!r}; allowed: {', '.join(allowed)}")
        default = params[key].default
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (isinstance(default, int) and not isinstance(value, int)):
            kind = "an integer" if isinstance(default, int) else "a number"
            raise ValueError(f"{arch}.{key}={value!r} must be {kind}")
    kwargs = dict(settings)
    if issubclass(cls, _GeometryField):
        kwargs["geo_feat_dim"] = geo_feat_dim
    return cls(bound, **kwargs)

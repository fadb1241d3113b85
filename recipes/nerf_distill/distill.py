"""Training a field from images and progressive volume distillation between fields.

Progressive volume distillation (Fang et al., AAAI 2023): the student is
queried at the teacher's sample points along rays from random poses around
the scene (not only the training views), and its loss grows in stages:

    stage 1  || h_s - h_t ||^2                          the stage-1 representations
    stage 2  + w_density || log sigma_s - log sigma_t ||^2 + w_color || c_s - c_t ||^2_w
    stage 3  + w_rgb || C_s - C_t ||^2                   the rendered pixel colours

Log densities are the clamped pre-activations (clamp to [-2, 7]). Colours are
compared where they show: each sample weighted by its share T_i alpha_i of the
teacher's pixel (our choice; the paper weighs all samples alike, which spends
the student's capacity on colours in free space). Stage 1 needs both fields to
have a representation of one width; when one has none (plenoxel) training
starts at stage 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradlane.layers import (
    FieldOutput,
    OccupancyGrid,
    PlenoxelField,
    RadianceField,
    blend_weights,
    camera_rays,
    composite,
    psnr,
    scatter_valid,
    ssim,
    stratified_samples,
)

from .data import Views


@dataclass
class RenderSettings:
    """Scene box half-size, samples per ray, background colour and occupancy grid."""

    bound: float
    n_samples: int
    background: Tensor
    grid: OccupancyGrid


@dataclass
class LossWeights:
    """Weights of the stage-2 and stage-3 terms (stage 1 has weight 1)."""

    feature: float = 1.0
    density: float = 0.01
    color: float = 1.0
    rgb: float = 1.0


@dataclass
class Rays:
    origins: Tensor
    dirs: Tensor
    target: Tensor | None = None  # ground-truth colours, for training from images


def image_rays(views: Views, n_rays: int, generator: torch.Generator) -> Rays:
    """`n_rays` random pixels of random training views, with their colours."""
    device = views.images.device
    index = torch.randint(len(views), (n_rays,), generator=generator).to(device)
    pixel = torch.randint(views.height * views.width, (n_rays,), generator=generator).to(device)
    c2w = views.c2w[index]
    origins, dirs = camera_rays(c2w, views.height, views.width, views.focal, pixel[:, None])
    return Rays(origins, dirs, views.images.flatten(1, 2)[index, pixel])


def random_pose_rays(views: Views, n_rays: int, generator: torch.Generator) -> Rays:
    """One ray through a random pixel of each of `n_rays` random cameras around the scene.

    Camera centres are drawn uniformly over the directions whose elevation lies
    in the training cameras' range, at a radius within theirs; each camera
    looks at the origin (up: +z) with the training views' intrinsics.
    """
    centers = views.c2w[:, :3, 3].double().cpu()
    radius = centers.norm(dim=-1)
    sin_elev = (centers[:, 2] / radius).clamp(-1, 1)
    u = torch.rand(n_rays, 3, generator=generator, dtype=torch.float64)
    r = radius.min() + u[:, 0] * (radius.max() - radius.min())
    z = sin_elev.min() + u[:, 1] * (sin_elev.max() - sin_elev.min())
    phi = 2 * math.pi * u[:, 2]
    ring = (1 - z * z).clamp(min=0).sqrt()
    position = r[:, None] * torch.stack([ring * phi.cos(), ring * phi.sin(), z], -1)
    forward = F.normalize(-position, dim=-1)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(forward)
    right = F.normalize(torch.linalg.cross(forward, up, dim=-1), dim=-1)
    c2w = torch.eye(4, dtype=torch.float64).repeat(n_rays, 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1] = right, torch.linalg.cross(right, forward, dim=-1)
    c2w[:, :3, 2], c2w[:, :3, 3] = -forward, position
    pixel = torch.randint(views.height * views.width, (n_rays, 1), generator=generator)
    c2w = c2w.to(views.c2w)
    return Rays(*camera_rays(c2w, views.height, views.width, views.focal, pixel.to(c2w.device)))


@dataclass
class Rendered:
    """Pixel colours and opacities of rays, and the field's outputs at the valid samples."""

    rgb: Tensor
    opacity: Tensor
    valid: Tensor
    outputs: tuple = field(repr=False, default=())


def render_rays(
    model: nn.Module,
    rays: Rays,
    settings: RenderSettings,
    generator: torch.Generator | None = None,
    points: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> Rendered:
    """Volume-render `rays` through `model` (a field, possibly DDP-wrapped).

    Samples in cells the occupancy grid marks empty are skipped. `points`
    (valid mask, positions, directions, deltas) reuses another field's samples.
    """
    if points is None:
        samples = stratified_samples(
            rays.origins, rays.dirs, settings.bound, settings.n_samples, generator
        )
        valid = settings.grid.occupied(samples.points)
        points = (valid, samples.points[valid], samples.dirs[valid], samples.deltas)
    valid, x, d, deltas = points
    out = model(x, d)
    density = scatter_valid(torch.exp(out.log_density), valid)
    rgb, opacity = composite(density, scatter_valid(out.rgb, valid), deltas, settings.background)
    return Rendered(rgb, opacity, valid, (out, points))


def photometric_loss(model: nn.Module, rays: Rays, settings: RenderSettings, generator) -> Tensor:
    """Mean squared error between rendered and ground-truth pixel colours."""
    return F.mse_loss(render_rays(model, rays, settings, generator).rgb, rays.target)


def _mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared error; zero (with a gradient path) when there are no samples."""
    return F.mse_loss(a, b) if a.numel() else (a * 0).sum()


def first_stage(teacher: RadianceField, student: RadianceField) -> int:
    """1 when both fields have stage-1 representations of one width, else 2."""
    both = teacher.feature_dim and teacher.feature_dim == student.feature_dim
    return 1 if both else 2


@dataclass
class TeacherTargets:
    """The frozen teacher along a batch of rays: the valid-sample mask (R, S), the valid
    samples' positions, directions and the deltas (R, S), the teacher's outputs there,
    each sample's blending weight T_i alpha_i and the rendered pixel colours (R, 3)."""

    valid: Tensor
    x: Tensor
    d: Tensor
    deltas: Tensor
    out: FieldOutput
    share: Tensor
    rgb: Tensor

    @cached_property
    def sample_index(self) -> Tensor:
        """(R, S): where each valid sample's values sit in the ray-major compacted
        tensors (x, d, out, share): the number of valid samples before it."""
        return self.valid.flatten().cumsum(0).view_as(self.valid) - 1

    def select(self, rays: Tensor) -> TeacherTargets:
        """The targets of the rays with indices `rays` (1-D), in that order."""
        valid = self.valid[rays]
        index = self.sample_index[rays][valid]
        f = self.out.feature
        out = FieldOutput(self.out.log_density[index], self.out.rgb[index],
                          None if f is None else f[index])  # fmt: skip
        return TeacherTargets(valid, self.x[index], self.d[index], self.deltas[rays], out,
                              self.share[index], self.rgb[rays])  # fmt: skip


@torch.no_grad()
def teacher_targets(
    teacher: RadianceField,
    rays: Rays,
    settings: RenderSettings,
    generator: torch.Generator | None = None,
    chunk: int = 4096,
) -> TeacherTargets:
    """Render `rays` (in chunks of `chunk` rays) through the frozen `teacher` and keep
    what distillation compares against."""
    parts = []
    for o, d in zip(rays.origins.split(chunk), rays.dirs.split(chunk), strict=True):
        taught = render_rays(teacher, Rays(o, d), settings, generator)
        out, (valid, x, dirs, deltas) = taught.outputs
        share = blend_weights(scatter_valid(torch.exp(out.log_density), valid), deltas)[valid]
        parts.append(TeacherTargets(valid, x, dirs, deltas, out, share, taught.rgb))
    if len(parts) == 1:
        return parts[0]
    f = parts[0].out.feature
    out = FieldOutput(*(torch.cat([p.out[i] for p in parts]) for i in range(2)),
                      None if f is None else torch.cat([p.out.feature for p in parts]))  # fmt: skip
    return TeacherTargets(
        *(torch.cat([getattr(p, k) for p in parts]) for k in ("valid", "x", "d", "deltas")),
        out, *(torch.cat([getattr(p, k) for p in parts]) for k in ("share", "rgb")),
    )  # fmt: skip


class TeacherPool:
    """Teacher targets computed once for `pool_rays` random-pose rays and reused: each
    `batch` draws `n_rays` of them at random, and the pool is drawn anew after every
    `refresh` batches, so the teacher costs 1/`reuse` of a fresh evaluation per step
    where reuse = refresh * n_rays / pool_rays (the number of times a ray is used)."""

    def __init__(self, teacher: RadianceField, views: Views, settings: RenderSettings,
                 pool_rays: int, refresh: int, generator: torch.Generator):  # fmt: skip
        self.teacher, self.views, self.settings = teacher, views, settings
        self.pool_rays, self.refresh, self.generator = pool_rays, refresh, generator
        self.used, self.targets = refresh, None

    def batch(self, n_rays: int) -> TeacherTargets:
        if self.used == self.refresh:
            rays = random_pose_rays(self.views, self.pool_rays, self.generator)
            self.targets = teacher_targets(self.teacher, rays, self.settings, self.generator)
            self.used = 0
        self.used += 1
        pick = torch.randperm(self.pool_rays, generator=self.generator)[:n_rays]
        return self.targets.select(pick.to(self.targets.valid.device))


def distill_loss(
    student: nn.Module,
    taught: TeacherTargets,
    settings: RenderSettings,
    stage: int,
    weights: LossWeights,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The stage-`stage` PVD loss of `student` (possibly DDP-wrapped) against the frozen
    teacher's targets `taught`; returns (loss, its terms)."""
    t_out, valid, deltas = taught.out, taught.valid, taught.deltas
    share = taught.share / taught.share.sum().clamp(min=1e-6)
    s_out = student(taught.x, taught.d)
    # Stage 1 keeps the density and colour terms at weight 0, so that every parameter
    # gets a gradient in every step (what DDP's reduction expects).
    later = 1.0 if stage >= 2 else 0.0
    terms: dict[str, Tensor] = {}
    if s_out.feature is not None and t_out.feature is not None:
        terms["feature"] = weights.feature * _mse(s_out.feature, t_out.feature)
    terms["density"] = later * weights.density * _mse(s_out.log_density, t_out.log_density)
    color_error = (s_out.rgb - t_out.rgb).square().mean(-1)
    terms["color"] = later * weights.color * (share * color_error).sum()
    if stage >= 3:
        density = scatter_valid(torch.exp(s_out.log_density), valid)
        rgb, _ = composite(density, scatter_valid(s_out.rgb, valid), deltas, settings.background)
        terms["rgb"] = weights.rgb * F.mse_loss(rgb, taught.rgb)
    return sum(terms.values()), terms


def stage_at(step: int, stage_ends: tuple[int, int], first: int) -> int:
    """The distillation stage of `step`: 1 before stage_ends[0], 2 before stage_ends[1], else 3."""
    stage = 1 if step < stage_ends[0] else 2 if step < stage_ends[1] else 3
    return max(stage, first)


@torch.no_grad()
def render_image(
    model: nn.Module, c2w: Tensor, views: Views, settings: RenderSettings, chunk: int = 4096
) -> Tensor:
    """The (H, W, 3) image of `model` seen from camera `c2w` (bin-centre samples)."""
    origins, dirs = camera_rays(c2w, views.height, views.width, views.focal)
    rgb = [
        render_rays(model, Rays(o, d), settings).rgb
        for o, d in zip(origins.split(chunk), dirs.split(chunk), strict=True)
    ]
    return torch.cat(rgb).reshape(views.height, views.width, 3)


def image_scores(image: Tensor, target: Tensor) -> dict[str, float]:
    """PSNR and SSIM of a rendered (H, W, 3) image (clamped to [0, 1]) against `target`."""
    image = image.clamp(0, 1)
    return {"psnr": psnr(image, target).item(), "ssim": ssim(image, target).item()}


@torch.no_grad()
def evaluate_views(
    model: nn.Module, views: Views, settings: RenderSettings, indices: list[int]
) -> list[dict[str, float]]:
    """PSNR and SSIM of `model` on the views `indices` of `views`."""
    return [
        image_scores(
            render_image(model, views.c2w[i], views, settings),
            views.images[i].to(settings.background.device),
        )
        for i in indices
    ]


def update_grid(
    model: RadianceField, settings: RenderSettings, threshold: float, seed: int
) -> float:
    """Refresh the occupancy grid from `model`'s density; returns the occupied fraction."""
    gen = torch.Generator().manual_seed(seed)
    return settings.grid.update(model.density, threshold, gen)


def adam(
    model: nn.Module, lr: float, steps: int, start: int = 0, min_lr_ratio: float = 0.1
) -> tuple[torch.optim.Optimizer, Callable]:
    """Adam (eps 1e-15, as Instant-NGP) with the learning rate decaying exponentially to
    lr * min_lr_ratio over `steps`, lr_s = lr min_lr_ratio^(s / steps), from step
    `start` on; returns (optimizer, scheduler step)."""
    if not 0 < min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in (0, 1]")
    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-15)

    def factor(s: int) -> float:
        return min_lr_ratio ** min((start + s) / max(steps, 1), 1.0)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor).step


@dataclass
class GridSchedule:
    """Occupancy grid refreshes while a field learns from images: every `every` steps
    from step `warmup` on (all cells count as occupied before), and at the end."""

    warmup: int = 100
    every: int = 50
    threshold: float = 1.0
    seed: int = 0  # of the jitter of the density probes (the same on every rank)


Callback = Callable[[int], None]  # called with the number of steps done after each step


def fit_images(
    model: nn.Module,
    field: RadianceField,
    views: Views,
    settings: RenderSettings,
    steps: int,
    lr: float,
    n_rays: int,
    seed: int,
    schedule: GridSchedule,
    on_step: Callback | None = None,
) -> None:
    """Train `field` (through `model`: itself or a DDP wrapper) from the images of
    `views`, refreshing `settings.grid` from it."""
    opt, decay = adam(field, lr, steps)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        if step >= schedule.warmup and (step - schedule.warmup) % schedule.every == 0:
            update_grid(field, settings, schedule.threshold, schedule.seed + step)
        loss = photometric_loss(model, image_rays(views, n_rays, gen), settings, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay()
        if step == steps - 1:
            update_grid(field, settings, schedule.threshold, schedule.seed + steps)
        if on_step is not None:
            on_step(step + 1)


def distill_fields(
    student: RadianceField,
    teacher: RadianceField,
    views: Views,
    settings: RenderSettings,
    steps: int,
    stage_ends: tuple[int, int],
    lr: float,
    n_rays: int,
    seed: int,
    weights: LossWeights | None = None,
    on_step: Callback | None = None,
    pool_rays: int = 0,
    refresh: int = 1,
    upsample: tuple[int, int] | None = None,
    min_lr_ratio: float = 0.1,
) -> None:
    """Distill the frozen `teacher` into `student` on rays from random poses, using the
    teacher's occupancy grid (`settings.grid`). With `pool_rays` the teacher's targets
    come from a `TeacherPool` of that many rays drawn anew every `refresh` steps;
    without, from fresh rays every step. The learning rate decays from `lr` to
    `lr` * `min_lr_ratio` (`adam`). `upsample` = (step, resolution): coarse to
    fine as in Plenoxels, a `PlenoxelField` student's grid is resampled trilinearly to
    resolution^3 at that step and Adam starts afresh (the decay goes on)."""
    if upsample is not None and not isinstance(student, PlenoxelField):
        raise ValueError(f"upsample={upsample} needs a plenoxel student, not {student.arch}")
    if upsample is not None and not 0 < upsample[0] < steps:
        raise ValueError(f"upsample={upsample}: its step must be in 1..{steps - 1} (steps={steps})")
    weights = weights or LossWeights()
    teacher.requires_grad_(False)
    opt, decay = adam(student, lr, steps, min_lr_ratio=min_lr_ratio)
    gen = torch.Generator().manual_seed(seed)
    pool = TeacherPool(teacher, views, settings, pool_rays or n_rays,
                       refresh if pool_rays else 1, gen)  # fmt: skip
    first = first_stage(teacher, student)
    for step in range(steps):
        if upsample is not None and step == upsample[0]:
            student.upsample(upsample[1])
            opt, decay = adam(student, lr, steps, step, min_lr_ratio)
        stage = stage_at(step, stage_ends, first)
        loss, _ = distill_loss(student, pool.batch(n_rays), settings, stage, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay()
        if on_step is not None:
            on_step(step + 1)

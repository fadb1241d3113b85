"""The nerf_distill task: distil a frozen teacher field into a student field of another
architecture (progressive volume distillation), DDP over rays.

The student is `task.model` (checkpointed, wrapped in DDP, trained by the
configured comm hook and optimizer). The teacher lives outside it: loaded from
`model.teacher_checkpoint`, or trained from the training images first (all
ranks together, DDP over rays) and cached under `data.cache_dir/teachers`, so a
resumed or repeated run reuses it. Evaluation renders the test views, split
over ranks, and reports PSNR / SSIM of student and teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradlane.errors import ConfigError
from gradlane.layers import OccupancyGrid, RadianceField, build_field
from gradlane.recipe import EvalSums, Task, WorkerContext

from .data import load_views
from .distill import (
    GridSchedule,
    LossWeights,
    Rays,
    RenderSettings,
    distill_loss,
    evaluate_views,
    first_stage,
    fit_images,
    image_scores,
    random_pose_rays,
    render_image,
    stage_at,
    teacher_targets,
)
from .scene import generated_scene
from .schema import NerfData, NerfModel

TEACHER_FORMAT = "gradlane.nerf_teacher/1"


def save_teacher(path: Path, field: RadianceField, settings: dict, grid: OccupancyGrid) -> None:
    """Write a teacher checkpoint (written to a temporary file, then renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": TEACHER_FORMAT,
        "arch": field.arch,
        "bound": field.bound,
        "settings": settings,
        "state_dict": field.state_dict(),
        "grid": grid.state_dict(),
    }
    fd, tmp = tempfile.mkstemp(prefix="partial-", suffix=".pt", dir=path.parent)
    os.close(fd)
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_teacher(path: str | Path, arch: str, field: RadianceField) -> OccupancyGrid:
    """Load a teacher checkpoint into `field` (built from the config); returns its grid.

    A missing or unreadable file, another architecture, another scene bound or
    tensors of other shapes are one ConfigError line naming the file.
    """
    where = f"model.teacher_checkpoint={str(path)!r}"
    if not Path(path).expanduser().is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        raise ConfigError(f"{where}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != TEACHER_FORMAT:
        raise ConfigError(f"{where}: not a gradlane NeRF teacher checkpoint")
    if state["arch"] != arch:
        raise ConfigError(f"{where} holds a {state['arch']!r} field but model.teacher={arch!r}")
    if state["bound"] != field.bound:
        raise ConfigError(f"{where} was trained with data.bound={state['bound']} not {field.bound}")
    own = field.state_dict()
    theirs = state["state_dict"]
    if set(own) != set(theirs):
        raise ConfigError(
            f"{where}: its tensors {sorted(set(theirs) ^ set(own))} do not match a {arch} field"
        )
    for name, tensor in own.items():
        if tensor.shape != theirs[name].shape:
            raise ConfigError(
                f"{where}: tensor {name!r} has shape {tuple(theirs[name].shape)} but the "
                f"model.{arch} settings give {tuple(tensor.shape)}"
            )
    field.load_state_dict(theirs)
    return OccupancyGrid.from_state(state["grid"])


@dataclass
class DistillBatch:
    rays: Rays
    stage: int
    generator: torch.Generator  # jitters the samples along the rays


class NerfDistillTask(Task):
    def __init__(self, cfg: Any, ctx: WorkerContext):
        from omegaconf import OmegaConf

        # typed on the driver, a plain DictConfig in the workers: merge onto the schema
        self.m: NerfModel = OmegaConf.to_object(OmegaConf.merge(NerfModel, cfg.model))
        self.d: NerfData = OmegaConf.to_object(OmegaConf.merge(NerfData, cfg.data))
        self.ctx = ctx
        self.root = self._data_root()
        background = torch.tensor(self.d.background)
        self.train_views = load_views(self.root, "train", background, self.d.downscale)
        self.test_views = load_views(self.root, "test", background, self.d.downscale)
        if self.train_views.images.shape[1:] != self.test_views.images.shape[1:]:
            raise ConfigError(
                f"data.path={str(self.root)!r}: test images are "
                f"{self.test_views.width}x{self.test_views.height} but training images "
                f"{self.train_views.width}x{self.train_views.height}"
            )
        self.model = self._field(self.m.student)
        self.teacher: RadianceField | None = None
        self.settings = RenderSettings(
            self.d.bound, self.m.n_samples, background.to(ctx.device),
            OccupancyGrid(self.m.grid_resolution, self.d.bound).to(ctx.device),
        )  # fmt: skip
        self.weights = LossWeights(
            self.m.loss_feature, self.m.loss_density, self.m.loss_color, self.m.loss_rgb
        )
        if self.m.teacher_checkpoint:  # checked here, on the driver, before anything is written
            self.teacher = self._field(self.m.teacher)
            grid = load_teacher(self.m.teacher_checkpoint, self.m.teacher, self.teacher)
            self._use_teacher(self.teacher, grid)
        self.teacher_sums: EvalSums | None = None

    def _data_root(self) -> Path:
        if self.d.path:
            return Path(self.d.path).expanduser()
        return generated_scene(
            self.d.cache_dir, self.d.image_size, self.d.train_views, self.d.test_views
        )

    def _field(self, arch: str) -> RadianceField:
        return build_field(arch, self.d.bound, self.m.geo_feat_dim, **self.m.arch_settings(arch))

    def _use_teacher(self, teacher: RadianceField, grid: OccupancyGrid) -> None:
        self.teacher = teacher.to(self.ctx.device).eval().requires_grad_(False)
        self.settings.grid = grid.to(self.ctx.device)
        self.first = first_stage(self.teacher, self.model)

    def _teacher_cache(self) -> Path:
        """Where a teacher trained by this configuration is kept."""
        trained_with = ("teacher_", "geo_feat_dim", "n_samples", "grid_")
        key = {
            "arch": self.m.teacher,
            "settings": self.m.arch_settings(self.m.teacher),
            "model": {k: v for k, v in asdict(self.m).items() if k.startswith(trained_with)},
            "data": [
                str(self.root.resolve()),
                self.d.downscale,
                self.d.bound,
                self.d.background,
                self.d.rays_per_batch,
            ],  # fmt: skip
            "seed": self.ctx.seed,
            "world_size": self.ctx.world_size,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return Path(self.d.cache_dir).expanduser() / "teachers" / f"{self.m.teacher}-{digest}.pt"

    def _ensure_teacher(self) -> RadianceField:
        """The teacher, trained from the images on first use when none was given."""
        if self.teacher is not None:
            return self.teacher
        with torch.random.fork_rng(devices=[]):  # the same initial teacher on every rank
            torch.manual_seed(self.ctx.seed)
            teacher = self._field(self.m.teacher)
        cache = self._teacher_cache()
        if cache.is_file():
            grid = load_teacher(cache, self.m.teacher, teacher)
        else:
            grid = self._train_teacher(teacher, cache)
        self._use_teacher(teacher, grid)
        return self.teacher

    def _train_teacher(self, teacher: RadianceField, cache: Path) -> OccupancyGrid:
        ctx = self.ctx
        teacher.to(ctx.device)
        model: nn.Module = teacher
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(
                teacher, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
        settings = RenderSettings(
            self.d.bound, self.m.n_samples, self.settings.background,
            OccupancyGrid(self.m.grid_resolution, self.d.bound).to(ctx.device),
        )  # fmt: skip
        schedule = GridSchedule(threshold=self.m.grid_threshold, seed=ctx.seed)
        fit_images(
            model, teacher, self.train_views.to(ctx.device), settings, self.m.teacher_steps,
            self.m.teacher_lr, self.d.rays_per_batch, ctx.seed * 7919 + ctx.rank, schedule,
        )  # fmt: skip
        if ctx.rank == 0:
            save_teacher(cache, teacher, self.m.arch_settings(self.m.teacher), settings.grid)
        if distributed:
            dist.barrier()
        return settings.grid

    def batch(self, step: int) -> DistillBatch:
        """Rays from random poses around the scene, this step's stage, a sample jitter."""
        self._ensure_teacher()
        gen = self.ctx.generator(step)
        rays = random_pose_rays(self.train_views, self.d.rays_per_batch, gen)
        rays = Rays(rays.origins.to(self.ctx.device), rays.dirs.to(self.ctx.device))
        return DistillBatch(rays, stage_at(step, tuple(self.m.stage_steps), self.first), gen)

    def loss(self, model: nn.Module, batch: DistillBatch) -> torch.Tensor:
        teacher = self._ensure_teacher()
        taught = teacher_targets(teacher, batch.rays, self.settings, batch.generator)
        loss, _ = distill_loss(model, taught, self.settings, batch.stage, self.weights)
        return loss

    def samples(self, batch: DistillBatch) -> int:
        return len(batch.rays.origins)

    def _views(self) -> list[int]:
        n = len(self.test_views)
        return list(range(min(self.d.eval_views, n) if self.d.eval_views else n))

    def _sums(self, field: nn.Module) -> dict[str, tuple[float, int]]:
        """Summed PSNR and SSIM over this rank's share of the evaluated test views."""
        views = self._views()[self.ctx.shard(len(self._views()))]
        rows = evaluate_views(field, self.test_views, self.settings, views)
        return {k: (sum(r[k] for r in rows), len(rows)) for k in ("psnr", "ssim")}

    def evaluate(self, model: nn.Module) -> EvalSums:
        """PSNR and SSIM of the student and the teacher (the mean over the test views)."""
        teacher = self._ensure_teacher()
        if self.teacher_sums is None:
            self.teacher_sums = {f"teacher_{k}": v for k, v in self._sums(teacher).items()}
        return {**self._sums(model), **self.teacher_sums}

    def save_artifacts(self, model: nn.Module, outdir: Path) -> None:
        """nerf_strip.png (ground truth | teacher | student per row), nerf_eval.json
        (PSNR / SSIM per evaluated view) and teacher.pt (reusable as
        model.teacher_checkpoint)."""
        import numpy as np
        from PIL import Image

        teacher = self._ensure_teacher()
        views = self._views()
        rows, scores = [], []
        for i in views:
            target = self.test_views.images[i].to(self.ctx.device)
            t_img, s_img = (render_image(f, self.test_views.c2w[i], self.test_views, self.settings)
                            for f in (teacher, model))  # fmt: skip
            scores.append(
                {"view": i, "teacher": image_scores(t_img, target),
                 "student": image_scores(s_img, target)}
            )  # fmt: skip
            if len(rows) < self.d.strip_views:
                rows.append(torch.cat([target, t_img, s_img], 1).clamp(0, 1).cpu())
        strip = (torch.cat(rows, 0).numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(strip).save(outdir / "nerf_strip.png")
        (outdir / "nerf_eval.json").write_text(json.dumps(scores, indent=1))
        save_teacher(outdir / "teacher.pt", teacher, self.m.arch_settings(self.m.teacher),
                     self.settings.grid)  # fmt: skip


def build(cfg: Any, ctx: WorkerContext) -> NerfDistillTask:
    return NerfDistillTask(cfg, ctx)

"""Progressive volume distillation between every pair of the four fields, the random poses
around the scene, and the stage schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from nerf_utils import fit_analytic, small_field

from gradlane.layers import FIELDS, OccupancyGrid, build_field
from gradlane.recipes.nerf_distill.data import Views, load_views
from gradlane.recipes.nerf_distill.distill import (
    GridSchedule,
    LossWeights,
    Rays,
    RenderSettings,
    adam,
    distill_fields,
    distill_loss,
    evaluate_views,
    first_stage,
    fit_images,
    image_rays,
    random_pose_rays,
    render_rays,
    stage_at,
    teacher_targets,
)
from gradlane.recipes.nerf_distill.scene import generated_scene, look_at, sphere_position

BOUND = 1.5


def _views() -> Views:
    """Eight cameras at radius 3.5-4.5 and elevations 20-50 degrees (images unused)."""
    poses = [
        look_at(sphere_position(a, math.radians(e), r)).float()
        for a, e, r in zip(torch.linspace(0, 6, 8).tolist(), [20, 50] * 4, [3.5, 4.5] * 4,
                           strict=True)
    ]  # fmt: skip
    return Views(torch.zeros(8, 12, 12, 3), torch.stack(poses), focal=14.0)


@pytest.fixture(scope="module")
def teachers() -> dict:
    """Each architecture briefly fitted to the analytic ball, with its occupancy grid."""
    out = {}
    for arch in FIELDS:
        field = small_field(arch, seed=5, bound=BOUND)
        fit_analytic(field, arch, steps=25)
        field.requires_grad_(False)
        grid = OccupancyGrid(12, BOUND)
        grid.update(field.density, threshold=1.0, generator=torch.Generator().manual_seed(0))
        out[arch] = (field, grid)
    return out


def _error(student, teacher, views, settings) -> float:
    """Distance of the student to the teacher on fixed rays: sample and pixel terms."""
    rays = random_pose_rays(views, 256, torch.Generator().manual_seed(123))
    with torch.no_grad():
        taught = teacher_targets(teacher, rays, settings)
        _, terms = distill_loss(student, taught, settings, 3, LossWeights(density=0.1))
    return sum(v.item() for k, v in terms.items() if k != "feature")


@pytest.mark.parametrize(
    "pair", [p for p in itertools.permutations(sorted(FIELDS), 2)], ids="->".join
)
def test_distillation_lowers_the_students_error_to_the_teacher(teachers, pair):
    teacher_arch, student_arch = pair
    teacher, grid = teachers[teacher_arch]
    student = small_field(student_arch, seed=11, bound=BOUND)
    views = _views()
    settings = RenderSettings(BOUND, 16, torch.ones(3), grid)
    before = _error(student, teacher, views, settings)
    lr = {"mlp": 0.005, "hash": 0.02, "tensorf": 0.02, "plenoxel": 0.2}[student_arch]
    distill_fields(student, teacher, views, settings, steps=60, stage_ends=(10, 25), lr=lr,
                   n_rays=128, seed=0)  # fmt: skip
    after = _error(student, teacher, views, settings)
    assert after < 0.6 * before, (before, after)


def test_coarse_to_fine_plenoxel_keeps_learning_on_its_finer_grid(teachers):
    teacher, grid = teachers["hash"]
    torch.manual_seed(11)
    student = build_field("plenoxel", BOUND, resolution=8, sh_degree=2)
    views = _views()
    settings = RenderSettings(BOUND, 16, torch.ones(3), grid)
    errors = {0: _error(student, teacher, views, settings)}

    def record(step: int) -> None:
        if step in (30, 60):
            errors[step] = _error(student, teacher, views, settings)

    distill_fields(student, teacher, views, settings, steps=60, stage_ends=(10, 25), lr=0.2,
                   n_rays=128, seed=0, on_step=record, upsample=(30, 15))  # fmt: skip
    assert student.grid.shape == (1, 13, 15, 15, 15)
    assert errors[60] < 0.8 * errors[30] < 0.8 * errors[0], errors
    with pytest.raises(ValueError, match=r"upsample=\(30, 15\) needs a plenoxel student"):
        distill_fields(small_field("mlp"), teacher, views, settings, steps=1, stage_ends=(0, 0),
                       lr=0.1, n_rays=8, seed=0, upsample=(30, 15))  # fmt: skip
    with pytest.raises(ValueError, match=r"upsample=\(60, 15\): its step must be in 1..59"):
        distill_fields(student, teacher, views, settings, steps=60, stage_ends=(10, 25), lr=0.2,
                       n_rays=8, seed=0, upsample=(60, 15))  # fmt: skip


def test_adam_decays_to_its_min_lr_ratio_and_resumes_at_a_later_step():
    model = torch.nn.Linear(2, 2)
    opt, decay = adam(model, 0.5, 10, min_lr_ratio=0.01)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        decay()
    expected = [0.5 * 0.01 ** min(s / 10, 1.0) for s in range(12)]
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(expected))
    resumed, _ = adam(model, 0.5, 10, start=4, min_lr_ratio=0.01)
    assert math.isclose(resumed.param_groups[0]["lr"], expected[4])
    for bad in (0.0, -0.1, 2.0):
        with pytest.raises(ValueError, match=rf"min_lr_ratio={bad} must be in \(0, 1\]"):
            adam(model, 0.5, 10, min_lr_ratio=bad)


def test_stages_start_at_two_without_a_shared_representation(teachers):
    assert first_stage(teachers["hash"][0], small_field("mlp")) == 1
    assert first_stage(teachers["plenoxel"][0], small_field("mlp")) == 2
    assert first_stage(teachers["tensorf"][0], small_field("plenoxel")) == 2
    assert first_stage(teachers["hash"][0], small_field("mlp", geo_feat_dim=3)) == 2
    assert [stage_at(s, (2, 4), 1) for s in range(6)] == [1, 1, 2, 2, 3, 3]
    assert [stage_at(s, (2, 4), 2) for s in range(6)] == [2, 2, 2, 2, 3, 3]


def test_stage_one_trains_only_the_representation(teachers):
    teacher, grid = teachers["hash"]
    student = small_field("mlp", seed=3, bound=BOUND)
    settings = RenderSettings(BOUND, 16, torch.ones(3), grid)
    rays = random_pose_rays(_views(), 64, torch.Generator().manual_seed(0))
    taught = teacher_targets(teacher, rays, settings)
    loss, terms = distill_loss(student, taught, settings, 1, LossWeights())
    loss.backward()
    assert terms["density"] == 0 and terms["color"] == 0 and "rgb" not in terms
    assert all(p.grad.abs().sum() == 0 for p in student.color_head.parameters())
    assert all(p.grad.abs().sum() > 0 for p in student.layers.parameters())
    _, terms = distill_loss(student, taught, settings, 3, LossWeights())
    assert set(terms) == {"feature", "density", "color", "rgb"}
    assert all(v > 0 for v in terms.values())


def test_pooled_teacher_targets_equal_a_direct_evaluation_of_the_same_rays(teachers):
    """Targets computed once for a pool (in chunks) and picked by ray equal the teacher
    rendered on just those rays, and so does the student's loss against them."""
    teacher, grid = teachers["tensorf"]
    settings = RenderSettings(BOUND, 16, torch.ones(3), grid)
    rays = random_pose_rays(_views(), 300, torch.Generator().manual_seed(4))
    pool = teacher_targets(teacher, rays, settings, chunk=64)  # bin centres: deterministic
    pick = torch.tensor([299, 5, 17, 17, 0, 128, 64, 63])
    picked = pool.select(pick)
    direct = teacher_targets(teacher, Rays(rays.origins[pick], rays.dirs[pick]), settings)
    hits = direct.valid.any(-1)
    assert hits.any() and not hits.all()  # rays with samples and rays with none
    for name in ("valid", "x", "d", "deltas", "share", "rgb"):
        torch.testing.assert_close(getattr(picked, name), getattr(direct, name))
    for a, b in zip(picked.out, direct.out, strict=True):
        torch.testing.assert_close(a, b)
    student = small_field("mlp", seed=1, bound=BOUND)
    for stage in (1, 3):
        torch.testing.assert_close(
            distill_loss(student, picked, settings, stage, LossWeights())[0],
            distill_loss(student, direct, settings, stage, LossWeights())[0],
        )


def test_random_poses_lie_in_the_training_cameras_range_and_see_the_scene():
    views = _views()
    rays = random_pose_rays(views, 2000, torch.Generator().manual_seed(0))
    radius = rays.origins.norm(dim=-1)
    assert radius.min() >= 3.5 - 1e-4 and radius.max() <= 4.5 + 1e-4
    elevation = torch.rad2deg(torch.asin(rays.origins[:, 2] / radius))
    assert elevation.min() >= 20 - 1e-3 and elevation.max() <= 50 + 1e-3
    assert radius.std() > 0.2 and elevation.std() > 5  # spread, not the training poses
    # every camera looks at the origin: its ray stays within the field of view of it
    to_origin = torch.nn.functional.normalize(-rays.origins, dim=-1)
    half_diagonal = math.atan(math.hypot(6, 6) / 14.0)
    assert ((rays.dirs * to_origin).sum(-1) >= math.cos(half_diagonal) - 1e-4).all()
    settings = RenderSettings(BOUND, 8, torch.ones(3), OccupancyGrid(4, BOUND))
    hits = render_rays(small_field("mlp"), rays, settings).valid.any(-1)
    assert hits.float().mean() > 0.9


def test_image_rays_carry_the_colour_of_the_pixel_they_pass_through():
    height, width, focal = 6, 8, 5.0
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.stack([rows / height, cols / width, torch.zeros_like(rows, dtype=torch.float)],
                        -1).float()  # fmt: skip
    views = Views(torch.stack([image, image]), torch.eye(4).repeat(2, 1, 1), focal)
    rays = image_rays(views, 50, torch.Generator().manual_seed(0))
    # project each direction back through the pinhole (camera at the origin, looking down -z)
    col = rays.dirs[:, 0] / -rays.dirs[:, 2] * focal + width / 2 - 0.5
    row = -rays.dirs[:, 1] / -rays.dirs[:, 2] * focal + height / 2 - 0.5
    torch.testing.assert_close(rays.target[:, 0], row / height)
    torch.testing.assert_close(rays.target[:, 1], col / width)


@pytest.mark.parametrize("arch", sorted(FIELDS))
def test_each_architecture_learns_the_scene_from_images(arch, tmp_path_factory):
    """A teacher of any architecture trained from the generated scene's images: its
    PSNR on the training views rises well above the untrained field's."""
    root = generated_scene(tmp_path_factory.getbasetemp() / "scene", 16, 8, 2)
    views = load_views(root, "train", torch.ones(3))
    field = small_field(arch, seed=2, bound=1.0)
    settings = RenderSettings(1.0, 24, torch.ones(3), OccupancyGrid(16, 1.0))

    def score() -> float:
        rows = evaluate_views(field, views, settings, [0, 3, 6])
        return sum(r["psnr"] for r in rows) / len(rows)

    before = score()
    lr = {"mlp": 0.005, "hash": 0.02, "tensorf": 0.02, "plenoxel": 0.2}[arch]
    fit_images(field, field, views, settings, steps=80, lr=lr, n_rays=256, seed=0,
               schedule=GridSchedule(warmup=40, every=20))  # fmt: skip
    assert score() > before + 4.0, (before, score())
    assert settings.grid.cells.float().mean() < 0.9  # the grid now skips empty space

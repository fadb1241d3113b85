"""A procedural multi-view data set: five shaded objects, written in the NeRF-synthetic layout.

The scene (z up, inside [-1, 1]^3): a checkered floor slab, a striped sphere,
a rotated box, a torus and a ringed pillar, so views hold occlusion, edges and
texture. Each pixel is sphere-traced through the union of the objects' signed
distance functions at 2x2 subpixels (antialiased colour and alpha), shaded
Lambertian under one directional light plus ambient (view-independent).
Cameras sit on a sphere of radius 4 looking at the origin, as in the
NeRF-synthetic scenes: training views at random azimuths and elevations, test
views on a ring. Output: `train/r_<i>.png`, `test/r_<i>.png` (RGBA) and
`transforms_{train,test}.json`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SCENE_VERSION = 1  # bump when the scene or the layout changes (new cache directory)
CAMERA_ANGLE_X = 0.6911112070083618  # the NeRF-synthetic field of view
CAMERA_RADIUS = 3.2
LIGHT = F.normalize(torch.tensor([0.4, -0.3, 0.85], dtype=torch.float64), dim=0)


def _sdf_box(p: torch.Tensor, half: tuple[float, float, float], rounding: float = 0.0):
    q = p.abs() - torch.tensor(half, dtype=p.dtype) + rounding
    return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0) - rounding


def _rotate_z(p: torch.Tensor, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.stack(
        [c * p[..., 0] + s * p[..., 1], -s * p[..., 0] + c * p[..., 1], p[..., 2]], -1
    )


def _objects(p: torch.Tensor) -> torch.Tensor:
    """Signed distances (..., 5) of floor, sphere, box, torus and pillar."""
    floor = _sdf_box(p - torch.tensor([0.0, 0.0, -0.85], dtype=p.dtype), (0.95, 0.95, 0.08))
    sphere = (p - torch.tensor([0.35, 0.3, -0.35], dtype=p.dtype)).norm(dim=-1) - 0.42
    box_p = _rotate_z(p - torch.tensor([-0.4, -0.3, -0.52], dtype=p.dtype), 0.6)
    box = _sdf_box(box_p, (0.25, 0.25, 0.25), rounding=0.03)
    tp = p - torch.tensor([-0.35, 0.45, -0.67], dtype=p.dtype)
    torus = torch.stack([tp[..., :2].norm(dim=-1) - 0.28, tp[..., 2]], -1).norm(dim=-1) - 0.1
    pp = p - torch.tensor([0.45, -0.45, -0.2], dtype=p.dtype)
    radial = pp[..., :2].norm(dim=-1) - 0.12
    height = pp[..., 2].abs() - 0.57
    pillar = torch.stack([radial, height], -1).clamp(min=0).norm(dim=-1) + torch.maximum(
        radial, height
    ).clamp(max=0)
    return torch.stack([floor, sphere, box, torus, pillar], -1)


def _albedo(p: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Base colour (N, 3) of hit points by object id."""
    x, y, z = p.unbind(-1)
    checker = ((torch.floor(x / 0.3) + torch.floor(y / 0.3)) % 2)[:, None]
    floor = checker * torch.tensor([0.85, 0.82, 0.75]) + (1 - checker) * torch.tensor(
        [0.25, 0.28, 0.35]
    )
    stripe = (0.5 + 0.5 * torch.sin(14.0 * z))[:, None]
    sphere = stripe * torch.tensor([0.9, 0.15, 0.1]) + (1 - stripe) * torch.tensor([0.95, 0.8, 0.2])
    fade = ((z + 0.77) / 0.5).clamp(0, 1)[:, None]
    box = (1 - fade) * torch.tensor([0.1, 0.25, 0.8]) + fade * torch.tensor([0.3, 0.75, 0.95])
    torus = torch.tensor([0.2, 0.7, 0.25]).expand_as(box)
    rings = (torch.sin(20.0 * z) > 0).to(p.dtype)[:, None]
    pillar = rings * torch.tensor([0.6, 0.2, 0.7]) + (1 - rings) * torch.tensor([0.95, 0.95, 0.95])
    table = torch.stack([floor, sphere, box, torus, pillar], 1).to(p.dtype)  # (N, 5, 3)
    return table[torch.arange(len(p)), which]


def trace(origins: torch.Tensor, dirs: torch.Tensor, steps: int = 96):
    """Sphere-trace rays (float64); returns colours (N, 3) and hit masks (N,)."""
    t = torch.zeros(len(origins), dtype=origins.dtype)
    # start at the sphere of radius 1.8 that holds the scene
    b = (origins * dirs).sum(-1)
    disc = b * b - (origins * origins).sum(-1) + 1.8**2
    t = torch.where(disc > 0, (-b - disc.clamp(min=0).sqrt()).clamp(min=0), t)
    hit = torch.zeros(len(origins), dtype=torch.bool)
    active = torch.arange(len(origins))
    for _ in range(steps):  # march only the rays still in flight
        d = _objects(origins[active] + t[active, None] * dirs[active]).amin(-1)
        done = d < 1e-4
        hit[active[done]] = True
        t[active] += torch.where(done, torch.zeros_like(d), d)
        active = active[~done & (t[active] < 8.0)]
        if not len(active):
            break
    p = origins + t[:, None] * dirs
    hit &= t < 8.0
    eps = 1e-4
    offsets = torch.eye(3, dtype=p.dtype) * eps
    grad = torch.stack([_objects(p + o).amin(-1) - _objects(p - o).amin(-1) for o in offsets], -1)
    normal = F.normalize(grad, dim=-1)
    which = _objects(p).argmin(-1)
    shade = 0.3 + 0.7 * (normal @ LIGHT.to(p.dtype)).clamp(min=0)
    return (_albedo(p, which) * shade[:, None]).clamp(0, 1), hit


def look_at(position: torch.Tensor) -> torch.Tensor:
    """Camera-to-world (4, 4), OpenGL convention (looks down -z), aimed at the origin, z up."""
    forward = F.normalize(-position, dim=0)
    right = F.normalize(
        torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype)), dim=0
    )
    up = torch.linalg.cross(right, forward)
    c2w = torch.eye(4, dtype=position.dtype)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, position
    return c2w


def sphere_position(azimuth: float, elevation: float, radius: float = CAMERA_RADIUS):
    ce = math.cos(elevation)
    return torch.tensor(
        [
            radius * ce * math.cos(azimuth),
            radius * ce * math.sin(azimuth),
            radius * math.sin(elevation),
        ],
        dtype=torch.float64,
    )


def render_view(c2w: torch.Tensor, size: int) -> np.ndarray:
    """An RGBA uint8 image (size, size, 4) of the scene seen from `c2w`."""
    from gradlane.layers import camera_rays

    focal = 0.5 * 2 * size / math.tan(0.5 * CAMERA_ANGLE_X)
    origins, dirs = camera_rays(c2w, 2 * size, 2 * size, focal)
    rgb, hit = trace(origins, dirs)
    rgb = rgb.reshape(size, 2, size, 2, 3)
    alpha = hit.to(rgb.dtype).reshape(size, 2, size, 2)
    weight = alpha.sum((1, 3))
    color = (rgb * alpha[..., None]).sum((1, 3)) / weight.clamp(min=1)[..., None]
    rgba = torch.cat([color, (weight / 4)[..., None]], -1)
    return (rgba.numpy() * 255 + 0.5).astype(np.uint8)


def camera_poses(n_train: int, n_test: int, seed: int) -> dict[str, list[torch.Tensor]]:
    """Random training views (elevation 10-70 degrees) and a ring of test views (30 degrees)."""
    rng = np.random.default_rng(seed)
    train = [
        look_at(sphere_position(rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(10, 70))))
        for _ in range(n_train)
    ]
    test = [
        look_at(sphere_position(2 * math.pi * (i + 0.5) / n_test, math.radians(30)))
        for i in range(n_test)
    ]
    return {"train": train, "test": test}


def write_scene(out_dir: Path, size: int, n_train: int, n_test: int, seed: int = 0) -> None:
    """Render every view and write the PNGs and transforms files into `out_dir`."""
    from PIL import Image

    for split, poses in camera_poses(n_train, n_test, seed).items():
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        frames = []
        for i, c2w in enumerate(poses):
            Image.fromarray(render_view(c2w, size), "RGBA").save(out_dir / split / f"r_{i}.png")
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
        meta = {"camera_angle_x": CAMERA_ANGLE_X, "frames": frames}
        (out_dir / f"transforms_{split}.json").write_text(json.dumps(meta, indent=1))


def generated_scene(
    cache_dir: str | Path, size: int, n_train: int, n_test: int, seed: int = 0
) -> Path:
    """The directory of the generated scene with these settings, rendered on first use.

    Rendering goes to a temporary directory renamed into place at the end, so
    concurrent callers never see a half-written scene.
    """
    root = Path(cache_dir).expanduser()
    target = root / f"scene-v{SCENE_VERSION}-{size}px-{n_train}train-{n_test}test-seed{seed}"
    if (target / "transforms_test.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".scene-", dir=root))
    try:
        write_scene(tmp, size, n_train, n_test, seed)
        os.replace(tmp, target)
    except OSError:
        if not (target / "transforms_test.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

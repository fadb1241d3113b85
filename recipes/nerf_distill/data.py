"""Multi-view images in the NeRF-synthetic layout: `transforms_<split>.json` + PNG images.

Each transforms file holds `camera_angle_x` (horizontal field of view, radians)
and `frames`, each with `file_path` (relative to the directory, with or
without `.png`) and a 4x4 camera-to-world `transform_matrix` (OpenGL
convention). RGBA images are composited over the background colour. Every
problem is one `ConfigError` line naming the file (and frame).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradlane.errors import ConfigError


@dataclass
class Views:
    """Images (N, H, W, 3) in [0, 1], camera-to-world matrices (N, 4, 4), focal (pixels)."""

    images: torch.Tensor
    c2w: torch.Tensor
    focal: float

    @property
    def height(self) -> int:
        return self.images.shape[1]

    @property
    def width(self) -> int:
        return self.images.shape[2]

    def __len__(self) -> int:
        return len(self.images)

    def to(self, device: torch.device | str) -> Views:
        return Views(self.images.to(device), self.c2w.to(device), self.focal)


def _read_transforms(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"data.path: {path} is missing (a NeRF-synthetic transforms file)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from exc
    if not isinstance(meta, dict):
        raise ConfigError(f"{path}: must hold a JSON object, not {type(meta).__name__}")
    angle = meta.get("camera_angle_x")
    if not isinstance(angle, (int, float)) or not 0 < angle < math.pi:
        raise ConfigError(f"{path}: camera_angle_x={angle!r} must be a number in (0, pi)")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise ConfigError(f"{path}: 'frames' must be a non-empty list")
    return meta


def _frame(path: Path, i: int, frame) -> tuple[Path, torch.Tensor]:
    where = f"{path}: frames[{i}]"
    if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str):
        raise ConfigError(f"{where} needs a 'file_path' string")
    try:
        c2w = torch.tensor(frame.get("transform_matrix"), dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: transform_matrix is not a 4x4 matrix of numbers") from exc
    if c2w.shape != (4, 4) or not torch.isfinite(c2w).all():
        raise ConfigError(f"{where}: transform_matrix must be a finite 4x4 matrix")
    image = (path.parent / frame["file_path"]).resolve()
    if image.suffix.lower() != ".png":
        image = image.with_name(image.name + ".png")
    return image, c2w


def _load_image(image: Path, where: str, background: torch.Tensor, downscale: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not image.is_file():
        raise ConfigError(f"{where}: image {image} is missing")
    try:
        with Image.open(image) as im:
            im = im.convert("RGBA")
            if downscale > 1:
                size = (im.width // downscale, im.height // downscale)
                im = im.resize(size, Image.Resampling.LANCZOS)
            rgba = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigError(f"{where}: image {image} cannot be read ({exc})") from exc
    alpha = rgba[..., 3:]
    return rgba[..., :3] * alpha + background.numpy() * (1 - alpha)


def load_views(root: str | Path, split: str, background: torch.Tensor, downscale: int = 1) -> Views:
    """The `split` views of the data set in `root` (transforms_<split>.json), all of one size."""
    if downscale < 1:
        raise ConfigError(f"data.downscale={downscale} must be >= 1")
    path = Path(root).expanduser() / f"transforms_{split}.json"
    meta = _read_transforms(path)
    images, poses = [], []
    for i, frame in enumerate(meta["frames"]):
        image, c2w = _frame(path, i, frame)
        rgb = _load_image(image, f"{path}: frames[{i}]", background, downscale)
        if images and rgb.shape != images[0].shape:
            h, w = images[0].shape[:2]
            raise ConfigError(
                f"{path}: frames[{i}]: image {image} is {rgb.shape[1]}x{rgb.shape[0]} pixels "
                f"but the first image is {w}x{h}; every image of a split must have one size"
            )
        images.append(rgb)
        poses.append(c2w)
    width = images[0].shape[1]
    focal = 0.5 * width / math.tan(0.5 * float(meta["camera_angle_x"]))
    return Views(torch.from_numpy(np.stack(images)), torch.stack(poses), focal)

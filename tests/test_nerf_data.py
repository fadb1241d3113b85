"""The generated scene in the NeRF-synthetic layout, its loader, and bad data sets."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from gradlane.errors import ConfigError
from gradlane.layers import HashField, MLPField, OccupancyGrid, camera_rays
from gradlane.recipes.nerf_distill.data import load_views
from gradlane.recipes.nerf_distill.scene import generated_scene, trace
from gradlane.recipes.nerf_distill.train import load_teacher, save_teacher

WHITE = torch.ones(3)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return generated_scene(tmp_path_factory.mktemp("cache"), size=16, n_train=4, n_test=2)


def test_generated_scene_is_in_the_nerf_synthetic_layout(scene):
    meta = json.loads((scene / "transforms_train.json").read_text())
    assert meta["camera_angle_x"] == pytest.approx(0.6911112)
    assert [f["file_path"] for f in meta["frames"]] == [f"./train/r_{i}" for i in range(4)]
    image = Image.open(scene / "train" / "r_0.png")
    assert image.mode == "RGBA" and image.size == (16, 16)
    alpha = np.asarray(image)[..., 3]
    assert alpha.min() == 0 and alpha.max() == 255  # background and objects both visible
    views = load_views(scene, "train", WHITE)
    assert views.images.shape == (4, 16, 16, 3) and views.c2w.shape == (4, 4, 4)
    assert views.focal == pytest.approx(8 / math.tan(0.6911112 / 2), rel=1e-5)
    test = load_views(scene, "test", WHITE)
    assert len(test) == 2
    # background pixels composite to white
    assert torch.allclose(views.images[0][torch.from_numpy(alpha == 0)], torch.ones(3))


def test_generated_scene_is_cached_and_deterministic(scene, tmp_path):
    again = generated_scene(scene.parent, size=16, n_train=4, n_test=2)
    assert again == scene
    other = generated_scene(tmp_path, size=16, n_train=4, n_test=2)
    for name in ("train/r_3.png", "test/r_1.png", "transforms_test.json"):
        assert (scene / name).read_bytes() == (other / name).read_bytes()


def test_pixels_show_what_a_traced_ray_hits(scene):
    """The written pixel colours agree with sphere tracing through the pixel centres."""
    views = load_views(scene, "test", torch.zeros(3))
    origins, dirs = camera_rays(views.c2w[0].double(), 16, 16, views.focal)
    rgb, hit = trace(origins, dirs)
    image = views.images[0].reshape(-1, 3).double()
    # pixels whose centre hits an object are mostly opaque and close in colour
    # (the image is a 2x2 supersampled average)
    close = (image[hit] - rgb[hit]).abs().amax(-1) < 0.25
    assert hit.sum() > 20 and close.float().mean() > 0.8
    assert (image[~hit] < 0.6).float().mean() > 0.8  # on black: background stays dark


def _copy(scene, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(scene, root)
    return root


def _rejects(root, split: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_views(root, split, WHITE)
    assert "\n" not in str(info.value)


def test_bad_data_sets_are_one_line_naming_the_file(scene, tmp_path):
    root = _copy(scene, tmp_path)
    path = root / "transforms_train.json"
    _rejects(root, "val", "transforms_val.json is missing")

    path.write_text('{"camera_angle_x": 0.7,\n "frames": [}')
    _rejects(root, "train", r"transforms_train.json: not valid JSON \(line 2")

    meta = json.loads((scene / "transforms_train.json").read_text())
    meta["frames"][1]["transform_matrix"] = [[1, 0, 0], [0, 1, 0]]
    path.write_text(json.dumps(meta))
    _rejects(root, "train", r"frames\[1\]: transform_matrix must be a finite 4x4")

    meta = json.loads((scene / "transforms_train.json").read_text())
    meta["frames"][2]["file_path"] = "./train/nothing"
    path.write_text(json.dumps(meta))
    _rejects(root, "train", r"frames\[2\]: image .*nothing.png is missing")

    shutil.copy(scene / "transforms_train.json", path)
    Image.new("RGBA", (20, 16)).save(root / "train" / "r_3.png")
    _rejects(root, "train", r"r_3.png is 20x16 pixels but the first image is 16x16")

    (root / "train" / "r_3.png").write_bytes(b"not a png")
    _rejects(root, "train", r"r_3.png cannot be read")


def test_downscale_shrinks_the_images_and_the_focal_length(scene):
    views = load_views(scene, "train", WHITE, downscale=2)
    full = load_views(scene, "train", WHITE)
    assert views.images.shape == (4, 8, 8, 3)
    assert views.focal == pytest.approx(full.focal / 2)


def test_teacher_checkpoints_of_another_architecture_or_shape_are_rejected(tmp_path):
    grid = OccupancyGrid(4, 1.0)
    path = tmp_path / "teacher.pt"
    save_teacher(path, HashField(1.0, levels=4, table_log2=10), {"levels": 4}, grid)
    loaded = load_teacher(path, "hash", HashField(1.0, levels=4, table_log2=10))
    assert loaded.cells.shape == (4, 4, 4)
    with pytest.raises(ConfigError, match="holds a 'hash' field but model.teacher='mlp'"):
        load_teacher(path, "mlp", MLPField(1.0))
    with pytest.raises(ConfigError, match="tensor 'table' has shape"):
        load_teacher(path, "hash", HashField(1.0, levels=4, table_log2=11))
    with pytest.raises(ConfigError, match="no such file"):
        load_teacher(tmp_path / "none.pt", "hash", HashField(1.0))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        load_teacher(tmp_path / "junk.pt", "hash", HashField(1.0))
